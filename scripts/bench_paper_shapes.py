"""Every model end to end on the paper-shaped files: each phase's wall time, events/s and peak RSS.

Usage: python scripts/bench_paper_shapes.py --data DIR --out bench.json [--shapes ml10m lastfm]
           [--models pop itemknn ...] [--phase-cap-s 240] [--epochs 1] [--rnn-hidden 100]
           [--logits-budget-gb 1] [--device cpu] [--code CHECKOUT] [--label before]
           [--fit-limit-s 1500]
       python scripts/bench_paper_shapes.py --markdown bench.json [after.json]

DIR holds the files of scripts/make_paper_shapes.py (DIR/ml10m/ratings.dat,
DIR/lastfm/userid-timestamp-artid-artname-traid-traname.tsv). Per shape it times
`load_dataset` twice in fresh processes, first from the raw file (parse, preprocess, split,
cache write, into DIR/<shape>/bench_cache, emptied first) and then from that cache. Then each
model runs in its own child process, through the functions the `seqexp` command uses (the
config composed by Hydra from conf/, `load_dataset`, `build_model`, `build_evaluator`,
`build_trainer`, the model's `fit`, the trainer's `train_epoch`, the evaluator's `rank_counts`):
load (cache), fit, each epoch's training and validation, and the test pass. Per phase: wall
seconds, events, events/s and the process's peak RSS during the phase (sampled every 0.1 s).

`--phase-cap-s` cuts a phase that runs longer: training and evaluation stop after the batch
that crosses the cap, and the row says `cut`, with events/s over the part done and the full
phase's time extrapolated from it (`full_s_est`, an estimate). A closed-form fit cannot be cut
inside: its child is killed at 3 x the cap + 120 s (or at `--fit-limit-s`, for a fit known
to take longer than a cut phase), and the row says `killed` (no extrapolation), and the
model's later phases are not run.

Models configured with the Table 1 RNN group (their config has `model.hidden_size` and
`model.window`) run at `--rnn-hidden` units; their batch is lowered, where needed, until one
batch's full-softmax logits (batch x window x items float32) fit in `--logits-budget-gb`
(0: the configured batch). Their rows carry the extrapolation to Table 1's hidden size (1000;
its batch 1000 and window 20 change the FLOP per event little) by FLOP arithmetic: per event,
training costs 6 (R + H S) FLOP and evaluation 2 (R + H N), where R is the count of the
non-item parameters (the multiply-adds of the recurrent part, counted on the model built at each
hidden size), H the hidden size, N the items and S the items the loss scores (N for
full_softmax, n_negatives + 1 for sampled_softmax). The measured (or extrapolated) time of the
phase is scaled by the FLOP ratio, which assumes the same FLOP rate at both sizes.

`--code CHECKOUT` measures another checkout of seqexp (e.g. the code before a change) on the
same files: the children put it first on PYTHONPATH, import its `seqexp` (and exit if they got
another one) and compose its conf/. Where that code lacks what this script uses, the script
falls back, keyed on what the imported code has, never on its version:
- no `seqexp.data.sequences.validation_sample` (code that validates every event): validation
  counts all the validation events; the row's note says so, and the cap cuts and extrapolates
  it like any phase;
- an `-o key=value` whose key this checkout's config has and the code's lacks (a key newer
  than the code, e.g. eval.val_max_scores) is left out for it and listed in the report.
A closed-form fit that has no stop check inside is killed at the limit above, as here.
`--label` names the run in the JSON and the Markdown.

Prints a table and writes JSON; `--markdown FILE.json` prints a written report as the table of
docs/benchmarks.md, `--markdown BEFORE.json AFTER.json` one table of both: per (shape, model,
phase) row, each run's wall time, events/s, peak RSS and note, and the ratio of the events/s.
A benchmark, not a test: it exits 0 unless a child failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {"ml10m": "ratings.dat", "lastfm": "userid-timestamp-artid-artname-traid-traname.tsv"}
MODELS = ["pop", "itemknn", "expdecay_knn", "mf", "seqmf", "gru", "linear_ugru",
          "rectified_ugru", "attentional_ugru", "dream"]
TABLE1 = {"hidden_size": 1000, "batch_size": 1000, "window": 20}


def compose(shape: str, data: Path, model: str, extra: list[str], code: Path = ROOT):
    """The run's config as `seqexp model=<model> dataset=<shape> ...` composes it from
    `code`/conf."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [f"model={model}", f"dataset={shape}",
                 f"dataset.path={data / shape / FILES[shape]}",
                 f"paths.data_dir={data / shape / 'bench_cache'}",
                 "train.progress=false", *extra]
    with initialize_config_dir(config_dir=str(code / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


# ---------------------------------------------------------------------------- the child process
class RssPeak:
    """The process's resident set, sampled every 0.1 s on a thread: the peak since `reset`."""

    def __init__(self) -> None:
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.now())

    def reset(self) -> None:
        self.peak = self.now()

    def peak_mb(self) -> float:
        return max(self.peak, self.now()) / 2**20


class PhaseCut(Exception):
    """A phase ran past its cap."""


class Phases:
    """Times phases, reports each as a JSON line on stdout (the parent reads them as they come)."""

    def __init__(self, cap_s: float | None) -> None:
        self.cap_s, self.rss = cap_s, RssPeak()
        self.events, self.started, self.name, self.total = 0, 0.0, "", None

    def start(self, name: str, total: int | None = None) -> None:
        """Phase `name` starts; `total`: its events (a phase that reached them is not cut)."""
        self.name, self.events, self.total = name, 0, total
        self.rss.reset()
        print(json.dumps({"start": name}), flush=True)
        self.started = time.perf_counter()

    def over(self) -> bool:
        if self.total is not None and self.events >= self.total:
            return False
        return self.cap_s is not None and time.perf_counter() - self.started > self.cap_s

    def stop_check(self) -> str | None:
        """For the evaluator: asked after each batch."""
        return "phase cap" if self.over() else None

    def end(self, total_events: int | None, cut: bool = False, **extra) -> dict:
        seconds = time.perf_counter() - self.started
        events = self.events if cut or total_events is None else total_events
        row = {"phase": self.name, "seconds": round(seconds, 2), "events": events,
               "events_per_s": round(events / seconds, 1) if events and seconds else None,
               "peak_rss_mb": round(self.rss.peak_mb(), 1), "status": "cut" if cut else "done"}
        if cut and events and total_events:
            row["full_events"] = total_events
            row["full_s_est"] = round(seconds * total_events / events, 1)
        row.update(extra)
        print(json.dumps({"phase_done": row}), flush=True)
        return row


def table1_flop(model_cfg, data, hidden: int) -> dict:
    """Multiply-adds per event of training and evaluation at `hidden` units (see the module
    docstring), counted on the model built on the meta device."""
    import torch
    from omegaconf import OmegaConf

    from seqexp.run.experiment import build_model

    spec = OmegaConf.to_container(model_cfg, resolve=True)
    spec["hidden_size"] = hidden
    with torch.device("meta"):
        model = build_model(spec, data)
    recurrent = sum(p.numel() for p in model.parameters()  # a cell's scalars count too
                    if p.dim() == 0 or p.shape[0] not in (data.n_items, data.n_users))
    full = spec.get("loss") == "full_softmax"
    scored = data.n_items if full else spec.get("n_negatives", 0) + 1
    return {"train": 6 * (recurrent + hidden * scored),
            "eval": 2 * (recurrent + hidden * data.n_items)}


def count_prediction_events(model, phases: Phases) -> None:
    """Count the targets of each batch the evaluator hands to the model (the model contract's
    prediction_states), so that a cut evaluation knows how far it got."""
    original = model.prediction_states

    def counted(batch):
        phases.events += batch.n_targets
        return original(batch)

    model.prediction_states = counted


def imported_code(spec: dict) -> str:
    """The folder this child imported `seqexp` from; exits if it is not the `--code` checkout."""
    import seqexp

    package = Path(seqexp.__file__).resolve().parent
    if package.parent != Path(spec["code"]).resolve():
        sys.exit(f"bench_paper_shapes: error: seqexp imported from {package}, not from "
                 f"{spec['code']}: is it installed so that it wins over PYTHONPATH?")
    return str(package)


def validated_events(data, evaluator) -> tuple[object, str | None]:
    """The events validation ranks, and a note where they are not what the code in use ranks:
    code without `validation_sample` validates every event."""
    from seqexp.data import sequences

    if hasattr(sequences, "validation_sample"):
        return sequences.validation_sample(data, evaluator.val_max_scores, evaluator.seed), None
    return data, "every validation event (this code has no validation sample)"


def build_run(spec: dict, phases: Phases):
    """The config, the data (the phase "load (cache)" timed) and the model, evaluator and
    trainer of one model's run, hooked to `phases`."""
    import torch

    from seqexp.data.loading import load_dataset
    from seqexp.engine.trainer import ProgressLog, TrainingCallback
    from seqexp.run.experiment import (
        build_evaluator,
        build_model,
        build_trainer,
        configure_torch,
        seed_everything,
    )

    cfg = compose(spec["shape"], Path(spec["data"]), spec["model"], spec["overrides"],
                  Path(spec["code"]))
    seed_everything(cfg.seed)
    configure_torch(cfg.train)
    phases.start("load (cache)")
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    phases.end(data.n_events, n_items=data.n_items, n_users=data.n_users)
    if is_table1_rnn(cfg.model) and spec["logits_budget_gb"]:
        per_row = cfg.model.window * data.n_items * 4
        batch = max(1, min(cfg.train.batch_size, int(spec["logits_budget_gb"] * 2**30 // per_row)))
        cfg.train.batch_size = batch
    model = build_model(cfg.model, data).to(torch.device(spec["device"]))
    evaluator = build_evaluator(cfg)
    count_prediction_events(model, phases)

    class Cut(TrainingCallback):
        def on_batch_end(self, trainer, epoch, batches) -> None:
            if phases.over():
                raise PhaseCut

    class Counted(ProgressLog):
        def advance(self, n_events: int) -> None:
            phases.events += n_events

    trainer = build_trainer(cfg, evaluator, callbacks=[Cut()])
    trainer.progress = Counted(False, cfg.train.epochs)
    return cfg, data, model, evaluator, trainer


def run_model(spec: dict) -> None:
    """One model through load (cache), fit, epochs (train + validation) and test."""
    import numpy as np

    from seqexp.core.stopping import EvaluationStopped
    from seqexp.engine.evaluator import phase_targets
    from seqexp.engine.trainer import training_pairs

    phases = Phases(spec["cap_s"])
    info = {"seqexp": imported_code(spec)}
    cfg, data, model, evaluator, trainer = build_run(spec, phases)
    phases.start("fit")
    model.fit(data)
    phases.end(data.stats["train_events"])
    info["batch_size"] = int(cfg.train.batch_size)
    if is_table1_rnn(cfg.model):
        info["flop_per_event"] = {h: table1_flop(cfg.model, data, h)
                                  for h in (int(cfg.model.hidden_size), TABLE1["hidden_size"])}
    print(json.dumps({"info": info}), flush=True)

    def evaluate(phase: str, name: str) -> None:
        ranked, note = validated_events(data, evaluator) if phase == "val" else (data, None)
        extra = {"note": note} if note else {}
        phases.start(name, phase_targets(ranked, phase))
        try:
            counts = evaluator.rank_counts(model, data, phase, phases.stop_check)
        except EvaluationStopped:
            phases.end(phase_targets(ranked, phase), cut=True, **extra)
            return
        metrics = counts.metrics(evaluator.cutoffs)
        phases.end(len(counts.greater), mrr_at_20=metrics.get("mrr_at_20"),
                   recall_at_20=metrics.get("recall_at_20"), **extra)

    if model.trainable:
        optimizer, rng = trainer.make_optimizer(model), np.random.default_rng(cfg.seed)
        for epoch in range(1, spec["epochs"] + 1):
            phases.start(f"epoch {epoch} train", training_pairs(data))
            try:
                trainer.train_epoch(model, data, optimizer, rng, epoch)
                phases.end(phases.events)
            except PhaseCut:
                phases.end(training_pairs(data), cut=True)
            evaluate("val", f"epoch {epoch} validation")
    else:
        evaluate("val", "validation")
    evaluate("test", "test")


def load_twice(spec: dict) -> None:
    """`load_dataset` from the raw file (the cache emptied first), timed; the parent runs this
    twice, so that the second child reads the cache the first wrote."""
    from seqexp.data.loading import load_dataset

    imported_code(spec)
    cfg = compose(spec["shape"], Path(spec["data"]), "pop", [], Path(spec["code"]))
    phases = Phases(None)
    phases.start(spec["phase"])
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    phases.end(data.stats["raw_events"] if spec["phase"].endswith("raw") else data.n_events,
               **{k: data.stats[k] for k in ("n_items", "n_users", "train_events", "val_events",
                                             "test_events", "raw_malformed_lines")})


# ---------------------------------------------------------------------------- the parent process
def kill_limit(args: argparse.Namespace) -> float | None:
    """Seconds after which a phase still running is killed: --fit-limit-s, else 3 x the cap +
    120 s (a cut phase ends soon after the cap; a closed-form fit cannot be cut); None: never."""
    if args.fit_limit_s:
        return args.fit_limit_s
    return None if args.phase_cap_s is None else 3 * args.phase_cap_s + 120


def run_child(spec: dict, kill_after_s: float | None) -> tuple[list[dict], dict, str | None]:
    """Run one child; its phase rows, its info line and an error (None: it finished)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [spec["code"], os.environ.get("PYTHONPATH")]))}  # its seqexp comes first
    child = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows, info, started, phase = [], {}, time.monotonic(), None
    buffer = ""
    while True:
        ready, _, _ = select.select([child.stdout], [], [], 1.0)
        if ready:
            line = child.stdout.readline()
            if not line:
                break
            buffer = line.strip()
            message = json.loads(buffer) if buffer.startswith("{") else {}
            if "start" in message:
                phase, started = message["start"], time.monotonic()
                print(f"  {spec.get('model', spec['shape'])}: {phase} ...", flush=True)
            elif "phase_done" in message:
                rows.append(message["phase_done"])
                phase = None
                print_row(spec.get("model", "-"), message["phase_done"])
            elif "info" in message:
                info = message["info"]
        if phase and kill_after_s and time.monotonic() - started > kill_after_s:
            child.send_signal(signal.SIGKILL)
            child.wait()
            seconds = round(time.monotonic() - started, 1)
            row = {"phase": phase, "seconds": seconds, "status": "killed",
                   "note": f"no progress report inside; killed after {seconds} s"}
            rows.append(row)
            print_row(spec.get("model", "-"), row)
            return rows, info, None
    child.wait()
    error = None
    if child.returncode != 0:
        error = (child.stderr.read().strip().splitlines() or ["?"])[-1]
        print(f"  {spec.get('model', spec['shape'])}: FAILED (exit {child.returncode}): {error}",
              flush=True)
    return rows, info, error


def print_row(model: str, row: dict) -> None:
    rate = row.get("events_per_s")
    est = f"  full ~{row['full_s_est']:,.0f} s (est.)" if "full_s_est" in row else ""
    print(f"  {model:<17} {row['phase']:<22} {row['seconds']:>9,.1f} s "
          f"{row.get('events') or 0:>12,} ev {rate or 0:>12,.0f} ev/s "
          f"{row.get('peak_rss_mb') or 0:>8,.0f} MB  {row['status']}{est}", flush=True)


def table1_estimate(rows: list[dict], info: dict) -> dict | None:
    """Each RNN phase's full time scaled to Table 1's hidden size by the FLOP ratio."""
    flop = info.get("flop_per_event")
    if not flop:
        return None
    measured, table1 = (flop[key] for key in sorted(flop, key=int))
    estimate = {}
    for row in rows:
        kind = "train" if row["phase"].endswith("train") else (
            "eval" if "validation" in row["phase"] or row["phase"] == "test" else None)
        full_s = row.get("full_s_est", row["seconds"] if row["status"] == "done" else None)
        if kind and full_s:
            estimate[row["phase"]] = round(full_s * table1[kind] / measured[kind], 1)
    return {"flop_per_event": flop, "full_phase_s_at_table1": estimate}


def report_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(shape, model, row) of every row a report's table shows: the load rows (model "(data)"),
    each model's phases, the overrides left out, its failure and its extrapolation to Table 1's
    hidden size."""
    entries = []
    for shape, result in report["shapes"].items():
        entries += [(shape, "(data)", row) for row in result["load"]]
        for model, entry in result["models"].items():
            entries += [(shape, model, row) for row in entry["phases"] + summary_rows(entry)]
    return entries


def summary_rows(entry: dict) -> list[dict]:
    """A model's rows after its phases, as the table shows them (their text in "status")."""
    rows = []
    if entry.get("overrides_left_out"):
        left_out = ", ".join(entry["overrides_left_out"])
        rows.append({"phase": "(config)",
                     "status": f"left out: {left_out} (not in this code's config)"})
    if entry.get("error"):
        rows.append({"phase": "-", "status": f"failed: {entry['error']}"})
    estimate = (entry.get("table1_extrapolation") or {}).get("full_phase_s_at_table1")
    if estimate:
        rows.append({"phase": "at hidden 1000 (est.)", "status": "; ".join(
            f"{phase} ~{seconds:,.0f} s" for phase, seconds in estimate.items())})
    return rows


def row_note(row: dict) -> str:
    """A row's status (unless done), its extrapolated full time and its note."""
    note = row["status"] if row["status"] != "done" else ""
    if "full_s_est" in row:
        note += f"; full phase ~{row['full_s_est']:,.0f} s (extrapolated)"
    if row.get("note"):
        note += f"; {row['note']}"
    return note.removeprefix("; ")


def row_numbers(row: dict, keys: tuple[str, ...]) -> list[str]:
    """A row's figures as the table shows them ("" where it has none)."""
    shown = {**row, "events_per_s": row.get("events_per_s") if (
        row.get("seconds") or 0) >= 0.05 else None}  # no rate of a near-empty phase
    return [format(shown[key], ",.1f" if key == "seconds" else ",.0f")
            if shown.get(key) is not None else "" for key in keys]


def markdown(report: dict) -> str:
    """The report as the Markdown table of docs/benchmarks.md: one row per model and phase."""
    title = [f"*{report['label']}*", ""] if report.get("label") else []
    lines = [*title, "| shape | model | phase | wall s | events | events/s | peak RSS MB | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for shape, model, row in report_rows(report):
        numbers = " | ".join(row_numbers(row, ("seconds", "events", "events_per_s",
                                                "peak_rss_mb")))
        lines.append(f"| {shape} | {model} | {row['phase']} | {numbers} | {row_note(row)} |")
    return "\n".join(lines)


def compare_markdown(before: dict, after: dict) -> str:
    """Two reports as one table: per (shape, model, phase) row, the wall time, events/s, peak RSS
    and note of each, and after's events/s over before's. Rows are matched by shape, model and
    phase; a row only one report has leaves the other's columns empty."""
    names = [report.get("label") or default for report, default in
             ((before, "before"), (after, "after"))]
    keys = ("seconds", "events_per_s", "peak_rss_mb")
    group = ("wall s", "events/s", "peak RSS MB", "note")
    header = [f"{name} {column}" for name in names for column in group]
    lines = [f"| shape | model | phase | {' | '.join(header)} | events/s ratio |",
             "| --- | --- | --- | " + "---: | ---: | ---: | --- | " * 2 + "---: |"]
    sides = [{(shape, model, row["phase"]): row for shape, model, row in report_rows(report)}
             for report in (before, after)]
    order = list(dict.fromkeys([*sides[0], *sides[1]]))
    for key in order:
        cells = []
        for side in sides:
            row = side.get(key)
            cells += [*row_numbers(row, keys), row_note(row)] if row else ["", "", "", ""]
        rates = [side.get(key, {}).get("events_per_s") for side in sides]
        ratio = f"{rates[1] / rates[0]:,.2f}x" if all(rates) and all(
            side[key].get("seconds", 0) >= 0.05 for side in sides) else ""
        lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def arguments(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="the folder make_paper_shapes.py wrote")
    parser.add_argument("--out", type=Path, default=Path("bench_paper_shapes.json"))
    parser.add_argument("--shapes", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--phase-cap-s", type=float, default=None,
                        help="cut a phase after this many seconds and extrapolate it")
    parser.add_argument("--fit-limit-s", type=float, default=None,
                        help="kill a phase still running after this many seconds (a "
                             "closed-form fit, which the cap cannot cut; default: 3 x the "
                             "cap + 120 s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the trained models")
    parser.add_argument("--rnn-hidden", type=int, default=100)
    parser.add_argument("--logits-budget-gb", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-load", action="store_true",
                        help="keep the existing bench cache and skip the two load rows")
    parser.add_argument("-o", "--override", nargs="*", default=[],
                        help="extra config overrides for every model (key=value)")
    parser.add_argument("--code", type=Path, default=ROOT, metavar="DIR",
                        help="the checkout whose seqexp and conf/ are measured (default: this one)")
    parser.add_argument("--label", help="a name for this run, stored in the JSON (e.g. before)")
    parser.add_argument("--markdown", type=Path, nargs="+", metavar="JSON",
                        help="print the Markdown table of a written report, or of two (before, "
                             "after) side by side, and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = arguments(argv)
    if args.markdown:
        if len(args.markdown) > 2:
            parser.error("--markdown takes one report, or two to compare (before, after)")
        reports = [json.loads(path.read_text()) for path in args.markdown]
        print(markdown(*reports) if len(reports) == 1 else compare_markdown(*reports))
        return 0
    if args.child:
        spec = json.loads(args.child)
        (run_model if "model" in spec else load_twice)(spec)
        return 0
    if args.data is None:
        parser.error("--data is required")
    missing = [str(args.data / s / FILES[s]) for s in args.shapes
               if not (args.data / s / FILES[s]).is_file()]
    if missing:
        parser.error(f"missing {', '.join(missing)}: run scripts/make_paper_shapes.py "
                     f"{args.data} first")
    args.code = args.code.resolve()
    if not all((args.code / part).is_file() for part in ("seqexp/__init__.py", "conf/config.yaml")):
        parser.error(f"--code {args.code}: no seqexp/__init__.py and conf/config.yaml there "
                     "(give a checkout of seqexp)")
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "label": args.label,
              "code": str(args.code), "code_commit": code_commit(args.code),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version()},
              "phase_cap_s": args.phase_cap_s, "shapes": {}}
    failed = False
    for shape in args.shapes:
        failed |= run_shape(shape, args, report)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


def code_commit(code: Path) -> str | None:
    """The commit checked out at `code`, "+ changes" when its files differ from it (None: `code`
    is not the top of a git checkout)."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    if git("rev-parse", "--show-toplevel") != str(code):
        return None
    return f"{git('rev-parse', 'HEAD')}{' + changes' if git('status', '--porcelain') else ''}"


def run_shape(shape: str, args: argparse.Namespace, report: dict) -> bool:
    """The load rows and every model on one shape, into `report`; whether a child failed."""
    print(f"{shape}:", flush=True)
    result = report["shapes"][shape] = {"load": [], "models": {}}
    base = {"shape": shape, "data": str(args.data.resolve()), "code": str(args.code)}
    failed = False
    if not args.skip_load:
        shutil.rmtree(args.data / shape / "bench_cache", ignore_errors=True)
        for phase in ("load (raw)", "load (cache)"):
            rows, _, error = run_child({**base, "phase": phase}, None)
            result["load"] += rows
            failed |= error is not None
    for model in args.models:
        spec = {**base, "model": model, "cap_s": args.phase_cap_s, "epochs": args.epochs,
                "device": args.device, "logits_budget_gb": args.logits_budget_gb,
                "overrides": list(args.override)}
        if model_is_table1_rnn(shape, args.data, model, args.code):
            spec["overrides"].append(f"model.hidden_size={args.rnn_hidden}")
        spec["overrides"], left_out = code_overrides(spec, args.data, args.code)
        if left_out:
            print(f"  {model}: left out (keys this code's config lacks): {left_out}", flush=True)
        rows, info, error = run_child(spec, kill_limit(args))
        failed |= error is not None
        entry = {"phases": rows, **info, **({"error": error} if error else {}),
                 **({"overrides_left_out": left_out} if left_out else {})}
        estimate = table1_estimate(rows, info)
        if estimate:
            entry["table1_extrapolation"] = estimate
            print(f"  {model}: at Table 1's hidden 1000 (FLOP ratio, est.): "
                  f"{estimate['full_phase_s_at_table1']}", flush=True)
        result["models"][model] = entry
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # a partial run shows
    return failed


def model_is_table1_rnn(shape: str, data: Path, model: str, code: Path) -> bool:
    """Whether the model's config is one of Table 1's RNNs (model.hidden_size and .window)."""
    return is_table1_rnn(compose(shape, data, model, [], code).model)
def code_overrides(spec: dict, data: Path, code: Path) -> tuple[list[str], list[str]]:
    """The run's overrides that the code's config takes, and those left out: `key=value` where
    this checkout's config has the key and the code's has not (a key newer than the code, such
    as `eval.val_max_scores` when measuring older code). Another unknown key stays, and fails
    as in seqexp."""
    if code == ROOT:
        return spec["overrides"], []
    from omegaconf import OmegaConf

    absent = object()
    theirs, ours = (compose(spec["shape"], data, spec["model"], [], where)
                    for where in (code, ROOT))
    kept, left_out = [], []
    for override in spec["overrides"]:
        key = override.split("=", 1)[0]
        newer = ("=" in override and OmegaConf.select(theirs, key, default=absent) is absent
                 and OmegaConf.select(ours, key, default=absent) is not absent)
        (left_out if newer else kept).append(override)
    return kept, left_out


def is_table1_rnn(model_cfg) -> bool:
    return "window" in model_cfg and "hidden_size" in model_cfg


if __name__ == "__main__":
    sys.exit(main())
