"""What seqexp says: the pre-flight check of the command line, its --help page, a run without
validation events, the words at the end of a run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import compose_config, preprocess, tiny_overrides
from seqexp.apps.cli import check_flags
from seqexp.apps.preflight import check_command_line, split_command_line
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import group_options
from seqexp.data.interactions import Interactions
from seqexp.run.experiment import run_experiment


@pytest.mark.parametrize(("argv", "expected"), [
    ([], None),
    (["model=itemknn", "model.neighbours=5", "train.lr=1e-3"], None),
    (["-m", "model=gru,linear_ugru", "model.hidden_size=32,64"], None),
    (["--cfg", "job", "model=mf", "model.factors=5"], None),
    (["--help"], None),
    # an added model key is passed to the constructor: read when it takes that parameter,
    # and then refused where the model's cell has no such option (its class's config_checks)
    (["model=gru", "+model.threshold=hard"],
     "model.threshold is not an option of model.cell=gru (its options: none)"),
    (["model=mf", "+model.window=3"], "+model.window=3: nothing would read it"),
    (["model=itemknn", "+model.neighbors=5"], "did you mean model.neighbours?"),
    (["model=gru", "+model.loss=sampled_softmax"],
     "+model.loss=sampled_softmax: model.loss exists already; set it without the '+'"),
    (["eval.cutof=[5]"], "eval.cutof is not a config key; did you mean eval.cutoffs?"),
    (["seed=1", "sed=2"], "sed is not a config key; did you mean seed?"),
    # a preset's own sweep (hydra.sweeper.params) is checked like the command line's
    (["experiment=table2", "model.hidden_size=100"],
     "model.hidden_size: model=itemknn dataset=ml10m has no such key"),
    (["-m", "hparams_search=optuna", "split.val_frac=0.1,0"],
     "split.val_frac=0 leaves no validation events"),
    (["-m", "split.val_frac=0", "seed=1,2"], None),  # a grid needs no score
    # a key whose value is ??? (MISSING, to be set on the command line) is a key too
    (["dataset=csv", "dataset.path=events.csv", "dataset.item_col=song"], None),
    (["dataset=csv", "dataset.pth=events.csv"], "did you mean dataset.path?"),
])
def test_command_line_check_names_the_key_and_its_closest_neighbour(argv, expected):
    message = check_command_line(argv)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message, message


REFUSED_BEFORE_IMPORTS = """
import sys
from seqexp.apps.cli import main
sys.argv = ["seqexp", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print("exit", exc.code, *sorted(m for m in ("torch", "mlflow") if m in sys.modules))
"""


@pytest.mark.parametrize(("argv", "expected", "imported"), [
    (["train.lr=abc"], "seqexp: error: train.lr='abc' must be a finite number > 0", []),
    (["model=itemknn", "train.lr=abc"], "seqexp: error: train.lr='abc' must be", []),
    (["split.val_frac=2"], "seqexp: error: split.val_frac=2", []),
    (["model=nope"], "seqexp: error: model=nope is not a known model; choose one of", []),
    # a model key's rule is its class's, next to its constructor: the class (and torch) is
    # imported to check it, MLflow still is not
    (["model=itemknn", "model.neighbours=0"], "seqexp: error: model.neighbours=0 must be",
     ["torch"]),
    (["model.hidden_size=-3"], "seqexp: error: model.hidden_size=-3 must be an integer >= 1",
     ["torch"]),
    (["model=dream", "model.pooling=sum"], "seqexp: error: model.pooling='sum' must be one of "
                                           "max, mean", ["torch"]),
    # a model class's checks of several keys together (config_checks), with the keys' rules
    (["model=sasrec", "model.n_heads=3", "model.hidden_size=8"],
     "seqexp: error: model.n_heads=3 must divide model.hidden_size=8", ["torch"]),
    (["model=sasrec", "model.n_heads=3"],  # the other key from the model file (50)
     "seqexp: error: model.n_heads=3 must divide model.hidden_size=50", ["torch"]),
    (["model=hrnn", "model.session_gap_s=null"],
     "seqexp: error: model=hrnn needs session boundaries: set model.session_gap_s", ["torch"]),
    (["model.cell=cudnn_gru", "model.session_gap_s=60"],
     "seqexp: error: model.session_gap_s needs a cell that can restart its state inside a "
     "window; model.cell=cudnn_gru cannot", ["torch"]),
    (["model=rectified_ugru", "model.cell=gru"],
     "seqexp: error: model.threshold is not an option of model.cell=gru (its options: none)",
     ["torch"]),
    (["model=hrnn", "+model.omega=0.5"],
     "seqexp: error: model.omega is not an option of model.cell=hrnn", ["torch"]),
])
def test_a_refused_value_is_said_before_torch_and_mlflow_are_imported(argv, expected, imported):
    """Refused by the command line's check, before MLflow and any data or run; a key outside
    `model.*` also before torch: the model's class is imported only for its own keys."""
    done = subprocess.run([sys.executable, "-c", REFUSED_BEFORE_IMPORTS, *argv],
                          capture_output=True, text=True, timeout=120)
    # the last line: an environment's warnings (Hydra's, of a plugin) may come before it
    assert done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr
    assert done.stdout.split() == ["exit", "2", *imported]


@pytest.mark.parametrize("argv", [["train.lr=0.003"], ["train.epochs=0"], ["seed=7"],
                                  ["model=itemknn", "model.neighbours=5"],
                                  ["model=sasrec", "model.n_heads=2", "model.hidden_size=8"],
                                  ["model=hrnn", "model.session_gap_s=60"],
                                  ["model=rectified_ugru", "model.omega=0.5"]])
def test_an_accepted_value_passes_the_check(argv):
    assert check_command_line(argv) is None


def test_unknown_key_message_lists_the_group_keys():
    message = check_command_line(["train.epoch=3"])
    keys = message.split("(train keys: ", 1)[1].rstrip(")").split(", ")
    assert {"epochs", "batch_size", "lr", "patience"} <= set(keys)


def test_hydra_flags_are_not_taken_for_overrides():
    overrides, multirun, checkable = split_command_line(
        ["-m", "--cfg", "job", "--package", "model", "model=gru", "seed=1,2"])
    assert (overrides, multirun, checkable) == (["model=gru", "seed=1,2"], True, True)
    assert split_command_line(["--info", "config"])[2] is False


def test_help_is_seqexps_own_page_listing_every_option_of_every_group():
    result = subprocess.run([sys.executable, "-m", "seqexp.apps.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    page = result.stdout
    assert page.startswith("seqexp: train and evaluate") and "Hydra" not in page.splitlines()[0]
    for group in ("model", "dataset", "split", "experiment", "hparams_search",
                  "hydra/launcher"):
        assert f"{group}=" in page, group
        for option in group_options(group):
            assert option in page, (group, option)
    assert "seqexp --cfg job" in page and "mlflow ui --backend-store-uri" in page


def test_a_run_without_validation_trains_every_epoch_and_invents_no_score(tmp_path, store_uri):
    cfg = compose_config(["model=gru", "model.hidden_size=8", "split.val_frac=0",
                          *tiny_overrides(tmp_path / "data", tmp_path / "mlflow.db"),
                          "train.epochs=3", "train.patience=1"])
    result = run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    assert result.val_score is None
    assert result.metrics["epochs_run"] == 3
    assert not any(k.startswith(("best_", "val_")) for k in result.metrics)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert not any(k.startswith(("run/best_", "epoch/val_", "val_ties/"))
                   for k in run.data.metrics)
    assert run.data.metrics["run/epochs_run"] == 3
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_an_empty_global_time_test_split_names_a_key_of_that_split():
    raw = Interactions(user=np.array([0, 0, 1, 1]), item=np.array([0, 1, 0, 1]),
                       timestamp=np.array([1, 2, 3, 3]), source="ratings.dat")
    with pytest.raises(SeqexpError, match="lower split.test_quantile") as caught:
        preprocess(raw, {"name": "global_time", "test_quantile": 0.99,
                              "val_quantile": 0.5})
    assert "test_frac" not in str(caught.value)


def test_a_key_the_model_cannot_take_is_the_configs_fault_but_a_bug_inside_keeps_its_type(
        monkeypatch):
    from helpers import sequences
    from seqexp.models import factorisation
    from seqexp.run.experiment import build_model

    data = sequences([[0, 1, 2, 3], [1, 2, 3, 0]], n_items=4)
    with pytest.raises(SeqexpError, match="model=mf: got an unexpected keyword argument 'foo'"):
        build_model(compose_config(["model=mf", "+model.foo=1"]).model, data)

    def broken(self, *args, **kwargs):
        raise TypeError("a bug inside the constructor")

    monkeypatch.setattr(factorisation.MF, "__init__", broken)
    with pytest.raises(TypeError, match="a bug inside the constructor"):
        build_model(compose_config(["model=mf"]).model, data)


def test_a_config_view_of_a_sweep_is_one_line_not_hydras_traceback():
    assert "drop -m" in check_flags(["-m", "model=gru,mf", "--cfg", "job"])
    assert check_flags(["model=gru", "--cfg", "job"]) is None
    assert check_flags(["-m", "model=gru,mf"]) is None


def _table2_without_data(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """`seqexp experiment=table2` where no raw file is and nothing can be downloaded (a closed
    port on this machine)."""
    return subprocess.run(
        [sys.executable, "-m", "seqexp.apps.cli", "experiment=table2",
         f"paths.data_dir={tmp_path / 'data'}", "dataset.url=http://127.0.0.1:9/missing.zip",
         *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_multirun_names_every_missing_dataset_before_any_job_starts(tmp_path):
    result = _table2_without_data(tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    raw = tmp_path / "data" / "raw"
    assert [line.split(":", 2)[:2] for line in lines] == [
        ["seqexp", " error"], ["seqexp", " error"]]
    assert lines[0].startswith("seqexp: error: dataset ml10m: could not download "
                               "http://127.0.0.1:9/missing.zip")
    assert lines[0].endswith(f"put ratings.dat at {raw / 'ml10m' / 'ratings.dat'}, or pass "
                             f"dataset.path=/path/to/ratings.dat")
    assert lines[1].startswith("seqexp: error: dataset lastfm: could not download")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()


def test_a_multirun_whose_data_are_here_is_not_held_up_by_them(tmp_path):
    """Only the dataset without its file is named."""
    ratings = tmp_path / "data" / "raw" / "ml10m" / "ratings.dat"
    ratings.parent.mkdir(parents=True)
    ratings.write_text("1::10::5::978300760\n")
    result = _table2_without_data(tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("seqexp: error: dataset lastfm: could not download")


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_data_path_that_is_not_a_file_says_what_it_is(tmp_path, kind):
    path = {"folder": tmp_path, "device": "/dev/zero"}.get(kind, tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(path)
    cfg = compose_config(["dataset=csv", f"dataset.path={path}", f"paths.data_dir={tmp_path}"])
    with pytest.raises(SeqexpError) as refused:
        run_experiment(cfg, launch_dir=tmp_path, output_dir=tmp_path / "run")
    expected = ("is a folder; pass the data file in it" if kind == "folder" else
                "is not a regular file (a pipe or a device); pass a data file")
    assert str(refused.value) == f"dataset.path={path} {expected}"
