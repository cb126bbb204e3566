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

import errno
import functools
import os
import shutil
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
                f"hydra.run.dir={self.root / 'outputs'}", "train.progress=false",
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
