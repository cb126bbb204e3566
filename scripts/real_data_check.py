"""Real MovieLens 100K through seqexp's own entry point, with an independent check of the protocol.

    python scripts/real_data_check.py [--path FILE] [--out DIR] [--seeds 1 2 3] [--models ...]

Data: `--path` names a local ML-100K `u.data` or a RecBole `ml-100k.inter`; without it the
script runs `pip download --no-deps recbole==1.2.1` (a wheel from PyPI, into a cache folder) and
takes the wheel's `recbole/dataset_example/ml-100k/ml-100k.inter`, which holds the 100,000 rows
of `u.data`, in the same order, under a one-line header. Either way the ratings end up as a
`u.data` file in the cache folder (`$SEQEXP_DATA_DIR`, else ~/.cache/seqexp, under
`real_data_check/`), never in the repository.

Then, on the evaluation protocol of docs/evaluation.md (split=user_tail, pessimistic ranks over
the whole training vocabulary, MRR@20 / Recall@20):

1. Protocol check, `split.val_frac=0`: a separate numpy/pandas implementation of the split,
   of `pop` and `itemknn` scoring and of pessimistic ranking (nothing of seqexp's evaluator or
   models) against `seqexp model=pop|itemknn dataset=ml100k dataset.path=...`.
2. Every model (MODELS), each seed, through `python -m seqexp.apps.cli` with the settings in
   SETTINGS (default validation split: the trainable models keep the epoch with the best
   validation MRR@20). Results: OUT/real_data.json and OUT/real_data.md (mean ± std over seeds).

The exit status is 1 when the protocol check differs by more than 2 % (relative).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
RECBOLE = "recbole==1.2.1"
INTER_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
CUTOFF = 20
TEST_FRAC = 0.2
TOLERANCE = 0.02  # relative, seqexp against the independent implementation

MODELS = ["pop", "itemknn", "expdecay_knn", "mf", "seqmf", "gru", "linear_ugru",
          "rectified_ugru", "attentional_ugru", "dream"]
# Documented variants that are not the paper's models (docs/models.md): MF and FPMC with a
# learned offset for the user's seen items. Run with the models, tabulated as variants.
VARIANTS = ["mf_seen", "seqmf_seen"]
# ML-100K is small: the RNNs run with hidden 100 and batch 32 instead of Table 1's 1000/1000,
# up to 20 epochs with early stopping on validation MRR@20 (patience 3); the other models
# run with the defaults of their conf/model/*.yaml file.
_RNN = ["model.hidden_size=100", "train.batch_size=32", "train.epochs=20"]
SETTINGS: dict[str, list[str]] = {model: [] for model in MODELS + VARIANTS} | {
    model: _RNN for model in ("gru", "linear_ugru", "rectified_ugru", "attentional_ugru")}
# DREAM with the default 1800 s basket gap instead of the MovieLens presets' 0 (one basket per
# second): the row that shows what the presets' value does.
ABLATIONS: dict[str, list[str]] = {"dream": ["model.basket_gap_s=1800"]}
COMMON = ["train.num_threads=1", "train.progress=false", "mlflow.log_checkpoint=false",
          "device=cpu"]


# ------------------------------------------------------------------------------ data
def cache_folder() -> Path:
    base = os.environ.get("SEQEXP_DATA_DIR") or Path.home() / ".cache" / "seqexp"
    return Path(base) / "real_data_check"


def inter_to_udata(inter: Path, dest: Path) -> int:
    """Write RecBole's ml-100k.inter (header + `user TAB item TAB rating TAB timestamp`) as a
    headerless u.data with integer timestamps, atomically; returns the number of rows."""
    with open(inter, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
        if header != INTER_HEADER:
            raise SystemExit(f"{inter}: first line {header!r} is not the expected RecBole "
                             f"header {INTER_HEADER!r}")
        frame = pd.read_csv(handle, sep="\t", header=None,
                            names=["user", "item", "rating", "timestamp"])
    frame["timestamp"] = frame["timestamp"].astype(np.int64)
    frame["rating"] = frame["rating"].map(lambda r: f"{r:g}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    with os.fdopen(fd, "w") as out:
        frame.to_csv(out, sep="\t", header=False, index=False)
    os.replace(tmp, dest)
    return len(frame)


def obtain_udata(path: Path | None) -> Path:
    """A u.data file: `path` itself, `path` converted when it is a .inter file, or the RecBole
    wheel's copy downloaded into the cache folder."""
    folder = cache_folder()
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().rstrip("\r\n")
        if first != INTER_HEADER:
            return path
        dest = folder / "u.data"
        inter_to_udata(path, dest)
        return dest
    dest = folder / "u.data"
    if dest.is_file():
        return dest
    wheel_dir = folder / "wheel"
    wheels = sorted(wheel_dir.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", RECBOLE,
                        "-d", str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob("recbole-1.2.1-*.whl"))
    inter = folder / "ml-100k.inter"
    with zipfile.ZipFile(wheels[0]) as wheel:
        inter.write_bytes(wheel.read(INTER_MEMBER))
    inter_to_udata(inter, dest)
    inter.unlink()
    return dest


# ------------------------------------------------------------------------------ independent
def independent_protocol(udata: Path, neighbours: int = 100) -> dict[str, dict[str, float]]:
    """The evaluation protocol (docs/evaluation.md) written again from its words, in plain
    numpy/pandas.

    Each user's ratings in (timestamp, file row) order; the last floor(0.2 L) are test, the rest
    train (no validation). Vocabulary = items with a training rating; test ratings of other
    items are removed from the sequences (and counted). Every remaining test rating is ranked
    against the whole vocabulary from everything the user rated before it: rank = number of
    items whose score is >= the true item's score (the true item included), i.e. pessimistic.
    pop: score = training count. itemknn: score = cosine(last item, i) over the binary
    user x item training matrix, kept for the `neighbours` most similar items of the last item
    (self excluded), 0 elsewhere; `itemknn+pop` adds 1e-6 x count / max count to break the ties
    among the rest by popularity (seqexp's `popularity_tiebreak`, its default).
    """
    frame = pd.read_csv(udata, sep="\t", header=None, names=["user", "item", "rating", "ts"])
    frame["row"] = np.arange(len(frame))
    frame = frame.sort_values(["user", "ts", "row"]).reset_index(drop=True)
    length = frame.groupby("user")["item"].transform("size").to_numpy()
    position = frame.groupby("user").cumcount().to_numpy()
    n_test = np.floor(length * TEST_FRAC + 1e-9).astype(int)
    is_test = position >= length - n_test
    vocabulary = np.unique(frame.loc[~is_test, "item"].to_numpy())
    known = np.isin(frame["item"].to_numpy(), vocabulary)
    frame, is_test = frame[known].reset_index(drop=True), is_test[known]
    item = np.searchsorted(vocabulary, frame["item"].to_numpy())
    user = pd.factorize(frame["user"])[0]
    n_items, n_users = len(vocabulary), user.max() + 1

    train_matrix = np.zeros((n_users, n_items))
    train_matrix[user[~is_test], item[~is_test]] = 1.0
    counts = np.bincount(item[~is_test], minlength=n_items).astype(np.float64)
    overlap = train_matrix.T @ train_matrix
    norms = np.sqrt(np.diag(overlap))
    cosine = overlap / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(cosine, 0.0)
    cut = np.sort(cosine, axis=1)[:, -neighbours][:, None]  # the k-th largest per row
    # Keep the top k per row; where the k-th value ties, the lowest item ids win (any choice
    # among exact ties at the boundary is as good).
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :neighbours]
    top = np.zeros_like(cosine)
    np.put_along_axis(top, order, np.take_along_axis(cosine, order, 1), 1)
    del cut

    # Test ratings, each with the item rated just before it (same user; never the first rating,
    # which is always train since floor(0.2 L) < L).
    targets = np.flatnonzero(is_test)
    previous = item[targets - 1]
    truth = item[targets]
    prior = 1e-6 * counts / counts.max()

    def metrics(scores_of) -> dict[str, float]:
        ranks = np.empty(len(targets))
        for lo in range(0, len(targets), 2048):
            part = slice(lo, lo + 2048)
            scores = scores_of(part)
            true_score = scores[np.arange(scores.shape[0]), truth[part]]
            ranks[part] = (scores >= true_score[:, None]).sum(1)
        hit = ranks <= CUTOFF
        return {"mrr_at_20": float(np.where(hit, 1.0 / ranks, 0.0).mean()),
                "recall_at_20": float(hit.mean()), "test_events": int(len(targets))}

    return {
        "pop": metrics(lambda part: np.broadcast_to(counts, (len(truth[part]), n_items))),
        "itemknn_bare": metrics(lambda part: top[previous[part]]),
        "itemknn": metrics(lambda part: top[previous[part]] + prior),
        "_data": {"n_users": int(n_users), "n_items": int(n_items),
                  "train_events": int((~is_test).sum()), "test_events": int(len(targets)),
                  "test_oov_dropped": int((~known).sum())},
    }


def basket_facts(udata: Path, gap_s: int = 1800) -> dict[str, float]:
    """Why DREAM's default basket does not fit MovieLens: the share of users whose ratings
    form one single basket with a `gap_s` gap, and of ratings made in the same second as the
    user's previous one."""
    frame = pd.read_csv(udata, sep="\t", header=None, names=["user", "item", "rating", "ts"])
    frame = frame.sort_values(["user", "ts"], kind="stable")
    gap = frame.groupby("user")["ts"].diff()
    baskets = (gap.isna() | (gap > gap_s)).groupby(frame["user"]).sum()
    return {f"users_with_one_basket_at_{gap_s}s": float((baskets == 1).mean()),
            "ratings_in_the_same_second_as_the_previous": float((gap == 0).sum() / len(frame))}


def learned_seen_bias(out: Path, model: str) -> list[float]:
    """β (model.seen_bias) of each seed's best checkpoint of `model`."""
    values = []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", row_name(model, [])).strip("_")
    for checkpoint in sorted((out / "runs").glob(f"{slug}-seed*/checkpoints/best.pt")):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # the weights (beside the config, ids, histories)
        if "seen_bias" in state:
            values.append(float(state["seen_bias"]))
    return values


# ------------------------------------------------------------------------------ seqexp runs
REPORT_ONLY = False  # --report-only: tabulate the runs already recorded, start none


def run_seqexp(model: str, seed: int, udata: Path, out: Path,
               extra: list[str]) -> dict | None:
    """One `python -m seqexp.apps.cli` run: its metrics.json plus the wall time and the command,
    also kept as record.json in the run folder. A run folder that already holds a record is
    reused (an interrupted check resumes; several `--models` subsets can run side by side into
    one --out folder, each model with its own MLflow store)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", row_name(model, extra)).strip("_")
    run_dir = out / "runs" / f"{slug}-seed{seed}"
    return recorded_run(run_dir, [] if REPORT_ONLY else [
        f"model={model}", "dataset=ml100k", f"dataset.path={udata}", f"seed={seed}", *COMMON,
        *SETTINGS[model], *extra, f"hydra.run.dir={run_dir}",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow-{model}.db",
        f"paths.data_dir={cache_folder()}"])


def recorded_run(run_dir: Path, overrides: list[str]) -> dict | None:
    """The record.json of the run in `run_dir` when there is one; else, given `overrides`, one
    `python -m seqexp.apps.cli` run with them, one torch thread, recorded there as its
    metrics.json plus the wall time and the command (none given: None, nothing is run)."""
    if (run_dir / "record.json").is_file():
        return json.loads((run_dir / "record.json").read_text())
    if not overrides:
        return None
    command = [sys.executable, "-m", "seqexp.apps.cli", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"seqexp failed ({done.returncode}): {' '.join(command)}\n"
                         f"{done.stderr[-3000:]}")
    record = json.loads((run_dir / "metrics.json").read_text())
    record |= {"wall_s": time.perf_counter() - started, "command": " ".join(command[1:])}
    (run_dir / "record.json").write_text(json.dumps(record, indent=1))
    return record


def report_rows(experiment: str, out: Path) -> list[dict]:
    """seqexp-report (paired tests against gru) on one experiment of the store out/mlflow.db,
    written to out/report-<experiment>; the rows of its CSV, which is named after it."""
    folder = out / f"report-{experiment}"
    subprocess.run(["seqexp-report", "--tracking-uri", f"sqlite:///{out}/mlflow.db",
                    "--experiment", experiment, "--baseline", "gru", "--out", str(folder)],
                   check=True, cwd=ROOT)
    with open(folder / f"{experiment}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def row_name(model: str, extra: list[str]) -> str:
    label = [*extra, "variant, not the paper's model"] if model in VARIANTS else extra
    return model + (f" ({', '.join(label)})" if label else "")


def relative_gap(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def protocol_check(udata: Path, out: Path) -> dict:
    reference = independent_protocol(udata)
    check = {"independent": reference, "seqexp": {}, "within_tolerance": True}
    for model in ("pop", "itemknn"):
        got = run_seqexp(model, 1, udata, out, ["split.val_frac=0"])
        if got is None:
            raise SystemExit(f"--report-only: no recorded protocol-check run of {model} in {out}")
        check["seqexp"][model] = {k: got[f"test_{k}"] for k in ("mrr_at_20", "recall_at_20")}
        for key in ("mrr_at_20", "recall_at_20"):
            gap = relative_gap(got[f"test_{key}"], reference[model][key])
            check["within_tolerance"] &= gap <= TOLERANCE
            print(f"protocol check {model:8s} {key}: independent {reference[model][key]:.4f} "
                  f"seqexp {got[f'test_{key}']:.4f} (gap {100 * gap:.2f} %)", flush=True)
    return check


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        model = name.split(" ")[0]
        row = {"model": name, "seeds": len(runs), "settings": " ".join(SETTINGS[model])}
        for key in ("mrr_at_20", "recall_at_20", "best_epoch", "wall_s"):
            name = f"test_{key}" if key.endswith("_20") else key
            values = [float(run[name]) for run in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict], check: dict | None, command: str, facts: dict) -> str:
    lines = [f"Command: `{command}`", ""]
    if check is not None:
        lines += ["Protocol check (`split.val_frac=0`, one run):", "",
                  "| model | independent MRR@20 | seqexp MRR@20 | independent Recall@20 | "
                  "seqexp Recall@20 |", "| --- | ---: | ---: | ---: | ---: |"]
        for model in ("pop", "itemknn"):
            ref, got = check["independent"][model], check["seqexp"][model]
            lines.append(f"| {model} | {ref['mrr_at_20']:.4f} | {got['mrr_at_20']:.4f} | "
                         f"{ref['recall_at_20']:.4f} | {got['recall_at_20']:.4f} |")
        bare = check["independent"]["itemknn_bare"]
        lines += ["", f"(independent itemknn without the popularity tie-break: MRR@20 "
                      f"{bare['mrr_at_20']:.4f}, Recall@20 {bare['recall_at_20']:.4f})", ""]
    lines += ["Models, default split (val_frac 0.1), mean ± std over the seeds run:", "",
              "| model | seeds | MRR@20 | Recall@20 | best epoch | s per run | settings |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['seeds']} | {row['mrr_at_20']:.4f} ± "
            f"{row['mrr_at_20_std']:.4f} | "
            f"{row['recall_at_20']:.4f} ± {row['recall_at_20_std']:.4f} | "
            f"{row['best_epoch']:.1f} | {row['wall_s']:.0f} | {row['settings'] or 'defaults'} |")
    lines.append("")
    for model in VARIANTS:
        if facts.get(f"{model}_seen_bias"):
            values = ", ".join(f"{v:.2f}" for v in facts[f"{model}_seen_bias"])
            lines.append(f"Learned seen-item offset β of `{model}` per seed: {values}.  ")
    lines.append(", ".join(f"{k.replace('_', ' ')}: {100 * v:.1f} %" for k, v in facts.items()
                           if not k.endswith("seen_bias")) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="a local u.data or RecBole ml-100k.inter")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_data_check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=MODELS + VARIANTS,
                        choices=MODELS + VARIANTS)
    parser.add_argument("--skip-check", action="store_true", help="no protocol check")
    parser.add_argument("--check-only", action="store_true", help="only the protocol check")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the runs already recorded in --out, start no run")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the ablation rows (ABLATIONS: dream's 1800 s gap)")
    args = parser.parse_args()
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    udata = obtain_udata(args.path)
    print(f"ratings: {udata}", flush=True)
    check = None if args.skip_check else protocol_check(udata, out)
    results: dict[str, list[dict]] = {}
    if not args.check_only:
        jobs = [(model, []) for model in args.models]
        if not args.no_ablations:
            jobs += [(model, extra) for model, extra in ABLATIONS.items() if model in args.models]
        for model, extra in jobs:
            for seed in args.seeds:
                run = run_seqexp(model, seed, udata, out, extra)
                if run is None:
                    continue
                name = row_name(model, extra)
                results.setdefault(name, []).append(run)
                print(f"{name:17s} seed {seed}: MRR@20 {run['test_mrr_at_20']:.4f} "
                      f"Recall@20 {run['test_recall_at_20']:.4f} best epoch "
                      f"{run['best_epoch']} ({run['wall_s']:.0f} s)", flush=True)
    rows = summarise(results)
    facts = basket_facts(udata) | {f"{model}_seen_bias": learned_seen_bias(out, model)
                                   for model in VARIANTS if row_name(model, []) in results}
    command = "python scripts/real_data_check.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "settings": SETTINGS, "common": COMMON, "ablations": ABLATIONS,
               "protocol_check": check, "summary": rows, "facts": facts, "runs": results}
    (out / "real_data.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "real_data.md").write_text(markdown(rows, check, command.strip(), facts))
    print((out / "real_data.md").read_text())
    return 0 if check is None or check["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
