"""The dense evaluation's achieved FLOP rate at LastFM-1K's catalogue, against this machine's
float32 GEMM rate for the same products, and where the rest of the time goes.

Usage: python scripts/bench_dense_eval.py [--model gru] [--hidden 100] [--items 445369]
           [--users 8] [--train-events 2000] [--val-events 200]
           [--block-elements auto 28503616 128x2048x8 256x1024x1 auto-dense_counts ...]
           [--paper-shapes DIR [--every-user 31]] [--phase val] [--key-row-points N]
           [--repeats 3] [--out bench_dense_eval.json]

The model (conf/model/<model>.yaml; its width set to --hidden: model.hidden_size for the RNNs,
model.factors for mf/seqmf) is built untrained at --items items; the data are synthetic,
--users users of --train-events training then --val-events validation events each, items drawn
from a Zipf-like popularity (LastFM-1K's users have ~12,300 training and ~1,300 validation
events each, the same ratio as the defaults; with a few users each replay step runs a few rows,
not 256, so the replay's share here is above LastFM-1K's). With --paper-shapes DIR (the folder
of scripts/make_paper_shapes.py) the data are instead every --every-user-th user of its
LastFM-1K-shaped file, as `seqexp dataset=lastfm` loads it (cached where
bench_paper_shapes.py caches it), and the events ranked are those of --phase. For each
--block-elements
(eval.max_block_elements; auto = the evaluator's own choice; PxT = the evaluator's CPU tiles
at P points x T items instead of its own, PxTxG the same with G blocks of points a group
(scored item tile by item tile; 1: block by block); any of them followed by -K, e.g.
auto-dense_counts:
the same with the CPU kernel K of seqexp/models/cpu_kernels.py off) it times, over the
--phase events:
- total: the evaluator's rank counting (Evaluator.rank_counts), the fastest of --repeats
  passes after an untimed one; ranks compared across settings;
- replay: the model's prediction states (the history replay), batch by batch as the evaluator
  makes them (Evaluator.prediction_states: on one thread where it counts in CPU tiles);
  replay_all_threads: the same replay on torch's threads (model.prediction_states);
- product: the score blocks' products alone (the evaluator's score_parts: the product of the
  model's score_factors written into a buffer the group reuses, else model.score_items; in
  blocks of one user, KeyRowScores, with each user's row), in
  the evaluator's blocks, groups and order, and on its threads (one group per core where it
  counts in CPU tiles);
- counting: the rest (total - replay - product).
`mf` is ranked through dense blocks here: the script turns off the evaluator's shared rows (one
sorted score row per user, which it takes for `mf`'s users of SHARED_ROW_POINTS points or more:
scripts/bench_shared_rows.py), so that every model's row measures the dense scoring.
The achieved rate is 2 x width x items x events / total, width being that of the product the
evaluator makes of the model's score_factors (hidden; mf's factors; seqmf's 2 x factors, user
and transition, or, in blocks of one user (the key_rows kernel), the transitions' factors
alone, the user's part made once per user);
the GEMM rate is that of one score block's product of the evaluator's shape (that width), and
of 64 points x all items, timed by scripts/bench_matmul.py's best_seconds in the same run (the
best of GEMM_ROUNDS rounds, once per shape); each setting's rate is also given over the
fastest of all the run's GEMM rates. Prints a line per setting and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import cache, partial
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from bench_matmul import best_seconds
from bench_paper_shapes import compose as compose_paper_shape
from hydra import compose, initialize_config_dir

from seqexp.core.resources import config_dir
from seqexp.data.batching import prediction_batches
from seqexp.data.loading import load_dataset
from seqexp.data.sequences import SequenceData
from seqexp.engine import evaluator as evaluation
from seqexp.engine.evaluator import Evaluator, on_each_core, tile_groups
from seqexp.engine.ranks import TileBuffer
from seqexp.models import cpu_kernels
from seqexp.run.experiment import build_model, configure_torch

WIDTH_KEY = {"mf": "factors", "seqmf": "factors"}  # the RNNs: hidden_size
# Rounds of bench_matmul's timing per GEMM rate (the best counts): its rate varies from round
# to round by more than the settings compared here differ.
GEMM_ROUNDS = 5
LINEAR_PARTS, SCORES_ALONE = evaluation.linear_parts, evaluation.scores_alone  # its own
TILE_SHAPE = evaluation.TILE_POINTS, evaluation.TILE_ITEMS, evaluation.TILE_GROUP  # its own


def lastfm_like(n_users: int, n_items: int, n_train: int, n_val: int) -> SequenceData:
    rng = np.random.default_rng(0)
    per_user = n_train + n_val + 1  # one test event each
    items = rng.permutation(n_items)[(rng.zipf(1.1, n_users * per_user) - 1) % n_items]
    offsets = np.arange(0, n_users * per_user + 1, per_user, dtype=np.int64)
    return SequenceData(items=items.astype(np.int32),
                        timestamps=np.arange(len(items), dtype=np.int64) * 180,
                        offsets=offsets, train_end=offsets[:-1] + n_train,
                        val_end=offsets[:-1] + n_train + n_val, n_items=n_items)


def lastfm_users(folder: str, model: str, every: int) -> SequenceData:
    """Every `every`-th user of the LastFM-1K-shaped file of scripts/make_paper_shapes.py in
    `folder` (its events, splits and catalogue, as `seqexp model=<model> dataset=lastfm`
    loads them, from the cache bench_paper_shapes.py uses in `folder`)."""
    cfg = compose_paper_shape("lastfm", Path(folder), model, [])
    data = load_dataset(cfg.dataset, cfg.split, Path(cfg.paths.raw_dir),
                        Path(cfg.paths.cache_dir), progress=False)
    users = np.arange(0, data.n_users, every)
    starts, lengths = data.offsets[users], np.diff(data.offsets)[users]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    events = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    return SequenceData(items=data.items[events], timestamps=data.timestamps[events],
                        offsets=offsets, train_end=offsets[:-1] + data.train_end[users] - starts,
                        val_end=offsets[:-1] + data.val_end[users] - starts,
                        n_items=data.n_items)


def counting_scored() -> list[int]:
    """Make the evaluator's score parts (evaluation.linear_parts, for scores made of factors,
    and evaluation.scores_alone, for the others) append the number of scores each product
    holds to the returned list (list.append is atomic: the evaluator's worker threads share
    it); undone by restore_score_parts."""
    scored: list[int] = []

    def counted_linear(*args, **kwargs):
        product, bias = LINEAR_PARTS(*args, **kwargs)
        scored.append(product.numel())
        return product, bias

    def counted_alone(score_block):
        def counted(lo: int, hi: int, out: torch.Tensor | None = None):
            scores = score_block(lo, hi)
            scored.append(scores.numel())
            return scores, None
        return counted
    evaluation.linear_parts, evaluation.scores_alone = counted_linear, counted_alone
    return scored


def restore_score_parts() -> None:
    evaluation.linear_parts, evaluation.scores_alone = LINEAR_PARTS, SCORES_ALONE


def products_alone(scorers, blocks: list, chunk: int, n_items: int) -> None:
    """The products of a group of blocks (rows of the prediction states) as the evaluator
    runs them (item chunk by item chunk, each block in turn, into the buffer the group
    shares where the model's scores have factors), each dropped once made, as the evaluator
    drops a counted tile."""
    parts = scorers(blocks)
    buffer = TileBuffer()
    like = torch.empty(0)
    for lo in range(0, n_items, chunk):
        hi = min(lo + chunk, n_items)
        for part, rows in zip(parts, blocks, strict=True):
            part(lo, hi, buffer.take(block_points(rows), hi - lo, like))


def block_points(rows: slice | torch.Tensor) -> int:
    return len(rows) if isinstance(rows, torch.Tensor) else rows.stop - rows.start


def evaluator_blocks(model, states, batch, evaluator: Evaluator, n_items: int):
    """(the scorers, the blocks of points, the item chunk, the columns the key rows take
    off the product) of a batch, as the evaluator's _dense_counts makes them."""
    cpu = torch.device("cpu")
    points, chunk = evaluator.block_shape(cpu, n_items, batch.n_targets)
    tiles = evaluator.cpu_tiles(cpu, n_items)
    keyed = evaluation.key_columns(model, batch) if tiles else None
    order, bounds = evaluation.block_plan(batch.targets, n_items, (points, chunk),
                                          None if keyed is None else keyed[0])
    blocks = [slice(start, stop) if order is None else order[start:stop]
              for start, stop in pairwise(bounds)]
    scorers = (partial(evaluation.point_scorers, model, states) if keyed is None
               else evaluation.KeyRowScores(model.score_factors(states), *keyed))
    return scorers, blocks, chunk, 0 if keyed is None else keyed[1]


def time_phases(model, data: SequenceData, evaluator: Evaluator, repeats: int,
                phase: str) -> dict:
    evaluator.rank_counts(model, data, phase)  # untimed: compiled kernels loaded, pages touched
    totals = []
    for _ in range(repeats):
        scored = counting_scored()
        started = time.perf_counter()
        counts = evaluator.rank_counts(model, data, phase)
        totals.append(time.perf_counter() - started)
        restore_score_parts()
    total = min(totals)
    replay = product = replay_all_threads = 0.0
    keyed_columns = 0
    shapes = set()
    cpu = torch.device("cpu")
    tiles = evaluator.cpu_tiles(cpu, data.n_items)
    workers = torch.get_num_threads() if tiles else 1
    with torch.no_grad():
        for batch in prediction_batches(data, phase, evaluator.users_per_batch(model.device)):
            started = time.perf_counter()
            states = evaluator.prediction_states(model, batch, data.n_items)
            replay += time.perf_counter() - started
            started = time.perf_counter()
            model.prediction_states(batch)  # the same replay on torch's threads, for comparison
            replay_all_threads += time.perf_counter() - started
            scorers, blocks, chunk, key_width = evaluator_blocks(model, states, batch,
                                                                 evaluator, data.n_items)
            keyed_columns = max(keyed_columns, key_width)
            shapes |= {(block_points(rows), min(chunk, data.n_items)) for rows in blocks}
            # the evaluator's groups of blocks, each scored item chunk by item chunk
            groups = tile_groups(blocks, evaluation.TILE_GROUP if tiles else 1, workers)
            started = time.perf_counter()
            on_each_core(partial(products_alone, scorers, chunk=chunk, n_items=data.n_items),
                         groups, workers)
            product += time.perf_counter() - started
    # scores the evaluator computed beyond one product per score (its first passes)
    extra = sum(scored) / (len(counts) * data.n_items) - 1
    return {"counts": counts, "total_s": total, "totals_s": totals, "replay_s": replay,
            "product_s": product,
            "counting_s": total - replay - product, "block_shapes": sorted(shapes),
            "extra_scored": extra, "replay_all_threads_s": replay_all_threads,
            "key_row_columns": keyed_columns}


def product_width(model, data: SequenceData, evaluator: Evaluator, hidden: int,
                  phase: str) -> int:
    """The inner dimension of the model's score product: that of its score_factors for the
    first validation batch (seqmf's is twice its factors), else --hidden."""
    batch = next(prediction_batches(data, phase, evaluator.users_per_batch(model.device)))
    with torch.no_grad():
        factors = model.score_factors(model.prediction_states(batch))
    return hidden if factors is None else int(factors[0].shape[1])


@cache
def gemm_gflops(points: int, hidden: int, items: int) -> float:
    """float32 GEMM rate of [points x hidden] . [hidden x items] (bench_matmul's timing), timed
    once per shape in a run: the settings of one tile shape share one rate."""
    seconds = best_seconds(torch.randn(points, hidden), torch.randn(hidden, items), GEMM_ROUNDS)
    return 2 * points * hidden * items / seconds / 1e9


def report_fastest_gemm(settings: dict) -> None:
    """Each setting's achieved rate over the fastest GEMM rate of the run, whatever its shape
    (fraction_of_fastest_gemm), printed: a tile shape whose own GEMM rate is low does not
    flatter its setting."""
    fastest = max(max(row["gemm_gflops_same_shape"], row["gemm_gflops_64_points"])
                  for row in settings.values())
    for setting, row in settings.items():
        row["fraction_of_fastest_gemm"] = row["achieved_gflops"] / fastest
        print(f"{setting}: {row['fraction_of_fastest_gemm']:.0%} of the fastest GEMM rate of "
              f"this run ({fastest:.1f} GFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gru")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--items", type=int, default=445_369)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--train-events", type=int, default=2000)
    parser.add_argument("--val-events", type=int, default=200)
    parser.add_argument("--block-elements", nargs="+", default=["auto"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed evaluation passes per setting (the fastest counts)")
    parser.add_argument("--paper-shapes", metavar="DIR",
                        help="rank the LastFM-1K-shaped file of scripts/make_paper_shapes.py "
                             "in DIR (every --every-user-th user) instead of synthetic data")
    parser.add_argument("--every-user", type=int, default=31)
    parser.add_argument("--phase", choices=["val", "test"], default="val")
    parser.add_argument("--key-row-points", type=int,
                        help="the evaluator's KEY_ROW_POINTS (the fewest points per user a "
                             "batch needs for blocks of one user, seqmf) instead of its own")
    parser.add_argument("--out", default="bench_dense_eval.json")
    args = parser.parse_args()
    width_key = WIDTH_KEY.get(args.model, "hidden_size")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", f"model.{width_key}={args.hidden}", "train.progress=false"])
    configure_torch(cfg.train)
    torch.manual_seed(cfg.seed)
    evaluation.shared_rows = lambda model, batch: None  # dense blocks for every model
    if args.key_row_points is not None:
        evaluation.KEY_ROW_POINTS = args.key_row_points
    data = (lastfm_users(args.paper_shapes, args.model, args.every_user) if args.paper_shapes
            else lastfm_like(args.users, args.items, args.train_events, args.val_events))
    model = build_model(cfg.model, data)
    model.fit(data)
    model.eval()
    results: dict = {"model": args.model, "hidden": args.hidden, "items": data.n_items,
                     "users": data.n_users, "train_events": args.train_events,
                     "val_events": args.val_events, "settings": {}}
    reference = None
    width = product_width(model, data, Evaluator.from_config(cfg), args.hidden, args.phase)
    results["product_width"] = width
    kernels = cpu_kernels.enabled()  # the configuration's (train.cpu_kernels)
    for setting in args.block_elements:
        shape, _, kernel_off = setting.partition("-")
        if kernel_off and kernel_off not in cpu_kernels.KERNELS:
            parser.error(f"{setting}: no CPU kernel {kernel_off} (known: "
                         f"{', '.join(cpu_kernels.KERNELS)})")
        if "x" in shape:  # CPU tiles of another shape than the evaluator's
            tile = [int(size) for size in shape.split("x")]
            evaluation.TILE_POINTS, evaluation.TILE_ITEMS = tile[:2]
            evaluation.TILE_GROUP = tile[2] if len(tile) > 2 else TILE_SHAPE[2]
        block = None if shape == "auto" or "x" in shape else int(shape)
        evaluator = Evaluator.from_config(cfg, max_block_elements=block)
        cpu_kernels.set_enabled(kernels - {kernel_off})
        try:
            row = time_phases(model, data, evaluator, args.repeats, args.phase)
        finally:
            evaluation.TILE_POINTS, evaluation.TILE_ITEMS, evaluation.TILE_GROUP = TILE_SHAPE
            cpu_kernels.set_enabled(kernels)
        counts = row.pop("counts")
        events = len(counts)
        # the product made: narrower by the columns made once per key (key rows)
        made = width - row["key_row_columns"]
        flop = 2 * made * data.n_items * events
        points, chunk = max(row["block_shapes"])
        gemm_block = gemm_gflops(points, made, chunk)
        gemm_64 = gemm_gflops(64, made, data.n_items)
        if reference is None:
            reference = counts
        row |= {"events": events, "events_per_s": events / row["total_s"],
                "achieved_gflops": flop / row["total_s"] / 1e9,
                "gemm_gflops_same_shape": gemm_block, "gemm_gflops_64_points": gemm_64,
                "fraction_of_best_gemm": flop / row["total_s"] / 1e9 / max(gemm_block, gemm_64),
                "ranks_equal_first_setting": bool(
                    np.array_equal(counts.greater, reference.greater)
                    and np.array_equal(counts.equal, reference.equal))}
        results["settings"][setting] = row
        row["product_width_made"] = made
        print(f"{args.model} h{args.hidden} block {setting}: {events} events, "
              f"{row['events_per_s']:,.0f} events/s, {row['achieved_gflops']:.1f} GFLOP/s "
              f"= {row['fraction_of_best_gemm']:.0%} of GEMM (width {made}, block shape "
              f"{points}x{chunk}: "
              f"{gemm_block:.1f}, 64 x all items: {gemm_64:.1f} GFLOP/s); total "
              f"{row['total_s']:.2f} s = replay {row['replay_s']:.2f} + product "
              f"{row['product_s']:.2f} + counting {row['counting_s']:.2f} (first-pass "
              f"products: {row['extra_scored']:.1%} more scores; the replay on torch's "
              f"threads: {row['replay_all_threads_s']:.2f} s); ranks equal: "
              f"{row['ranks_equal_first_setting']}", flush=True)
    report_fastest_gemm(results["settings"])
    results["_meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine()}
    with open(args.out, "w") as out:
        json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
