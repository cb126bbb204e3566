"""Before a run allocates its model, what it will allocate is estimated (seqexp/engine/memory.py)
and logged; a run that cannot fit the device's memory ends in one line that names the key to
lower, exit code 2, its MLflow run FAILED with that line. A run that fits is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import compose_config, make_evaluator, recurrent, run_seqexp, tiny_overrides
from seqexp.engine.memory import human, model_bytes, run_estimate, tensor_bytes
from seqexp.run import experiment, presets
from seqexp.run.registry import registry


def _runs(db) -> list:
    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])


@pytest.mark.parametrize(("override", "key"), [
    ("model.hidden_size=100000000000", "model.hidden_size"),
    ("train.batch_size=1000000000", "train.batch_size"),
])
def test_a_run_that_cannot_fit_is_one_line_and_a_failed_run(override, key, tmp_path,
                                                             empty_store):
    db = tmp_path / "mlflow.db"
    db.write_bytes(empty_store.read_bytes())
    code, output = run_seqexp(["model=gru", *tiny_overrides(tmp_path / "data", db), override,
                               f"hydra.run.dir={tmp_path / 'run'}"])
    errors = [line for line in output.splitlines() if line.startswith("seqexp: error: ")]
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert "Traceback" not in output
    line = errors[0]
    assert line.startswith(f"seqexp: error: {override} makes this run need ")
    assert " but the machine has " in line and line.endswith(f" available; lower {key}")
    (run,) = _runs(db)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == line.removeprefix("seqexp: error: ")
    assert run.data.params[key] == override.split("=")[1]


def test_a_run_that_fits_logs_its_estimate_and_its_metrics_are_unchanged(tmp_path,
                                                                         empty_store,
                                                                         monkeypatch):
    """The same run with the estimate and with the model built directly, as before the
    check: the same metrics (the meta-device build draws no random number)."""
    metrics, outputs = [], []
    for checked in (True, False):
        db = tmp_path / f"{checked}.db"
        db.write_bytes(empty_store.read_bytes())
        if not checked:
            monkeypatch.setattr(experiment, "checked_model", lambda cfg, data, _, device: (
                experiment.build_model(cfg.model, data).to(device), None))
        code, output = run_seqexp(["model=gru", *tiny_overrides(tmp_path / "data", db),
                                   "model.hidden_size=16", "train.epochs=1",
                                   f"hydra.run.dir={tmp_path / str(checked)}"])
        assert code == 0, output[-3000:]
        (run,) = _runs(db)
        metrics.append({k: v for k, v in run.data.metrics.items()
                        if not k.endswith(("_seconds", "_per_s"))})  # the clock's
        outputs.append(output)
    assert metrics[0] == metrics[1]
    assert "epoch/test/mrr_at_20" in metrics[0] and "epoch/train_loss" in metrics[0]
    (line,) = [line for line in outputs[0].splitlines() if "memory estimate: ~" in line]
    for part in ("parameters", "gradients", "optimiser state", "activations", "logits",
                 "evaluation block", "; the machine has "):
        assert part in line
    assert "memory estimate" not in outputs[1]


def test_the_estimate_counts_parameters_gradients_and_adams_moments():
    """gru with hidden 4 on 10 items and 3 users, by hand: embedding 10x4, the GRU cell's
    input projection to its three gates 12x4 + 12 and its hidden products 8x4 and 4x4 (no
    bias), the output layer 4x10 + 10; two buffers of 10; Adam keeps two moments."""
    def build(**sizes):
        return recurrent(**sizes, cell="gru", hidden_size=4, window=2)

    sizes = {"n_items": 10, "n_users": 3}
    estimate = run_estimate(build, sizes, {"hidden_size": 4}, ("adam", 2, 30), make_evaluator(),
                            torch.device("cpu"))
    parts = {part.what: part.size for part in estimate.parts}
    parameters = 4 * (10 * 4 + (12 * 4 + 12) + (8 * 4 + 4 * 4) + (4 * 10 + 10))
    real = build(**sizes)
    assert parameters == 4 * sum(p.numel() for p in real.parameters())
    assert parts["parameters"] == parameters and parts["buffers"] == 4 * 20
    assert parts["gradients"] == parameters and parts["optimiser state"] == 2 * parameters
    # rows: min(batch 2, users 3) lanes x window 2; logits, their softmax and gradient
    assert parts["logits"] == 4 * 3 * (2 * 2) * 10
    # the evaluation's block: at most every one of the 30 events' points x 10 items, compared
    assert parts["evaluation block"] == 2 * 4 * 30 * 10
    training_step = parts["carried states"] + parts["activations"] + parts["logits"]
    assert training_step < parts["evaluation block"]  # they never hold their memory at once
    held = parameters * 4 + parts["buffers"]  # with gradients and two moments
    assert estimate.peak == held + parts["evaluation block"]


@pytest.mark.parametrize(("model_name", "per_row"), [
    ("mf", 4 + 2 * 4 + 4),  # p_u; q_pos, q_neg; the context vector (p_u itself)
    # p_u and the two context items' l_j; [q, q'] of the positive and the negative; [p_u, mean l]
    ("seqmf", 4 + 2 * 4 + 2 * 8 + 8),
])
def test_a_bpr_step_holds_the_rows_it_gathers_not_a_row_of_scores(model_name, per_row):
    """mf and seqmf with 4 factors, a batch of 16 over 445,369 items: each row's gathered
    factor rows and context vector, each with its gradient, by hand; nothing item-wide."""
    cfg = compose_config([f"model={model_name}", "model.factors=4"])
    factory, options = experiment.model_factory(cfg.model)
    estimate = run_estimate(factory, {"n_items": 445_369, "n_users": 40}, options,
                            ("adam", 16, 500), make_evaluator(), torch.device("cpu"))
    steps = {part.what: part for part in estimate.parts if part.phase == "train"}
    assert list(steps) == ["BPR rows"]
    assert steps["BPR rows"].size == 4 * 2 * 16 * per_row
    assert steps["BPR rows"].key == "train.batch_size"


def test_the_largest_model_key_is_found_on_the_meta_device_for_any_model():
    """The key named is the one whose lowering shrinks the model, found without per-model
    code: mf's factors, gru's hidden_size, whichever other keys the config holds."""
    from seqexp.engine.memory import size_key

    def mf(**kwargs):
        return presets.model("mf", **{"factors": 20, **kwargs})

    assert size_key(mf, {"n_items": 10**9, "n_users": 5}, {"factors": 20}) == "model.factors"

    def gru(**kwargs):
        return recurrent(**{"hidden_size": 10**11, "window": 20, **kwargs})

    options = {"hidden_size": 10**11, "window": 20, "n_negatives": 2048}
    assert size_key(gru, {"n_items": 50, "n_users": 40}, options) == "model.hidden_size"
    assert math.isinf(model_bytes(None)) and human(math.inf).startswith("over 9.2 EB")
    assert human(800e12) == "~800 TB" and human(1.5e9) == "~1.5 GB"


@pytest.mark.parametrize("model_name", sorted(registry().models))
def test_the_meta_estimate_of_every_registered_model_is_its_real_size(model_name):
    """No per-model code: the model built on the meta device has the real model's tensors, and
    each part of its training step names a key a user can set."""
    cfg = compose_config([f"model={model_name}"])
    factory, options = experiment.model_factory(cfg.model)
    sizes = {"n_items": 50, "n_users": 40}
    estimate = run_estimate(factory, sizes, options, ("adam", 16, 500), make_evaluator(),
                            torch.device("cpu"))
    parts = {part.what: part for part in estimate.parts}
    real = factory(**sizes)
    assert parts["parameters"].size == tensor_bytes(real.parameters())
    assert parts["buffers"].size == tensor_bytes(real.buffers())
    steps = [part for part in estimate.parts if part.phase == "train"]
    assert bool(steps) == real.trainable
    for part in [*steps, *(part for part in estimate.parts if part.phase == "fit")]:
        assert part.size >= 0
        assert part.key == "train.batch_size" or part.key.removeprefix("model.") in options
