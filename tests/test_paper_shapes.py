"""scripts/make_paper_shapes.py at a tiny size: its files are parsed by the real readers, with the
counts it was asked for (lines, users, malformed lines of each kind) and the shape it promises
(newest-first rows, sessions, odd names); scripts/bench_paper_shapes.py on them, on this checkout
and on another one (--code)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import helpers
from seqexp.data.lastfm import read_lastfm
from seqexp.data.movielens import read_movielens

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_paper_shapes.py"


@pytest.fixture(scope="module")
def shapes():
    spec = importlib.util.spec_from_file_location("make_paper_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_paper_shapes", SCRIPT.parent / "bench_paper_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lastfm_shape_parses_with_its_counts(tmp_path: Path, shapes) -> None:
    shape = shapes.LastfmShape(lines=2_000, users=5, max_per_user=1_200, tracks=400,
                               artists=30, bad_every=100)
    path = tmp_path / shapes.LASTFM_FILE
    # Chunks of ~300 rows: several chunks, users never split between two of them.
    facts = shapes.write_lastfm(path, shape, seed=3, chunk_rows=300)
    assert path.read_bytes().count(b"\n") == 2_000
    # Rows 100, 200, ..., 2000 are malformed, the four kinds in turn: 5 + 5 + 5 + 5.
    assert facts["malformed"] == {"wrong_field_count": 5, "bad_time": 5, "no_artist": 5,
                                  "not_utf8": 5}
    raw = read_lastfm(path, item="track")
    assert len(raw) == facts["valid_rows"] == 2_000 - 20
    assert raw.skipped_lines == 20
    assert raw.notes == {"lines_wrong_field_count": 5, "lines_not_utf8": 5,
                         "lines_bad_time_or_artist": 10}
    assert len(raw.user_labels) == 5
    assert all(label.startswith("user_") and len(label) == 11 for label in raw.user_labels)
    assert len(raw.item_labels) == facts["distinct_tracks"]
    per_user = np.bincount(raw.user)
    assert (facts["user_min"], facts["user_max"]) == (per_user.min(), per_user.max())

    # The reader reverses the newest-first file: each user's listens come out oldest first.
    order = np.argsort(raw.user, kind="stable")
    user, seconds = raw.user[order], raw.timestamp[order]
    same_user = user[1:] == user[:-1]
    gaps = np.diff(seconds)[same_user]
    assert (gaps >= 0).all()
    # Sessions: most listens follow the previous one by a song's length, some by hours.
    assert np.mean((gaps >= 150) & (gaps <= 360)) > 0.8
    assert (gaps > 3_600).sum() >= 5 * 10
    # Odd names survive the round trip: quotes, apostrophes, non-Latin letters.
    labels = "\n".join(raw.item_labels.tolist())
    assert '\t"Heroes"' in labels and "Don't" in labels and "Интро" in labels


def test_lastfm_shape_is_deterministic_and_seeded(tmp_path: Path, shapes) -> None:
    shape = shapes.LastfmShape().scaled(1e-4)
    first, again, other = (tmp_path / name for name in ("a.tsv", "b.tsv", "c.tsv"))
    shapes.write_lastfm(first, shape, seed=1)
    shapes.write_lastfm(again, shape, seed=1)
    shapes.write_lastfm(other, shape, seed=2)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()


def test_ml10m_shape_parses_with_its_counts(tmp_path: Path, shapes, monkeypatch) -> None:
    monkeypatch.setattr(shapes, "CHUNK_ROWS", 1_000)  # several chunks
    path = tmp_path / shapes.ML10M_FILE
    facts = shapes.write_ml10m(path, lines=5_000, users=100, items=40, seed=0)
    raw = read_movielens(path, "ratings_dat")
    assert len(raw) == 5_000 and raw.skipped_lines == 0
    # Small ids are their own codes: count the distinct ones.
    assert len(np.unique(raw.user)) == 100
    assert len(np.unique(raw.item)) == facts["distinct_items"] == 40
    assert np.unique(raw.user, return_counts=True)[1].min() >= shapes.MIN_PER_USER
    lines = path.read_text().splitlines()
    assert len(lines) == 5_000 and all(line.count("::") == 3 for line in lines)


@pytest.mark.slow
def test_bench_paper_shapes_runs_models_end_to_end(tmp_path: Path, shapes, bench) -> None:
    """The benchmark on a tiny ML-10M shape: its rows count the events the data has."""
    (tmp_path / "ml10m").mkdir()
    shapes.write_ml10m(tmp_path / "ml10m" / shapes.ML10M_FILE, lines=3_000, users=60, items=30,
                       seed=0)
    out = tmp_path / "bench.json"
    assert bench.main(["--data", str(tmp_path), "--shapes", "ml10m", "--models", "pop", "mf",
                       "--out", str(out), "-o", "train.batch_size=256"]) == 0
    result = json.loads(out.read_text())["shapes"]["ml10m"]
    raw, cached = result["load"]
    assert (raw["phase"], raw["events"], raw["raw_malformed_lines"]) == ("load (raw)", 3_000, 0)
    assert cached["events"] == raw["train_events"] + raw["val_events"] + raw["test_events"]
    pop = {row["phase"]: row for row in result["models"]["pop"]["phases"]}
    assert list(pop) == ["load (cache)", "fit", "validation", "test"]
    assert pop["test"]["events"] == raw["test_events"]
    assert pop["validation"]["events"] == raw["val_events"]
    mf = [row["phase"] for row in result["models"]["mf"]["phases"]]
    assert mf == ["load (cache)", "fit", "epoch 1 train", "epoch 1 validation", "test"]
    assert all(row["status"] == "done" for row in result["models"]["mf"]["phases"])
    assert "| ml10m | mf | epoch 1 train |" in bench.markdown(json.loads(out.read_text()))


@pytest.mark.slow
def test_bench_paper_shapes_measures_another_checkout(tmp_path: Path, shapes, bench,
                                                     capsys) -> None:
    """--code: the children import seqexp and compose conf/ from another checkout (here a copy of
    this one whose split keeps 30 % of each user's events for test, not 20 %): the same phases,
    the copy's counts, the copy's package; --markdown with two reports puts each (model, phase)
    row's figures side by side."""
    root, code = SCRIPT.parents[1], tmp_path / "code"
    shutil.copytree(root / "seqexp", code / "seqexp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "conf", code / "conf")
    split = code / "conf" / "split" / "user_tail.yaml"
    split.write_text(split.read_text().replace("test_frac: 0.2", "test_frac: 0.3"))
    (tmp_path / "ml10m").mkdir()
    shapes.write_ml10m(tmp_path / "ml10m" / shapes.ML10M_FILE, lines=3_000, users=60, items=30,
                       seed=0)
    common = ["--data", str(tmp_path), "--shapes", "ml10m", "--models", "pop", "mf",
              "-o", "train.batch_size=256"]
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    assert bench.main([*common, "--code", str(code), "--label", "old", "--out", str(before)]) == 0
    assert bench.main([*common, "--out", str(after)]) == 0
    reports = [json.loads(path.read_text()) for path in (before, after)]
    assert [report["label"] for report in reports] == ["old", None]
    assert [report["code"] for report in reports] == [str(code.resolve()), str(root)]
    results = [report["shapes"]["ml10m"] for report in reports]
    for result, where in zip(results, (code, root), strict=True):
        raw = result["load"][0]
        for model in ("pop", "mf"):
            entry = result["models"][model]
            assert entry["seqexp"] == str(where.resolve() / "seqexp")
            assert entry["phases"][-1]["events"] == raw["test_events"]
    tests = [result["load"][0]["test_events"] for result in results]
    assert tests[0] > tests[1] > 0  # the copy's split, not this checkout's
    for model in ("pop", "mf"):
        assert ([row["phase"] for row in results[0]["models"][model]["phases"]]
                == [row["phase"] for row in results[1]["models"][model]["phases"]])

    capsys.readouterr()
    assert bench.main(["--markdown", str(before), str(after)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| shape | model | phase | old wall s | old events/s |")
    assert "| after wall s | after events/s | after peak RSS MB | after note |" in table[0]
    lines = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line
             for line in table[2:]}
    for model in ("pop", "mf"):
        for row in results[0]["models"][model]["phases"]:
            key = ("ml10m", model, row["phase"])
            cells = [cell.strip() for cell in lines[key].strip("|").split("|")]
            sides = [next(r for r in result["models"][model]["phases"]
                          if r["phase"] == row["phase"]) for result in results]
            assert cells[3] == f"{sides[0]['seconds']:,.1f}"
            assert cells[5] == f"{sides[0]['peak_rss_mb']:,.0f}"
            assert cells[7] == f"{sides[1]['seconds']:,.1f}"
            assert cells[9] == f"{sides[1]['peak_rss_mb']:,.0f}"
            rates = [side["events_per_s"] for side in sides]
            timed = all(side["seconds"] >= 0.05 and side["events_per_s"] for side in sides)
            assert cells[11] == (f"{rates[1] / rates[0]:,.2f}x" if timed else "")
    assert len(lines) == sum(len(r["load"]) + sum(len(e["phases"]) for e in r["models"].values())
                             for r in results[:1])


def test_bench_kills_a_phase_at_the_fit_limit_or_three_caps(bench) -> None:
    """A phase still running is killed at --fit-limit-s when given, else at 3 x the cap + 120 s;
    without a cap, never."""
    assert bench.kill_limit(bench.arguments(["--phase-cap-s", "30"])[1]) == 210
    limited = ["--phase-cap-s", "30", "--fit-limit-s", "1500"]
    assert bench.kill_limit(bench.arguments(limited)[1]) == 1500
    assert bench.kill_limit(bench.arguments([])[1]) is None


def test_bench_validates_every_event_with_code_that_has_no_sample(bench, monkeypatch) -> None:
    """Code without `validation_sample` ranks every validation event: the benchmark counts them
    all and says so; with it, the sample's."""
    import seqexp.data.sequences
    from seqexp.engine.evaluator import phase_targets

    data = helpers.sequences([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 0]],
                             n_items=7, n_val=[2, 2, 2])
    evaluator = SimpleNamespace(val_max_scores=2 * 7, seed=0)  # one user's 2 targets x 7 items
    sample, note = bench.validated_events(data, evaluator)
    assert note is None and phase_targets(sample, "val") == 2
    monkeypatch.delattr(seqexp.data.sequences, "validation_sample")
    whole, note = bench.validated_events(data, evaluator)
    assert whole is data and phase_targets(whole, "val") == 6
    assert note == "every validation event (this code has no validation sample)"


def test_bench_leaves_out_keys_newer_than_the_code(bench, tmp_path: Path) -> None:
    """An override whose key only this checkout's config has is left out for older code; an
    unknown key (a typo) stays, to fail as in seqexp; this checkout keeps every override."""
    code = tmp_path / "code"
    shutil.copytree(SCRIPT.parents[1] / "conf", code / "conf")
    evaluation = code / "conf" / "eval" / "default.yaml"
    kept = [line for line in evaluation.read_text().splitlines()
            if not line.startswith("val_max_scores:")]
    evaluation.write_text("\n".join(kept) + "\n")
    overrides = ["eval.val_max_scores=5", "eval.no_such_key=1", "train.epochs=2"]
    spec = {"shape": "ml10m", "model": "pop", "overrides": overrides}
    assert bench.code_overrides(spec, tmp_path, code) == (
        ["eval.no_such_key=1", "train.epochs=2"], ["eval.val_max_scores=5"])
    assert bench.code_overrides(spec, tmp_path, bench.ROOT) == (overrides, [])
