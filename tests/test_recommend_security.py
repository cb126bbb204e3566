"""Loading a checkpoint never runs anything from the file, and every seqexp-recommend failure is
one line with exit code 2 that leaves no temporary file behind.

The crafted configs below are live: handed to Hydra's instantiate (what `seqexp.load` did
before), each one creates its marker file (`test_the_crafted_configs_do_run_code_when_
instantiated`), so their refusal is a real one."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_recommend import trained

import seqexp
from seqexp.apps.recommend import main
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import group_options
from seqexp.run.registry import registry


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{model: its best checkpoint}, trained once for the module (gru with hidden size 8)."""
    data_dir = tmp_path_factory.mktemp("security-data")
    found = {}
    for name in ("gru", "pop"):
        folder = tmp_path_factory.mktemp(f"security-{name}")
        trained(name, data_dir, folder)
        found[name] = folder / "checkpoints" / "best.pt"
    return found


class _CreatesMarker:
    """Unpickling this object calls open(marker, "w"): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _read_pickle(marker: Path) -> dict[str, Any]:
    """pandas.read_pickle of an in-memory pickle that creates `marker` (issue 25's exploit)."""
    payload = pickle.dumps(_CreatesMarker(marker)).hex()
    return {"_target_": "pandas.read_pickle", "filepath_or_buffer": {
        "_target_": "io.BytesIO", "initial_bytes": {
            "_target_": "builtins.bytes.fromhex", "_args_": [payload]}}}


def _write_text(marker: Path) -> dict[str, Any]:
    """pathlib.Path(marker).write_text("pwned"): writes any file."""
    return {"_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"]}


# name -> (how the config's model block is changed, whether instantiate would create the marker)
CRAFTED = {
    "read_pickle": lambda m, marker: m.update(dropout=_read_pickle(marker)),
    "write_text": lambda m, marker: m.update(dropout=_write_text(marker)),
    "target_in_a_list": lambda m, marker: m.update(dropout=[0.5, _write_text(marker)]),
    "partial_target": lambda m, marker: m.update(
        dropout={**_write_text(marker), "_partial_": False}),
    "top_level_target": lambda m, marker: m.update(_write_text(marker)),
    "top_level_args": lambda m, marker: m.update(
        _args_=[_write_text(marker)]),
}
REFUSED = {
    **CRAFTED,
    "top_level_partial_false": lambda m, marker: m.update(_partial_=False),
    "recursive": lambda m, marker: m.update(_recursive_=False),
    "convert": lambda m, marker: m.update(_convert_="all"),
    "plain_nested_mapping": lambda m, marker: m.update(dropout={"value": 0.5}),
    "list_in_a_list": lambda m, marker: m.update(dropout=[[0.5]]),
    "unknown_key": lambda m, marker: m.update(bogus=1),
    "size_key": lambda m, marker: m.update(n_items=3),
    "interpolation": lambda m, marker: m.update(dropout="${oc.env:HOME}"),
    "another_models_class": lambda m, marker: m.update(
        _target_="seqexp.models.popularity.Popularity"),
    "unknown_model": lambda m, marker: m.update(name="mine"),
}
# what the one line names, besides the file
NAMED = {"read_pickle": "model.dropout holds _target_ (pandas.read_pickle)",
         "write_text": "model.dropout holds _target_",
         "target_in_a_list": "model.dropout[1] holds _target_",
         "partial_target": "model.dropout holds _target_",
         "top_level_target": "model._target_='pathlib.Path.write_text'",
         "top_level_args": "model._args_ would configure Hydra",
         "top_level_partial_false": "model._partial_",
         "recursive": "model._recursive_ would configure Hydra",
         "convert": "model._convert_ would configure Hydra",
         "plain_nested_mapping": "model.dropout is a mapping",
         "list_in_a_list": "model.dropout[0] is a list inside a list",
         "unknown_key": "model.bogus is not an option",
         "size_key": "model.n_items is set from the data",
         "interpolation": "model.dropout='${oc.env:HOME}' is an interpolation",
         "another_models_class": "is not the class of model=gru",
         "unknown_model": "model.name='mine' is not a model"}


def _rewrite(source: Path, dest: Path, change=None, **payload_changes: Any) -> Path:
    """A copy of checkpoint `source` at `dest`: its config's model block changed by
    change(model_dict), its payload's entries replaced (None: removed)."""
    payload = torch.load(source, weights_only=True)
    if change is not None:
        config = OmegaConf.to_container(OmegaConf.create(payload["config"]))
        change(config["model"])
        payload["config"] = OmegaConf.to_yaml(OmegaConf.create(config))
    for key, value in payload_changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, dest)
    return dest


def _cli(argv: list[str], capsys) -> str:
    """seqexp-recommend's stderr line, checked to be one line with exit code 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("seqexp-recommend: error: ") and captured.err.count("\n") == 1
    return captured.err


def test_the_allowlist_is_the_class_of_every_conf_model_file():
    from helpers import compose_config

    targets = registry().models
    assert sorted(targets) == group_options("model")
    for name in targets:
        assert targets[name] == compose_config([f"model={name}"]).model["_target_"]


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_the_crafted_configs_do_run_code_when_instantiated(name, tmp_path):
    """The payloads are live: what the old `load` did with them writes the marker."""
    model: dict[str, Any] = {}
    marker = tmp_path / "marker"
    CRAFTED[name](model, marker)
    nested = [v for k, v in model.items() if k != "_args_" and isinstance(v, (dict, list))]
    if "_target_" in model:  # the model's own class replaced by the call
        instantiate(OmegaConf.create({k: model[k] for k in ("_target_", "_args_")}))
    elif "_args_" in model:
        instantiate(OmegaConf.create(model["_args_"][0]))
    else:
        instantiate(OmegaConf.create({"x": nested[0]}).x)
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_crafted_checkpoint_config_is_refused_and_runs_nothing(name, checkpoints, tmp_path,
                                                                  capsys):
    marker = tmp_path / "marker"
    path = _rewrite(checkpoints["gru"], tmp_path / "crafted.pt",
                    lambda model: REFUSED[name](model, marker))
    with pytest.raises(SeqexpError) as refused:
        seqexp.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert NAMED[name] in message
    assert not marker.exists()
    err = _cli([str(path), "--user", "0"], capsys)
    assert NAMED[name] in err and f"{path}: " in err
    assert not marker.exists()


# A plain value of the right kind but out of its rule, or a size beyond the machine's memory:
# {name: (the model key, its value, what the one line says)}
TAMPERED_VALUES = {
    "bogus_cell": ("cell", "bogus", "its model.cell='bogus' must be one of gru,"),
    "dropout_above_1": ("dropout", 7.5, "its model.dropout=7.5 must be a number in [0, 1]"),
    "negative_hidden_size": ("hidden_size", -5, "its model.hidden_size=-5 must be an integer"),
    "text_hidden_size": ("hidden_size", "abc", "its model.hidden_size='abc' must be an integer"),
    "large_hidden_size": ("hidden_size", 10**8, "model.hidden_size=100000000 makes its model "
                          "need ~"),
    "huge_hidden_size": ("hidden_size", 10**12, "model.hidden_size=1000000000000 makes its "
                         "model need over 9.2 EB (more than torch can address)"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED_VALUES))
def test_a_tampered_value_is_refused_by_the_schema_or_the_memory_estimate(
        name, checkpoints, tmp_path, capsys, monkeypatch):
    """Checked as the command line's values are, and the model's size against the memory,
    before any model is built: the model's class is never called with the tampered value."""
    key, value, named = TAMPERED_VALUES[name]
    path = _rewrite(checkpoints["gru"], tmp_path / "tampered.pt",
                    lambda model: model.update({key: value}))
    from seqexp.models.recurrent import RecurrentRecommender

    real_builds = []
    original = RecurrentRecommender.__init__

    def recording(self, *args, **kwargs) -> None:
        if torch.empty(0).device.type != "meta":  # a build that allocates its tensors
            real_builds.append(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(RecurrentRecommender, "__init__", recording)
    with pytest.raises(SeqexpError) as refused:
        seqexp.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and named in message
    err = _cli([str(path), "--user", "0"], capsys)
    assert named in err
    if isinstance(value, int) and value > 10**6:
        assert "available; refused before anything is built (its weights hold ~" in err
    assert real_builds == []


def test_the_seqexp_recommend_command_refuses_a_tampered_size_before_allocating(checkpoints,
                                                                                tmp_path):
    """The installed command in its own process: a model of ~240 PB is one line, exit 2."""
    path = _rewrite(checkpoints["gru"], tmp_path / "tampered.pt",
                    lambda model: model.update(hidden_size=10**8))
    result = subprocess.run([sys.executable, "-m", "seqexp.apps.recommend", str(path),
                             "--user", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"seqexp-recommend: error: {path}: model.hidden_size="
                                    f"100000000 makes its model need ~")


def test_an_unknown_key_of_a_model_without_options_is_refused(checkpoints, tmp_path, capsys):
    path = _rewrite(checkpoints["pop"], tmp_path / "crafted.pt",
                    lambda model: model.update(window=3))
    assert "model.window is not an option of model=pop" in _cli([str(path), "--user", "0"],
                                                                 capsys)


def test_the_seqexp_recommend_command_refuses_the_pickle_exploit(checkpoints, tmp_path):
    """The installed command itself (python -m seqexp.apps.recommend), in its own process."""
    marker = tmp_path / "marker"
    path = _rewrite(checkpoints["gru"], tmp_path / "crafted.pt",
                    lambda model: CRAFTED["read_pickle"](model, marker))
    result = subprocess.run([sys.executable, "-m", "seqexp.apps.recommend", str(path),
                             "--user", "0"],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"seqexp-recommend: error: {path}: model.dropout holds "
                                    f"_target_ (pandas.read_pickle)")
    assert result.stderr.count("\n") == 1
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt"]


def test_a_checkpoint_holding_a_pickled_object_is_refused_by_the_command(checkpoints, tmp_path,
                                                                        capsys):
    marker = tmp_path / "marker"
    path = _rewrite(checkpoints["pop"], tmp_path / "crafted.pt", extra=_CreatesMarker(marker))
    assert "refused" in _cli([str(path), "--user", "0"], capsys)
    assert not marker.exists()


def _inconsistent(name: str, source: Path, dest: Path) -> Path:
    payload = torch.load(source, weights_only=True)
    if name == "hidden_size":
        return _rewrite(source, dest, lambda model: model.update(hidden_size=9))
    if name == "train_items_missing":
        return _rewrite(source, dest, train_items=None)
    if name == "item_ids_cut_short":
        return _rewrite(source, dest, item_ids=payload["item_ids"][:5])
    if name == "user_ids_cut_short":
        return _rewrite(source, dest, user_ids=payload["user_ids"][:5])
    if name == "offsets_past_the_items":
        return _rewrite(source, dest, train_items=payload["train_items"][:-3])
    if name == "float_items":
        return _rewrite(source, dest, train_items=payload["train_items"].float())
    if name == "bad_yaml":
        return _rewrite(source, dest, config="model: [1\n")
    if name == "no_model_block":
        return _rewrite(source, dest, config="seed: 1\n")
    if name == "weights_not_tensors":
        return _rewrite(source, dest, model={"embedding.weight": [1.0]})
    raise AssertionError(name)


INCONSISTENT = {
    "hidden_size": "the weights do not fit the model its config describes (size mismatch",
    "train_items_missing": "the checkpoint has no train_items",
    "item_ids_cut_short": "for 5 item_ids",
    "user_ids_cut_short": "users' offsets for 5 user_ids",
    "offsets_past_the_items": "train_offsets do not cut the",
    "float_items": "train_items is not a 1-d integer tensor",
    "bad_yaml": "its config is not valid YAML",
    "no_model_block": "its config has no model block",
    "weights_not_tensors": "its model weights are not a mapping of names to tensors",
}


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_an_inconsistent_checkpoint_is_one_line(name, checkpoints, tmp_path, capsys,
                                                monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = _inconsistent(name, checkpoints["gru"], tmp_path / "bad.pt")
    with pytest.raises(SeqexpError, match=f"^{path}: ") as refused:
        seqexp.load(path)
    assert INCONSISTENT[name] in str(refused.value) and "\n" not in str(refused.value)
    assert INCONSISTENT[name] in _cli([str(path), "--user", "0"], capsys)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "tmp"]


@pytest.mark.parametrize(("device", "expected"), [
    ("banana", "--device 'banana' is not a device; use cpu, cuda or cuda:N"),
    ("cuda", "--device cuda: CUDA is not available here; use --device cpu"),
    ("meta", "--device 'meta': seqexp-recommend runs on cpu or cuda"),
])
def test_a_device_that_cannot_be_used_is_one_line(device, expected, checkpoints, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = _cli([str(checkpoints["pop"]), "--user", "0", "--device", device], capsys)
    assert expected in err


def test_a_checkpoint_downloaded_from_mlflow_leaves_no_temporary_folder(checkpoints, tmp_path,
                                                                        monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    # main() turns MLflow's download bar off (setdefault): put the variable back afterwards
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "recorded")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert tempfile.gettempdir() == str(scratch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    good = client.create_run(experiment).info.run_id
    client.log_artifact(good, str(checkpoints["pop"]), "checkpoints")
    bad_checkpoint = _inconsistent("train_items_missing", checkpoints["pop"],
                                   tmp_path / "bad" / "best.pt")
    bad = client.create_run(experiment).info.run_id
    client.log_artifact(bad, str(bad_checkpoint), "checkpoints")
    empty = client.create_run(experiment).info.run_id

    def seqexp_entries() -> list[str]:
        return sorted(p.name for p in Path(tempfile.gettempdir()).iterdir()
                      if p.name.startswith("seqexp-"))

    before = seqexp_entries()
    main([good, "--user", "0", "--k", "3", "--tracking-uri", uri])
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert seqexp_entries() == before
    assert seqexp.load(good, uri).item_ids
    assert seqexp_entries() == before
    assert f"run {bad}'s artifact checkpoints/best.pt: the checkpoint has no train_items" in _cli(
        [bad, "--user", "0", "--tracking-uri", uri], capsys)
    assert seqexp_entries() == before
    assert "has no best checkpoint" in _cli([empty, "--user", "0", "--tracking-uri", uri],
                                            capsys)
    assert seqexp_entries() == before


def test_weights_that_are_not_finite_are_one_line_not_an_empty_table(checkpoints, tmp_path,
                                                                      capsys):
    source = checkpoints["gru"]
    weights = torch.load(source, weights_only=True)["model"]
    crafted = _rewrite(source, tmp_path / "nan.pt",
                       model={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                              for k, v in weights.items()})
    line = _cli([str(crafted), "--user", "0", "--k", "5"], capsys)
    assert line == ("seqexp-recommend: error: model=gru scores NaN: its checkpoint holds weights "
                    "that are not finite (a diverged training?); use another run\n")
