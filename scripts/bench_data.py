"""Benchmark the ML-10M data path: parse + preprocess + split + cache write, then a cache hit.

Usage: python scripts/bench_data.py [--lines N] [--users U] [--items I] [--seed S]
                                    [--workdir DIR] [--out FILE.json] [--keep]

It writes a synthetic ratings.dat in the ML-10M layout (`UserID::MovieID::Rating::Timestamp`,
every user with at least 20 ratings, Zipf-like item popularity, many equal timestamps within a
user), then runs `load_dataset` with the ml10m dataset config and the user_tail split twice, each
time in a fresh child process so that its wall time and peak RSS belong to that phase alone:
first with an empty cache (parse, preprocess, split, cache write), then again (cache hit).
Prints a table with PASS/FAIL per target and writes the figures as JSON. Exits 0 either way:
it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_paper_shapes import MIN_PER_USER  # noqa: E402
from make_paper_shapes import write_ml10m as generate  # noqa: E402

TARGETS = {  # key: (limit, unit)
    "first_load_s": (60.0, "s"),
    "first_load_peak_rss_mb": (4096.0, "MB"),
    "cached_load_s": (5.0, "s"),
}

# Runs in a fresh interpreter: one load_dataset call, timed, with this process's peak RSS.
CHILD = r"""
import hashlib, json, resource, sys, time
from pathlib import Path
spec = json.loads(sys.argv[1])
from seqexp.data.loading import load_dataset
started = time.perf_counter()
data = load_dataset(spec["dataset"], spec["split"], Path(spec["raw_dir"]),
                    Path(spec["cache_dir"]), progress=False)
seconds = time.perf_counter() - started
# VmHWM is this process image's own peak; ru_maxrss would also count what a fork copied from
# the (large) benchmark parent before exec.
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
except OSError:
    pass
digest = hashlib.sha256()
for name in ("items", "timestamps", "offsets", "train_end", "val_end"):
    digest.update(getattr(data, name).tobytes())
print(json.dumps({
    "seconds": seconds,
    "peak_rss_mb": peak_kb / 1024,
    "n_users": data.n_users, "n_items": data.n_items, "n_events": data.n_events,
    "stats": data.stats, "digest": digest.hexdigest(),
}))
"""


def run_child(spec: dict) -> dict:
    """One load_dataset call in a fresh interpreter; its figures, plus the process wall time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"load_dataset failed in the child process (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def dataset_config(path: Path) -> dict:
    from omegaconf import OmegaConf

    dataset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/dataset/ml10m.yaml"))
    dataset["path"] = str(path)
    return dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_054)
    parser.add_argument("--users", type=int, default=69_878)
    parser.add_argument("--items", type=int, default=10_677)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the file and the cache go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench_data.json"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated ratings.dat and the cache")
    args = parser.parse_args(argv)
    if args.users < 1 or args.items < 1:
        parser.error("--users and --items must be positive")
    if args.lines < MIN_PER_USER * args.users:
        parser.error(f"--lines must be at least {MIN_PER_USER} * --users "
                     f"({MIN_PER_USER * args.users})")

    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench_data."))
        remove = [workdir]
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        remove = [workdir / "ratings.dat", workdir / "raw", workdir / "cache"]
    try:
        path = workdir / "ratings.dat"
        started = time.perf_counter()
        generated = generate(path, args.lines, args.users, args.items, args.seed)
        print(f"generated {path} ({generated['bytes'] / 2**20:.0f} MiB, {args.lines:,} lines, "
              f"{args.users:,} users) in {time.perf_counter() - started:.1f} s")
        cache_dir = workdir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        from omegaconf import OmegaConf

        spec = {
            "dataset": dataset_config(path),
            "split": OmegaConf.to_container(OmegaConf.load(ROOT / "conf/split/user_tail.yaml")),
            "raw_dir": str(workdir / "raw"),
            "cache_dir": str(cache_dir),
        }
        first = run_child(spec)
        cached = run_child(spec)
    finally:
        if not args.keep:
            for item in remove:
                if item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                elif item.exists():
                    item.unlink()

    stats = first["stats"]
    report = {
        "lines": args.lines,
        "first_load_s": round(first["seconds"], 3),
        "first_load_peak_rss_mb": round(first["peak_rss_mb"], 1),
        "cached_load_s": round(cached["seconds"], 3),
        "cached_load_peak_rss_mb": round(cached["peak_rss_mb"], 1),
        "n_users": first["n_users"],
        "n_items": first["n_items"],
        "train_events": stats["train_events"],
        "test_events": stats["test_events"],
        "val_events": stats["val_events"],
        "sequence_digest": first["digest"],  # sha256 of the SequenceData arrays
        "first_load_process_s": round(first["process_s"], 3),
        "cached_load_process_s": round(cached["process_s"], 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
    }
    checks = {
        "parsed lines == generated": stats["raw_events"] == args.lines,
        "malformed lines == 0": stats["raw_malformed_lines"] == 0,
        "users == generated": first["n_users"] == args.users,
        "items <= generated": first["n_items"] <= generated["distinct_items"],
        "events add up": first["n_events"] == (stats["train_events"] + stats["val_events"]
                                               + stats["test_events"]),
        "cache hit == first load": (cached["digest"] == first["digest"]
                                    and cached["stats"] == first["stats"]),
    }
    report["checks"] = checks

    print(f"\n{'measure':<26}{'value':>12}  {'target':>10}")
    for key in ("first_load_s", "first_load_peak_rss_mb", "cached_load_s",
                "cached_load_peak_rss_mb"):
        value = report[key]
        if key in TARGETS:
            limit, unit = TARGETS[key]
            verdict = f"<= {limit:g} {unit}  {'PASS' if value <= limit else 'FAIL'}"
        else:
            verdict = ""
        print(f"{key:<26}{value:>12,.2f}  {verdict}")
    print(f"{'(process wall, first)':<26}{report['first_load_process_s']:>12,.2f}")
    print(f"{'(process wall, cached)':<26}{report['cached_load_process_s']:>12,.2f}")
    for key in ("n_users", "n_items", "train_events", "val_events", "test_events"):
        print(f"{key:<26}{report[key]:>12,}")
    for name, ok in checks.items():
        print(f"check {name:<32}{'ok' if ok else 'MISMATCH'}")
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
