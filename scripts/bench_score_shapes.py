"""Fit and evaluation speed of pop, itemknn and expdecay_knn (and of mf) on a LastFM-1K-shaped
split: the evaluator's shared + sparse ranking (for mf, one sorted score row per user) against
dense score rows (the code at --main, e.g. a checkout of the main branch, measured for
--before-s seconds a phase), one model at a time in its own process (its peak RSS), 2
threads. --dense ranks the after side through dense rows too (the crossover of the paths).
mf is untrained (its initial random factors): what it costs to rank does not depend on them.

Usage: flock /work/heavy.lock python scripts/bench_score_shapes.py [--scale 1.0]
           [--models pop itemknn expdecay_knn] [--main /path/to/main] [--before-s 60]
           [--after-s S] [--fit-s S] [--threads 2] [--dense] [--work /work/scale/score_shapes]
           [--out bench_score_shapes.json]

The split is drawn in memory (no raw file): 992 users with log-normal event counts (at most
180,000, 16.7M events in all at --scale 1), 445,369 items with Zipf-like popularity (exponent
1.0, offset 10), and listening habits: 60 % of a user's events repeat one of their earlier
items. --fit-s stops the kNN fit after that long (on either side) and reports its rate, the
estimated whole fit (the time spent over the share of the co-occurrence product's
multiply-adds done) and the rate of that product alone (the fit's bound); the evaluation
then uses random neighbour lists (100 per item, none empty). Each user's last 20 % of events
are test and 10 % of the rest validation (~12.0M / 1.34M / 3.34M). --scale shrinks users'
counts and items alike for a quick look. Prints one line per model and side and writes JSON.
Exits 0: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from seqexp.core import stopping
from seqexp.core.stopping import EvaluationStopped
from seqexp.data.sequences import SequenceData
from seqexp.engine import evaluator as evaluator_module
from seqexp.models import knn
from seqexp.models.knn import ItemKNN
from seqexp.run import presets

ROOT = Path(__file__).resolve().parent.parent
USERS, ITEMS, EVENTS, MAX_COUNT = 992, 445_369, 16_700_000, 180_000


def lastfm_split(scale: float, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    items = max(100, int(ITEMS * scale))
    raw = rng.lognormal(0.0, 1.3, USERS)
    counts = np.clip(raw / raw.sum() * EVENTS * scale, 20, MAX_COUNT * scale).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    popularity = 1.0 / (np.arange(items) + 10.0)
    drawn = rng.choice(items, size=n, p=popularity / popularity.sum()).astype(np.int32)
    start = np.repeat(offsets[:-1], counts)
    position = np.arange(n) - start
    source = start + (rng.random(n) * position).astype(np.int64)  # an earlier event
    repeat = (rng.random(n) < 0.6) & (position > 0)
    for _ in range(64):  # repeats of repeats: follow the chain to a drawn item
        drawn = np.where(repeat, drawn[source], drawn)
    n_test = np.floor(counts * 0.2).astype(np.int64)
    val_end = offsets[1:] - n_test
    train_end = val_end - np.floor((counts - n_test) * 0.1).astype(np.int64)
    stats = {"train_events": int((train_end - offsets[:-1]).sum()),
             "val_events": int((val_end - train_end).sum()), "test_events": int(n_test.sum())}
    return SequenceData(items=drawn, timestamps=np.arange(n, dtype=np.int64) * 200,
                        offsets=offsets, train_end=train_end, val_end=val_end, n_items=items,
                        stats=stats)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_partial_fit(model: ItemKNN, data: SequenceData, seconds: float) -> dict:
    """The similarity fit stopped after `seconds` (its rate and the time the whole fit would
    take), then random neighbour lists (k per item, none empty: the most entries a point can
    have) and the popularity prior, for the evaluation's speed."""
    done = [0]
    log_progress = knn.FitProgress.done

    def counting(self, count):
        done[0] = count
        log_progress(self, count)
    knn.FitProgress.done = counting
    started = time.perf_counter()
    with contextlib.suppress(stopping.FitStopped):  # (read here: the before side has none)
        model.fit(data, lambda: "time" if time.perf_counter() - started > seconds else None)
    spent = time.perf_counter() - started
    knn.FitProgress.done = log_progress
    generator = torch.Generator().manual_seed(0)
    model.neighbours.copy_(torch.randint(0, data.n_items, model.neighbours.shape,
                                         generator=generator))
    model.similarity.copy_(torch.rand(model.similarity.shape, generator=generator)
                           .sort(1, descending=True).values)
    counts = torch.from_numpy(data.item_popularity()).float()
    model.prior.copy_(1e-6 * counts / counts.max())
    rate = done[0] / spent
    work = np.cumsum(product_work(data))
    share = work[done[0] - 1] / work[-1] if done[0] else 0.0
    return {"fit_items_done": done[0], "fit_s": spent, "fit_items_per_s": rate,
            "fit_products": float(work[-1]), "fit_products_done_share": share,
            "fit_whole_s_estimate": spent / share if share else None,
            "product_per_s": product_rate(data, seconds / 2)}


def product_rate(data: SequenceData, seconds: float) -> float:
    """Multiply-adds a second of the co-occurrence product alone (scipy, items x users times
    users x items, blocks of 16 items from the most popular on): the bound of the fit."""
    mask = data.train_mask()
    by_user = sp.csr_matrix((np.ones(int(mask.sum()), np.float32), (
        data.event_users()[mask], data.items[mask])), shape=(data.n_users, data.n_items))
    by_user.sum_duplicates()
    by_item = by_user.T.tocsr()
    work = by_item @ np.diff(by_user.indptr).astype(np.float64)
    started, lo = time.perf_counter(), 0
    while time.perf_counter() - started < seconds and lo < data.n_items:
        by_item[lo:lo + 16] @ by_user
        lo += 16
    return float(work[:lo].sum()) / (time.perf_counter() - started)


def product_work(data: SequenceData) -> np.ndarray:
    """Multiply-adds of each item's row of the co-occurrence product (the sum over its users
    of their distinct training items): the fit's estimate scales the time spent by the share
    of them done (the first items, the most popular, cost the most)."""
    mask = data.train_mask()  # (written here: the code at --main may lack a helper)
    pairs = np.unique(data.event_users()[mask] * data.n_items + data.items[mask])
    users, items = pairs // data.n_items, pairs % data.n_items
    return np.bincount(items, np.bincount(users, minlength=data.n_users)[users], data.n_items)


def child(args: argparse.Namespace) -> dict:
    """One model on one side: fit (or load the after side's fit), then each phase."""
    torch.set_num_threads(args.threads)
    if args.dense:  # every model through dense score rows (the after side's code)
        evaluator_module.sorted_shared_scores = lambda model: None
        evaluator_module.shared_rows = lambda model, batch: None
    data = lastfm_split(args.scale)
    model = presets.model(args.model, data.n_items, data.n_users)
    state = args.work / f"{args.model}.pt"
    report = {"model": args.model, "side": args.side, "items": data.n_items,
              "users": data.n_users, **data.stats}
    started = time.perf_counter()
    if args.fit_s and isinstance(model, ItemKNN):  # either side: its fit's rate
        report |= timed_partial_fit(model, data, args.fit_s)
    elif args.side == "before" and state.exists():
        model.load_state_dict(torch.load(state))
    else:
        model.fit(data)
        report["fit_s"] = time.perf_counter() - started
        torch.save(model.state_dict(), state)
    limit = args.before_s if args.side == "before" else args.after_s
    evaluator = presets.evaluator(progress=False)
    for phase in ("val", "test"):
        done = [0]
        real_states = model.prediction_states

        def counting(batch, real=real_states, done=done):
            done[0] += batch.n_targets
            return real(batch)
        model.prediction_states = counting
        started = time.perf_counter()
        with contextlib.suppress(EvaluationStopped):  # the before side's time is up
            evaluator.rank_counts(model, data, phase, None if limit is None else (
                lambda s=started: "time" if time.perf_counter() - s > limit else None))
        seconds = time.perf_counter() - started
        model.prediction_states = real_states
        report |= {f"{phase}_events_done": done[0], f"{phase}_s": seconds,
                   f"{phase}_events_per_s": done[0] / seconds}
    report["peak_rss_gb"] = peak_rss_gb()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--models", nargs="+", default=["pop", "itemknn", "expdecay_knn"])
    parser.add_argument("--main", type=Path, help="the code measured as 'before'")
    parser.add_argument("--before-s", type=float, default=60.0)
    parser.add_argument("--after-s", type=float, help="limit of each phase, after")
    parser.add_argument("--fit-s", type=float, help="stop the kNN fit after this long: its "
                        "rate, then random neighbour lists")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="rank through dense rows, after")
    parser.add_argument("--work", type=Path, default=Path("/work/scale/score_shapes"))
    parser.add_argument("--out", type=Path, default=Path("bench_score_shapes.json"))
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model:
        print(json.dumps(child(args)))
        return 0
    reports = []
    for model in args.models:
        sides = [("after", ROOT)] + ([("before", args.main)] if args.main else [])
        for side, code in sides:
            command = [sys.executable, __file__, "--model", model, "--side", side,
                       "--scale", str(args.scale), "--before-s", str(args.before_s),
                       "--work", str(args.work)]
            for flag, value in (("--after-s", args.after_s), ("--fit-s", args.fit_s),
                                ("--threads", args.threads)):
                command += [flag, str(value)] if value else []
            command += ["--dense"] if args.dense else []
            env = os.environ | {"PYTHONPATH": str(code)}
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:])
                continue
            report = json.loads(done.stdout.strip().splitlines()[-1])
            reports.append(report)
            fit = f"fit {report['fit_s']:8.1f} s" if "fit_s" in report else "fit (loaded)"
            if "fit_items_done" in report:
                fit += (f" ({report['fit_items_done']:,} items, "
                        f"{report['fit_items_per_s']:,.0f}/s, "
                        f"{report['fit_products_done_share']:.1%} of the product, whole fit "
                        f"~{(report['fit_whole_s_estimate'] or 0):,.0f} s; product alone "
                        f"{report['product_per_s']:.3g}/s of {report['fit_products']:.3g})")
            print(f"{model:13s} {side:6s} {fit}  val {report['val_events_per_s']:>12,.0f} "
                  f"ev/s ({report['val_events_done']:,} in {report['val_s']:.1f} s)  test "
                  f"{report['test_events_per_s']:>12,.0f} ev/s ({report['test_events_done']:,}"
                  f" in {report['test_s']:.1f} s)  peak RSS {report['peak_rss_gb']:.2f} GB",
                  flush=True)
    args.out.write_text(json.dumps(reports, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
