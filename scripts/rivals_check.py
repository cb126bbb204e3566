"""The paper's user-based GRUs against their rivals, under three protocols, on MovieLens 100K.

    python scripts/rivals_check.py [--path FILE] [--out DIR] [--seeds 1 2 3]
                                   [--models gru sasrec ...] [--protocols seen ...]
                                   [--report-only]

Every model of MODELS (gru, the three user-based GRUs, hrnn, sasrec, itemknn, pop), each seed,
through `python -m seqexp.apps.cli` under each protocol of PROTOCOLS, each protocol in its own
MLflow experiment `ml100k-<protocol>` of one store (OUT/mlflow.db):

- `seen`: split=user_tail, items the user has seen stay rankable (seqexp's default);
- `exclude_seen`: split=user_tail with eval.exclude_seen=true (a user's earlier items are not
  ranked, except the target);
- `last_session`: split=last_session, each user's last session (30-minute gaps) is test.

Then `seqexp-report --experiment ml100k-<protocol> --baseline gru` gives each model's user-level
paired tests against gru with Holm's correction. Data as in scripts/real_data_check.py (the
RecBole wheel's copy of ML-100K, in the cache folder, never in the repository). Writes
OUT/rivals.json and OUT/rivals.md; each run is recorded in its folder under OUT/runs/, so an
interrupted check resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from real_data_check import COMMON, cache_folder, obtain_udata, recorded_run, report_rows

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["gru", "linear_ugru", "rectified_ugru", "attentional_ugru", "hrnn", "sasrec",
          "itemknn", "pop"]
PROTOCOLS: dict[str, list[str]] = {
    "seen": ["split=user_tail"],
    "exclude_seen": ["split=user_tail", "eval.exclude_seen=true"],
    "last_session": ["split=last_session"],
}
# The sizes of scripts/real_data_check.py: the RNNs (hrnn too) with hidden 100 and batch 32, up
# to 20 epochs with early stopping on validation MRR@20 (patience 3). sasrec: the paper's model
# sizes (conf/model/sasrec.yaml) with batch 32 and lr 0.005 instead of its 128 and 0.001, which
# on ML-100K's ~2,400 training rows are too few steps (docs/real-data.md), up to 30 epochs.
# itemknn and pop with their defaults.
_RNN = ["model.hidden_size=100", "train.batch_size=32", "train.epochs=20"]
SETTINGS: dict[str, list[str]] = {model: [] for model in MODELS} | {
    model: _RNN for model in ("gru", "linear_ugru", "rectified_ugru", "attentional_ugru",
                              "hrnn")} | {
    "sasrec": ["train.batch_size=32", "train.lr=0.005", "train.epochs=30"]}


def run_one(model: str, seed: int, protocol: str, udata: Path, out: Path,
            report_only: bool) -> dict | None:
    run_dir = out / "runs" / f"{protocol}-{model}-seed{seed}"
    return recorded_run(run_dir, [] if report_only else [
        f"model={model}", "dataset=ml100k", f"dataset.path={udata}", f"seed={seed}", *COMMON,
        *SETTINGS[model], *PROTOCOLS[protocol], f"mlflow.experiment=ml100k-{protocol}",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"hydra.run.dir={run_dir}",
        f"paths.data_dir={cache_folder()}"])


def report(protocol: str, out: Path) -> list[dict]:
    """seqexp-report on one protocol's experiment; its CSV rows."""
    return report_rows(f"ml100k-{protocol}", out)


def _tests(found: dict) -> list[str]:
    """The report's difference to gru and its Holm-corrected p, for MRR@20 and Recall@20."""
    cells = []
    for metric in ("mrr_at_20", "recall_at_20"):
        diff = next((v for k, v in found.items() if k.endswith(f"{metric}_diff_vs")), "")
        p = next((v for k, v in found.items() if k.endswith(f"{metric}_p_holm")), "")
        cells += [f"{float(diff):+.4f}" if diff else "", f"{float(p):.3f}" if p else ""]
    return cells


def markdown(summary: dict, reports: dict[str, list[dict]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| protocol | model | seeds | MRR@20 | Recall@20 | MRR@20 vs gru | p (Holm) | "
             "Recall@20 vs gru | p (Holm) | best epoch | s per run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for protocol, models in summary.items():
        rows = {row["model"]: row for row in reports.get(protocol, [])}
        for model, row in models.items():
            tests = _tests(rows.get(model, {}))
            lines.append(f"| {protocol} | {model} | {row['seeds']} | {row['mrr']:.4f} ± "
                         f"{row['mrr_std']:.4f} | {row['recall']:.4f} ± {row['recall_std']:.4f} "
                         f"| {' | '.join(tests)} | {row['best_epoch']:.1f} | "
                         f"{row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def summarise(runs: list[dict]) -> dict:
    mrr = [run["test_mrr_at_20"] for run in runs]
    recall = [run["test_recall_at_20"] for run in runs]
    spread = statistics.stdev if len(runs) > 1 else (lambda _: 0.0)
    return {"seeds": len(runs), "mrr": statistics.fmean(mrr), "mrr_std": spread(mrr),
            "recall": statistics.fmean(recall), "recall_std": spread(recall),
            "best_epoch": statistics.fmean(float(run["best_epoch"]) for run in runs),
            "wall_s": statistics.fmean(run["wall_s"] for run in runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="a local u.data or RecBole ml-100k.inter")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "rivals_check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the runs already recorded in --out, start no run")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    udata = obtain_udata(args.path)
    summary: dict[str, dict[str, dict]] = {}
    # protocol by protocol, in the order given: an interrupted check has whole protocols
    for seed in args.seeds:
        for protocol in args.protocols:
            for model in args.models:
                run = run_one(model, seed, protocol, udata, out, args.report_only)
                if run is not None:
                    summary.setdefault(protocol, {}).setdefault(model, []).append(run)
                    print(f"{protocol:12s} {model:16s} seed {seed}: MRR@20 "
                          f"{run['test_mrr_at_20']:.4f} Recall@20 {run['test_recall_at_20']:.4f}"
                          f" ({run['wall_s']:.0f} s)", flush=True)
    summary = {protocol: {model: summarise(runs) for model, runs in sorted(
        models.items(), key=lambda item: MODELS.index(item[0]))}
        for protocol, models in sorted(summary.items(), key=lambda i: list(PROTOCOLS).index(i[0]))}
    reports = {protocol: report(protocol, out) for protocol in summary}
    command = "python scripts/rivals_check.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "settings": SETTINGS, "common": COMMON,
               "protocols": PROTOCOLS, "summary": summary, "reports": reports}
    (out / "rivals.json").write_text(json.dumps(payload, indent=1))
    (out / "rivals.md").write_text(markdown(summary, reports, command.strip()))
    print((out / "rivals.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
