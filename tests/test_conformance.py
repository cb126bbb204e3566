"""The conformance suite: every check of tests/conformance.py over every registered model
(seqexp's and an installed plugin's: a model gets the suite by being registered)."""

from __future__ import annotations

from pathlib import Path

import pytest

import conformance
from seqexp.run.registry import registry

MODELS = sorted(registry().models)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """conformance.trained, once per model for the module: (cfg, data, model, its folder)."""
    data_dir = tmp_path_factory.mktemp("conformance-data")
    done = {}

    def get(model_name: str):
        if model_name not in done:
            folder = tmp_path_factory.mktemp(f"run-{model_name}")
            done[model_name] = (*conformance.trained(model_name, data_dir, folder), folder)
        return done[model_name]

    return get


@pytest.mark.parametrize("model_name", MODELS)
def test_scores_do_not_depend_on_item_chunks(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_chunk_invariance(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_score_factors_where_given_make_the_models_scores(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_score_factors(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_points_whose_keys_are_equal_get_equal_scores(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_score_row_keys(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_query_columns_a_key_shares_are_equal_for_its_points(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_score_key_columns(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_a_prediction_depends_on_no_later_event(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_no_future_leak(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_the_prediction_state_has_one_row_per_point(model_name, trained_once):
    _, data, model, _ = trained_once(model_name)
    conformance.check_prediction_state(model, data)


@pytest.mark.parametrize("model_name", MODELS)
def test_a_loaded_checkpoint_recommends_what_the_trained_model_does(model_name, trained_once):
    cfg, data, model, folder = trained_once(model_name)
    conformance.check_save_load(model, data, cfg, Path(folder))


@pytest.mark.parametrize("model_name", MODELS)
def test_a_training_stopped_mid_epoch_resumes_bit_identically(model_name, tmp_path,
                                                             tmp_path_factory):
    conformance.check_resume_mid_epoch(model_name, tmp_path_factory.getbasetemp() / "data",
                                       tmp_path)
