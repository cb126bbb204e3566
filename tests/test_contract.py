"""The bad-input contract, tried with Hypothesis: random malformed raw files in every format and
random bad values for every config key. Each run ends with exit code 0, or with exit code 2 and
one line `seqexp: error: ...`; never a traceback; and after exit code 2 nothing is left: no
MLflow run, no cache entry.

The CLI runs in this process (`seqexp.apps.cli.main` with a fixed argv), so an example costs a Hydra
composition, not a Python start. The default profile tries a few examples per property, so that
the default suite stays fast; the `slow` profile tries thousands:

    python -m pytest -m fuzz tests/test_contract.py              # @fuzz tests, thousands each
    HYPOTHESIS_PROFILE=slow python -m pytest tests/test_contract.py  # the default tests, as many

(HYPOTHESIS_PROFILE=seqexp-medium: 150 examples each, a few minutes.)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from helpers import compose_config, run_seqexp, tiny_overrides

_COMMON = dict(deadline=None, derandomize=False, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("seqexp-quick", max_examples=3, **_COMMON)
settings.register_profile("seqexp-medium", max_examples=150, **_COMMON)
settings.register_profile("slow", max_examples=2000, **_COMMON)
QUICK = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "seqexp-quick"))
# A config-value example may train a model for an epoch: two of them by default.
QUICK_VALUES = settings(QUICK, max_examples=2) if "HYPOTHESIS_PROFILE" not in os.environ \
    else QUICK
THOROUGH = settings.get_profile("slow")


# --------------------------------------------------------------------------- running seqexp
class Workspace:
    """One folder for every example: an MLflow store (schema made once) and a data folder whose
    cache is emptied between examples."""

    def __init__(self, root: Path, store: Path) -> None:
        self.root = root
        self.db = root / "mlflow.db"
        shutil.copy(store, self.db)
        self.uri = f"sqlite:///{self.db}"
        self.data = root / "data"

    def run_ids(self) -> set[str]:
        client = MlflowClient(self.uri)
        return {run.info.run_id for e in client.search_experiments()
                for run in client.search_runs([e.experiment_id])}

    def cache_entries(self) -> list[str]:
        folder = self.data / "processed"
        return sorted(p.name for p in folder.iterdir() if p.name != ".digests"
                      ) if folder.exists() else []

    def argv(self, *overrides: str) -> list[str]:
        return [*overrides, f"paths.data_dir={self.data}", f"mlflow.tracking_uri={self.uri}",
                # a folder of its own for each run (seqexp refuses a folder another run holds)
                f"hydra.run.dir={self.root / 'outputs'}/${{seqexp_run_token:}}",
                "train.progress=false",
                "mlflow.log_checkpoint=false"]


def assert_contract(space: Workspace, argv: list[str], refused_key: str | None = None,
                    raw_file: Path | None = None) -> tuple[int, str]:
    """Run seqexp and check the contract. After exit code 2 nothing half-done is left: no
    temporary folder, no RUNNING run, and every cache entry complete. An error found before any
    work (a config value `refused_key` refused by its rule, a `raw_file` refused by its reader)
    leaves no run and no cache entry at all; one found later (a model that diverges, a split
    without test events) ends a started run FAILED and keeps the valid cache entry."""
    runs_before = space.run_ids()
    shutil.rmtree(space.data / "processed", ignore_errors=True)
    code, output = run_seqexp(argv)
    where = f"seqexp {' '.join(argv)}\n{output[-3000:]}"
    assert code in (0, 2), where
    assert "Traceback" not in output and "Exception ignored" not in output, where
    if code != 2:
        return code, output
    errors = [line for line in output.splitlines() if line.startswith("seqexp: error: ")]
    assert len(errors) == 1, where
    processed = space.data / "processed"
    leftovers = [p.name for p in processed.glob(".*") if p.name != ".digests"]
    assert leftovers == [], where
    assert all((processed / entry / "meta.json").is_file() for entry in space.cache_entries())
    client = MlflowClient(space.uri)
    new_runs = [client.get_run(run_id) for run_id in space.run_ids() - runs_before]
    assert all(run.info.status == "FAILED" for run in new_runs), where
    if refused_key is not None and errors[0].startswith(f"seqexp: error: {refused_key}="):
        assert new_runs == [] and space.cache_entries() == [], where
    if raw_file is not None and errors[0].startswith(f"seqexp: error: {raw_file}: "):
        assert new_runs == [] and list(processed.glob("*")) + list(processed.glob(".*")) == [], \
            where
    if "MLflow run" not in output:  # the run never started: nothing was written at all
        assert new_runs == [], where
    return code, output


@pytest.fixture(scope="module")
def space(empty_store):
    root = Path(tempfile.mkdtemp(prefix="seqexp-contract-"))
    yield Workspace(root, empty_store)
    shutil.rmtree(root, ignore_errors=True)


def test_a_deleted_key_that_the_run_reads_is_one_line(space):
    """`~split.test_frac` passes the schema (which checks the keys a config has) but the
    split needs it: one line naming the key, nothing half-done left."""
    code, output = assert_contract(space, space.argv("~split.test_frac"))
    assert code == 2 and "seqexp: error: split.test_frac is not in the config" in output


# --------------------------------------------------------------------------- malformed files
_ints = st.integers(-3, 40)
_junk = st.binary(max_size=30)  # any bytes: not UTF-8, separators, newlines, NULs
_weird_number = st.sampled_from(["inf", "-inf", "nan", "1e30", "-9223372036854775809",
                                 "99999999999999999999", "", "-0", "0x1F", "1.5", "\u00e9"])


def _movielens_line(sep: bytes):
    fields = st.one_of(_ints.map(str), _weird_number).map(str.encode)
    valid = st.tuples(_ints, _ints, st.sampled_from([b"1", b"4.5"]), st.integers(0, 10**9)).map(
        lambda t: sep.join([str(t[0]).encode(), str(t[1]).encode(), t[2], str(t[3]).encode()]))
    odd = st.lists(st.one_of(fields, _junk), min_size=1, max_size=6).map(sep.join)
    return st.one_of(valid, valid, odd, _junk)


_NAMES = st.sampled_from([b"A", b"Bj\xc3\xb6rk", b"Bj\xf6rk", b"", b'"Q"', b"\xff\xfe", b"x\ty"])
_TIMES = st.sampled_from([b"2009-05-04T23:08:57Z", b"2009-05-04T23:09:57Z", b"2009-05-04",
                          b"", b"2009-13-45T99:99:99Z", b"\xe9"])


def _lastfm_line():
    valid = st.tuples(st.sampled_from([b"user_000001", b"user_000002", b"u\xe9"]), _TIMES,
                      _NAMES, _NAMES).map(lambda t: b"\t".join([t[0], t[1], b"", t[2], b"",
                                                                t[3]]))
    return st.one_of(valid, valid, _junk)


def _csv_line():
    value = st.one_of(_ints.map(str).map(str.encode), _weird_number.map(str.encode), _NAMES)
    valid = st.tuples(value, value, st.one_of(st.integers(0, 10**6).map(str).map(str.encode),
                                              _weird_number.map(str.encode), _TIMES))
    return st.one_of(valid.map(b",".join), _junk)


FORMATS = {
    # dataset: (file name, header line or None, line strategy)
    "ml10m": ("ratings.dat", None, _movielens_line(b"::")),
    "ml1m": ("ratings.dat", None, _movielens_line(b"::")),
    "ml100k": ("u.data", None, _movielens_line(b"\t")),
    "ml20m": ("ratings.csv", b"userId,movieId,rating,timestamp", _movielens_line(b",")),
    "lastfm": ("listens.tsv", None, _lastfm_line()),
    "csv": ("events.csv", b"user,item,timestamp", _csv_line()),
}


@st.composite
def malformed_files(draw):
    dataset = draw(st.sampled_from(sorted(FORMATS)))
    name, header, line = FORMATS[dataset]
    lines = draw(st.lists(line, max_size=40))
    if header is not None and draw(st.booleans()):
        lines.insert(0, header)
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    return dataset, name, ending.join(lines) + draw(st.sampled_from([ending, b""]))


def _check_file(space: Workspace, case) -> None:
    dataset, name, content = case
    raw = space.root / "raw-files"
    raw.mkdir(exist_ok=True)
    path = raw / name
    path.write_bytes(content)
    argv = space.argv("model=pop", f"dataset={dataset}", f"dataset.path={path}",
                      "dataset.min_item_support=1")
    assert_contract(space, argv, raw_file=path)


@QUICK
@given(case=malformed_files())
def test_malformed_raw_files_keep_the_contract(space, case):
    _check_file(space, case)


@pytest.mark.fuzz
@THOROUGH
@given(case=malformed_files())
def test_malformed_raw_files_keep_the_contract_thoroughly(space, case):
    _check_file(space, case)


# --------------------------------------------------------------------------- bad config values
MODELS = ["gru", "rectified_ugru", "dream", "itemknn", "expdecay_knn", "mf", "seqmf", "pop"]
# Keys set by the run's own command line (tiny data, the workspace's folders) are not drawn.
_FIXED = {"paths.data_dir", "paths.raw_dir", "paths.cache_dir", "mlflow.tracking_uri",
          "train.progress", "mlflow.log_checkpoint"}


@functools.cache
def _keys_of(model: str) -> list[str]:
    cfg = OmegaConf.to_container(compose_config([f"model={model}"]), resolve=False)

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"
    return [k for k in walk(cfg) if k not in _FIXED and not k.startswith("hydra")]


BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "-2", "1.5", "-0.5", "2", "abc", "true", "false",
              "null", "[]", "[0]", "[1,-2]", "''", "1e400", "-99999999999", "{}", "1e-300",
              "${oc.env:SEQEXP_UNSET_VARIABLE}"]


def _check_value(space: Workspace, model: str, pick: int, value: str) -> None:
    keys = _keys_of(model)
    key = keys[pick % len(keys)]
    tiny = [o for o in tiny_overrides(space.data) if not o.startswith(("paths.", "train.prog"))]
    small_model = ["model.hidden_size=8"] if "model.hidden_size" in keys else []
    if "model.n_negatives" in keys:
        small_model.append("model.n_negatives=8")
    overrides = [f"model={model}", *tiny, "train.epochs=1", *small_model]
    overrides = [o for o in overrides if not o.startswith(f"{key}=")]
    assert_contract(space, space.argv(*overrides, f"{key}={value}"), refused_key=key)


@QUICK_VALUES
@given(model=st.sampled_from(MODELS), pick=st.integers(0, 10**6),
       value=st.sampled_from(BAD_VALUES))
def test_bad_config_values_keep_the_contract(space, model, pick, value):
    _check_value(space, model, pick, value)


@pytest.mark.fuzz
@THOROUGH
@given(model=st.sampled_from(MODELS), pick=st.integers(0, 10**6),
       value=st.sampled_from(BAD_VALUES))
def test_bad_config_values_keep_the_contract_thoroughly(space, model, pick, value):
    _check_value(space, model, pick, value)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_unwritable_data_dir_through_the_command(space, monkeypatch, code):
    from seqexp.data import cache

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache.np, "save", refuse)
    argv = space.argv("model=pop", *[o for o in tiny_overrides(space.data)
                                     if o.startswith("dataset.")])
    exit_code, output = assert_contract(space, argv)
    assert exit_code == 2
    (line,) = [x for x in output.splitlines() if x.startswith("seqexp: error: ")]
    assert line.startswith(f"seqexp: error: cannot write the processed-data cache in "
                           f"{space.data / 'processed'} ({os.strerror(code)}); ")
    assert "paths.cache_dir=" in line


# --------------------------------------------------------------------------- damaged files
# A checkpoint, a cache entry or an MLflow store damaged on disk (a disk error, a copy cut
# short, a hand edit): one line `seqexp: error: ...` / `seqexp-recommend: error: ...` with exit
# code 2, a cache entry rebuilt with a warning, or a run that goes through; never a traceback,
# nothing half-written left.
@st.composite
def damaged(draw, size: int):
    """(kind, argument) of a damage to a file of `size` bytes: cut at a byte, or bytes flipped."""
    if draw(st.booleans()):
        return "truncate", draw(st.integers(0, size - 1))
    return "flip", draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)),
                                 min_size=1, max_size=8))


def damage(content: bytes, how) -> bytes:
    kind, argument = how
    if kind == "truncate":
        return content[:argument]
    out = bytearray(content)
    for position, mask in argument:
        out[position] ^= mask
    return bytes(out)


def assert_one_line(code: int, output: str, prog: str, where: str) -> None:
    """Exit code 0, or 2 with exactly one line `prog: error: ...`; never a traceback."""
    assert code in (0, 2), where
    assert "Traceback" not in output and "Exception ignored" not in output, where
    if code == 2:
        assert len([x for x in output.splitlines() if x.startswith(f"{prog}: error: ")]) == 1, \
            where


def run_recommend(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `seqexp-recommend argv`, in this process."""
    from seqexp.apps import recommend

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            recommend.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


class DamageSpace(Workspace):
    """A workspace with one gru run stopped by SIGTERM after epoch 1 (KILLED, resumable): its
    best.pt and last.pt, its cache entry and its store, kept whole to damage copies of."""

    def __init__(self, root: Path, store: Path) -> None:
        super().__init__(root, store)
        from helpers import SignalAfterEpoch, adding_callback
        from seqexp.run import experiment

        self.run_args = self.argv("model=gru", "model.hidden_size=8", "train.num_threads=1",
                                  *[o for o in tiny_overrides(self.data)
                                    if not o.startswith(("paths.", "train.prog"))])
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(experiment, "build_trainer", adding_callback(
                experiment.build_trainer, SignalAfterEpoch(1, signal.SIGTERM)))
            code, output = run_seqexp(self.run_args)
        assert code == 143, output[-3000:]
        (self.run_id,) = self.run_ids()
        outputs = MlflowClient(self.uri).get_run(self.run_id).data.tags["outputs_dir"]
        self.checkpoints = Path(outputs) / "checkpoints"
        self.best = (self.checkpoints / "best.pt").read_bytes()
        self.state = (self.checkpoints / "last.pt").read_bytes()
        (self.entry,) = [root / "data" / "processed" / e for e in self.cache_entries()]
        self.pristine_entry = root / "pristine-entry"
        shutil.copytree(self.entry, self.pristine_entry)
        self.pristine_db = root / "pristine.db"
        shutil.copy(self.db, self.pristine_db)

    def pop_args(self, tracking_uri: str | None = None) -> list[str]:
        """A quick run (model=pop) on the same data, in a folder of its own."""
        args = self.argv("model=pop", *[o for o in tiny_overrides(self.data)
                                        if o.startswith("dataset.")])
        changed = {"hydra.run.dir": f"{self.root / 'pop'}/${{seqexp_run_token:}}",
                   "mlflow.tracking_uri": tracking_uri}
        return [f"{o.split('=', 1)[0]}={changed[o.split('=', 1)[0]]}"
                if changed.get(o.split("=", 1)[0]) else o for o in args]

    def run_status(self) -> tuple[str, dict]:
        run = MlflowClient(self.uri).get_run(self.run_id)
        return run.info.status, run.data.tags


@pytest.fixture(scope="module")
def damage_space(empty_store):
    root = Path(tempfile.mkdtemp(prefix="seqexp-damage-"))
    yield DamageSpace(root, empty_store)
    shutil.rmtree(root, ignore_errors=True)


def _check_checkpoint(space: DamageSpace, how) -> None:
    broken = space.root / "broken" / "best.pt"
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(damage(space.best, how))
    code, output = run_recommend([str(broken), "--user", "0", "--k", "3"])
    assert_one_line(code, output, "seqexp-recommend", f"{how}\n{output[-3000:]}")
    assert sorted(p.name for p in broken.parent.iterdir()) == ["best.pt"]


def _check_state(space: DamageSpace, cut: int) -> None:
    """resume=last with last.pt cut short: refused before the run is changed."""
    state = space.checkpoints / "last.pt"
    state.write_bytes(space.state[:cut])
    try:
        code, output = run_seqexp([*space.run_args, "resume=last"])
    finally:
        state.write_bytes(space.state)
    where = f"last.pt cut at {cut}\n{output[-3000:]}"
    assert_one_line(code, output, "seqexp", where)
    assert code == 2 and f"seqexp: error: resume: run {space.run_id} cannot continue" in output, \
        where
    status, tags = space.run_status()
    assert status == "KILLED" and "resumes" not in tags, where
    assert [p.name for p in space.checkpoints.iterdir() if ".tmp" in p.name] == [], where


CACHE_FILES = ("items.npy", "offsets.npy", "meta.json")


@st.composite
def cache_damages(draw):
    """A damage to one file of a cache entry: bytes cut or flipped, or a change that parses but
    does not fit (ids beyond n_items, offsets cut short or out of order, meta.json's counts)."""
    name = draw(st.sampled_from(CACHE_FILES))
    kind = draw(st.sampled_from(["bytes", "bytes", "semantic"]))
    if kind == "bytes":
        return name, draw(damaged(4096))  # positions beyond the file wrap around
    if name == "items.npy":
        return name, ("item_beyond", draw(st.integers(0, 10**6)), draw(st.integers(0, 100)))
    if name == "offsets.npy":
        return name, draw(st.sampled_from([("offsets_short",), ("offsets_swapped",)]))
    return name, draw(st.sampled_from([("n_items", -1), ("n_items", 7), ("drop", "n_items"),
                                       ("drop", "stats"), ("not_json",)]))


def _damage_entry(entry: Path, name: str, how) -> bool:
    """Damage the file; True when the damage is one the cache must notice (every semantic one,
    a cut), False for flipped bytes, which may land where nothing can tell (a value in range)."""
    import json

    import numpy as np

    path = entry / name
    if how[0] in ("truncate", "flip"):
        content = path.read_bytes()
        kind, argument = how
        if kind == "truncate":
            path.write_bytes(content[:argument % max(len(content), 1)])
            return True
        path.write_bytes(damage(content, ("flip", [(p % len(content), m) for p, m in argument])))
        return False
    if name == "items.npy":
        items = np.load(path)
        items[how[1] % len(items)] = int(json.loads((entry / "meta.json").read_text())[
            "n_items"]) + how[2]
        np.save(path, items)
    elif how[0] == "offsets_short":
        np.save(path, np.load(path)[:-2])
    elif how[0] == "offsets_swapped":
        offsets = np.load(path)
        offsets[[1, 2]] = offsets[[2, 1]] + [0, 1]  # out of order
        np.save(path, offsets)
    else:
        meta = json.loads((entry / "meta.json").read_text())
        if how[0] == "n_items":
            meta["n_items"] = int(meta["n_items"]) + how[1]
        elif how[0] == "drop":
            del meta[how[1]]
        path.write_text("{not json" if how[0] == "not_json" else json.dumps(meta))
    return True


def _check_cache(space: DamageSpace, case) -> None:
    name, how = case
    shutil.rmtree(space.entry, ignore_errors=True)
    shutil.copytree(space.pristine_entry, space.entry)
    noticed = _damage_entry(space.entry, name, how)
    code, output = run_seqexp(space.pop_args())
    where = f"{name}: {how}\n{output[-3000:]}"
    assert_one_line(code, output, "seqexp", where)
    if noticed:  # rebuilt with a warning, and the run goes through
        assert code == 0 and f"cache entry {space.entry}" in output, where
        assert "preprocessing again" in output, where
    processed = space.entry.parent
    assert [p.name for p in processed.glob(".*") if p.name != ".digests"] == [], where
    assert (space.entry / "meta.json").is_file(), where


STORE_TABLES = ("experiments", "runs", "metrics", "latest_metrics", "params", "tags",
                "experiment_tags", "alembic_version", "datasets", "inputs", "input_tags")


@st.composite
def store_damages(draw):
    if draw(st.booleans()):
        return "drop", draw(st.sampled_from(STORE_TABLES))
    return draw(damaged(1 << 20))


def _check_store(space: DamageSpace, how) -> None:
    import sqlite3

    # A new path each time: MLflow keeps an engine per store URI in the process.
    folder = Path(tempfile.mkdtemp(prefix="store-", dir=space.root))
    db = folder / "mlflow.db"
    if how[0] == "drop":
        shutil.copy(space.pristine_db, db)
        with sqlite3.connect(db) as connection:
            connection.execute(f"DROP TABLE {how[1]}")
    else:
        content = space.pristine_db.read_bytes()
        kind, argument = how
        if kind == "flip":
            argument = [(p % len(content), m) for p, m in argument]
        else:
            argument %= len(content)
        db.write_bytes(damage(content, (kind, argument)))
    code, output = run_seqexp(space.pop_args(f"sqlite:///{db}"))
    where = f"store {how}\n{output[-3000:]}"
    assert_one_line(code, output, "seqexp", where)
    left = sorted(p.name for p in folder.iterdir())
    assert set(left) <= {"mlflow.db", ".mlflow.db.lock", "mlartifacts"}, where


@QUICK
@given(how=damaged(4096))
def test_a_damaged_checkpoint_keeps_the_contract(damage_space, how):
    size = len(damage_space.best)
    kind, argument = how
    how = (kind, argument % size) if kind == "truncate" else (
        kind, [(p % size, m) for p, m in argument])
    _check_checkpoint(damage_space, how)


@settings(QUICK, max_examples=2) if "HYPOTHESIS_PROFILE" not in os.environ else QUICK
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_a_cut_training_state_is_refused_without_changing_the_run(damage_space, fraction):
    _check_state(damage_space, int(fraction * len(damage_space.state)))


@QUICK
@given(case=cache_damages())
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(damage_space, case):
    _check_cache(damage_space, case)


@QUICK
@given(how=store_damages())
def test_a_damaged_mlflow_store_keeps_the_contract(damage_space, how):
    _check_store(damage_space, how)


@pytest.mark.fuzz
@THOROUGH
@given(how=damaged(1 << 16), fraction=st.floats(0, 1, exclude_max=True),
       case=cache_damages(), store=store_damages())
def test_damaged_files_keep_the_contract_thoroughly(damage_space, how, fraction, case, store):
    size = len(damage_space.best)
    kind, argument = how
    _check_checkpoint(damage_space, (kind, argument % size) if kind == "truncate" else (
        kind, [(p % size, m) for p, m in argument]))
    _check_state(damage_space, int(fraction * len(damage_space.state)))
    _check_cache(damage_space, case)
    _check_store(damage_space, store)
