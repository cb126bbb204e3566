"""Whole-history against session-scoped RNN states on real MovieLens 100K (model.session_gap_s).

    python scripts/session_check.py [--path FILE] [--out DIR] [--seeds 1 2 3] [--gap 1800]
                                    [--models gru linear_ugru ...] [--settings whole sessions]
                                    [--report-only]

The paper's user-based GRUs should help most where the hidden state cannot remember the user:
when it restarts at every session, the user vector v is the only memory across sessions. This
runs `gru` and the three user-based GRUs with each seed in two settings, each in its own MLflow
experiment of one store (OUT/mlflow.db):

- `whole`: one state over each user's whole history (`model.session_gap_s=null`, the default);
- `sessions`: the state restarts after a gap of more than `--gap` seconds
  (`model.session_gap_s=GAP`; 1800 s, the 30-minute session gap of session-based
  recommenders, by default).

Data as in scripts/real_data_check.py (the RecBole wheel's copy of ML-100K, in the cache
folder). Then `seqexp-report --experiment ml100k-<setting> --baseline gru` tabulates each
setting with the paired user-level tests of every user-based GRU against `gru`. Writes
OUT/session_check.json and OUT/session_check.md (mean ± std over seeds, the report's
differences, p-values after Holm's correction, and the session statistics of the data).
Each run is recorded in its folder under OUT/runs/, so an interrupted check resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from real_data_check import COMMON, TEST_FRAC, cache_folder, obtain_udata, recorded_run, report_rows

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["gru", "linear_ugru", "rectified_ugru", "attentional_ugru"]
# ML-100K is small: hidden 100 and batch 64 instead of Table 1's 1000/1000, at most 10 epochs
# with early stopping on the validation MRR@20 (patience 3).
RNN = ["model.hidden_size=100", "train.batch_size=64", "train.epochs=10"]
SETTINGS = ("whole", "sessions")
OTHER_GAPS = (600.0, 3600.0, 86400.0)


def session_facts(udata: Path, gap_s: float) -> dict[str, float]:
    """How `gap_s` splits ML-100K: sessions, their mean length, users with more than one, and
    the share of test ratings (each user's last floor(0.2 L), as split=user_tail) that lie in
    a later session than the user's first, where the two settings' states differ."""
    frame = pd.read_csv(udata, sep="\t", header=None, names=["user", "item", "rating", "ts"])
    frame["row"] = np.arange(len(frame))
    frame = frame.sort_values(["user", "ts", "row"]).reset_index(drop=True)
    gap = frame.groupby("user")["ts"].diff()
    starts = gap.isna() | (gap > gap_s)
    session = starts.groupby(frame["user"]).cumsum()  # 1 for the user's first session
    per_user = starts.groupby(frame["user"]).sum()
    length = frame.groupby("user")["item"].transform("size").to_numpy()
    position = frame.groupby("user").cumcount().to_numpy()
    is_test = position >= length - np.floor(length * TEST_FRAC + 1e-9).astype(int)
    return {"gap_s": gap_s, "sessions": int(starts.sum()),
            "mean_session_length": float(len(frame) / starts.sum()),
            "users": int(len(per_user)), "users_with_several_sessions": int((per_user > 1).sum()),
            "test_ratings": int(is_test.sum()),
            "test_ratings_after_the_first_session": int((is_test & (session > 1)).sum()),
            "test_ratings_starting_a_session": int((is_test & starts.to_numpy()).sum())}


def run_one(model: str, seed: int, setting: str, gap_s: float, udata: Path, out: Path,
            report_only: bool) -> dict | None:
    run_dir = out / "runs" / f"{setting}-{model}-seed{seed}"
    gap = "null" if setting == "whole" else f"{gap_s:g}"
    return recorded_run(run_dir, [] if report_only else [
        f"model={model}", "dataset=ml100k", f"dataset.path={udata}", f"seed={seed}", *COMMON,
        *RNN, f"model.session_gap_s={gap}", f"mlflow.experiment=ml100k-{setting}",
        f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"hydra.run.dir={run_dir}",
        f"paths.data_dir={cache_folder()}"])


def report(setting: str, out: Path) -> list[dict]:
    """seqexp-report on one setting's experiment; its CSV rows."""
    return report_rows(f"ml100k-{setting}", out)


def markdown(summary: dict, facts: dict, reports: dict[str, list[dict]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Sessions at a gap of {facts['gap_s']:g} s: {facts['sessions']:,} sessions, "
             f"mean length {facts['mean_session_length']:.1f} ratings; "
             f"{facts['users_with_several_sessions']} of {facts['users']} users have more than "
             f"one; {facts['test_ratings_after_the_first_session']:,} of "
             f"{facts['test_ratings']:,} test ratings lie after the user's first session, "
             f"{facts['test_ratings_starting_a_session']:,} start a session. Sessions at "
             + ", ".join(f"{gap} s: {count:,}"
                         for gap, count in facts["sessions_at_other_gaps"].items()) + ".", "",
             "| setting | model | seeds | MRR@20 | Recall@20 | MRR@20 vs gru | p (Holm) | "
             "Recall@20 vs gru | p (Holm) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setting, models in summary.items():
        rows = {row["model"]: row for row in reports.get(setting, [])}
        for model, row in models.items():
            tests = []
            for metric in ("mrr_at_20", "recall_at_20"):
                found = rows.get(model, {})
                diff = next((v for k, v in found.items() if k.endswith(f"{metric}_diff_vs")), "")
                p = next((v for k, v in found.items() if k.endswith(f"{metric}_p_holm")), "")
                tests += [f"{float(diff):+.4f}" if diff else "", f"{float(p):.3f}" if p else ""]
            lines.append(f"| {setting} | {model} | {row['seeds']} | {row['mrr']:.4f} ± "
                         f"{row['mrr_std']:.4f} | {row['recall']:.4f} ± {row['recall_std']:.4f} "
                         f"| {' | '.join(tests)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="a local u.data or RecBole ml-100k.inter")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "session_check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--gap", type=float, default=1800.0, help="session gap in seconds")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the runs already recorded in --out, start no run")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    udata = obtain_udata(args.path)
    facts = session_facts(udata, args.gap)
    print(json.dumps(facts), flush=True)
    # how much the count depends on the gap
    facts["sessions_at_other_gaps"] = {f"{gap:g}": session_facts(udata, gap)["sessions"]
                                       for gap in OTHER_GAPS}
    summary: dict[str, dict[str, dict]] = {}
    for setting in args.settings:
        for model in args.models:
            runs = [run for seed in args.seeds
                    if (run := run_one(model, seed, setting, args.gap, udata, out,
                                       args.report_only)) is not None]
            for seed, run in zip(args.seeds, runs, strict=False):
                print(f"{setting:8s} {model:16s} seed {seed}: MRR@20 {run['test_mrr_at_20']:.4f}"
                      f" Recall@20 {run['test_recall_at_20']:.4f} ({run['wall_s']:.0f} s)",
                      flush=True)
            if not runs:
                continue
            mrr = [run["test_mrr_at_20"] for run in runs]
            recall = [run["test_recall_at_20"] for run in runs]
            spread = statistics.stdev if len(runs) > 1 else (lambda _: 0.0)
            summary.setdefault(setting, {})[model] = {
                "seeds": len(runs), "mrr": statistics.fmean(mrr), "mrr_std": spread(mrr),
                "recall": statistics.fmean(recall), "recall_std": spread(recall),
                "wall_s": statistics.fmean(run["wall_s"] for run in runs)}
    reports = {setting: report(setting, out) for setting in summary}
    command = "python scripts/session_check.py " + " ".join(sys.argv[1:])
    payload = {"command": command, "rnn": RNN, "common": COMMON, "facts": facts,
               "summary": summary, "reports": reports}
    (out / "session_check.json").write_text(json.dumps(payload, indent=1))
    (out / "session_check.md").write_text(markdown(summary, facts, reports, command.strip()))
    print((out / "session_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
