"""seqexp/run/options.py: every key of conf/ has a rule, the shipped configs pass, and bad values
are refused before any work with one line naming the key."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import compose_config
from seqexp.core import schema
from seqexp.core.errors import SeqexpError
from seqexp.core.resources import config_dir, group_options
from seqexp.data.synthetic import generate_synthetic
from seqexp.run.experiment import validate
from seqexp.run.options import check_config, rule_of
from seqexp.run.registry import model_tables

# Every option of the groups that hold keys, in as few compositions as there are models: the
# i-th model with the i-th dataset and split (cycled). csv needs a path to compose.
_MODELS, _DATASETS, _SPLITS = (group_options(g) for g in ("model", "dataset", "split"))
COMPOSITIONS = [(f"model={m}", f"dataset={_DATASETS[i % len(_DATASETS)]}",
                 f"split={_SPLITS[i % len(_SPLITS)]}")
                for i, m in enumerate(_MODELS)] + [()]  # () = the defaults
assert len(_MODELS) >= len(_DATASETS)


def leaf_keys(tree, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.fixture(scope="module")
def configs():
    """{overrides: composed DictConfig}, each composed once (Hydra takes ~0.3 s a time)."""
    return {overrides: compose_config(list(overrides) + (
        ["dataset.path=x.csv"] if "dataset=csv" in overrides else []))
        for overrides in COMPOSITIONS}


@pytest.fixture(scope="module")
def composed(configs):
    return [(overrides, OmegaConf.to_container(cfg, resolve=True))
            for overrides, cfg in configs.items()]


def test_every_key_of_every_config_file_has_a_rule(composed):
    missing = sorted({f"{key} ({' '.join(overrides)})" for overrides, cfg in composed
                      for key in leaf_keys(cfg) if rule_of(cfg, key) is None})
    assert missing == [], "keys without an entry in seqexp/core/schema.py"


def test_every_entry_of_the_schema_is_a_key_of_a_composed_config(composed):
    """The other direction: no entry is left over from a key that conf/ no longer has."""
    models = model_tables()
    # a model's table is its class's: the models of one class share it (the RNN cells' keys)
    tables = {group: dict(g.tables) for group, g in schema.GROUPS.items()}
    tables["model"] = {models.targets[name]: table for name, table in models.tables.items()}
    seen: dict[tuple[str, str], set[str]] = {}  # (group, the table's kind) -> leaves composed
    for _, cfg in composed:
        for group, table in schema.group_tables(cfg, models).items():
            kind = (models.targets[cfg["model"]["name"]] if group == "model" else
                    next(k for k, t in tables[group].items() if t is table))
            seen.setdefault((group, kind), set()).update(cfg[group])
    unused = sorted(f"{group}.{leaf} ({kind or 'its table'})"
                    for group, g in tables.items() for kind, table in g.items()
                    for leaf in set(table) - seen.get((group, kind), set()))
    assert unused == [], "entries of seqexp/core/schema.py that no composed config has"
    assert set(schema.TOP) <= set(composed[0][1])


def test_every_option_of_every_group_is_composed():
    files = {(p.parent.name, p.stem) for p in Path(config_dir()).glob("*/*.yaml")
             if p.parent.name in ("model", "dataset", "split")}
    composed = {tuple(o.split("=")) for overrides in COMPOSITIONS for o in overrides}
    assert files == composed


def test_shipped_configs_pass(composed):
    for _, cfg in composed:
        check_config(cfg)


NAN, INF = float("nan"), float("inf")
# (a composition that has the key, key, value, the start of the message)
DEFAULT = ()


def having(model: str) -> tuple[str, ...]:
    return next(c for c in COMPOSITIONS if c[0] == f"model={model}")


def with_dataset(dataset: str) -> tuple[str, ...]:
    return next(c for c in COMPOSITIONS if c and c[1] == f"dataset={dataset}")


BAD = [
    (DEFAULT, "train.lr", NAN, "train.lr=nan must be a finite number > 0"),
    (DEFAULT, "train.lr", INF, "train.lr=inf must"),
    (DEFAULT, "train.lr", 0, "train.lr=0"),
    (DEFAULT, "train.num_threads", -2, "train.num_threads=-2 must be an integer >= 1 (or null)"),
    (DEFAULT, "train.epochs", 1.5, "train.epochs=1.5 must be an integer >= 0"),
    (DEFAULT, "eval.val_max_scores", 1e10, "eval.val_max_scores=10000000000.0 must be an "
                                           "integer >= 1 (or null); write 10000000000, without "
                                           "a decimal point or exponent"),
    (DEFAULT, "train.batch_size", True, "train.batch_size=True must"),
    (DEFAULT, "train.grad_clip", -INF, "train.grad_clip=-inf"),
    (DEFAULT, "train.optimizer", "lion", "train.optimizer='lion' must be one of adam, sgd"),
    (having("itemknn"), "model.neighbours", 0, "model.neighbours=0 must be an integer >= 1"),
    (having("itemknn"), "model.neighbours", -1, "model.neighbours=-1"),
    (having("expdecay_knn"), "model.decay", NAN, "model.decay=nan"),
    (having("rectified_ugru"), "model.omega", 1.5, "model.omega=1.5 must be a number in [0, 1]"),
    (having("gru"), "model.dropout", NAN, "model.dropout=nan"),
    (having("gru"), "model.hidden_size", 0, "model.hidden_size=0"),
    (having("dream"), "model.max_baskets", 1, "model.max_baskets=1"),
    (having("dream"), "model.l2", -1.0, "model.l2=-1.0"),
    (DEFAULT, "eval.basket_gap_s", -5.0, "eval.basket_gap_s=-5.0 must be a finite number >= 0"),
    (DEFAULT, "device", "gpu", "device='gpu' must be auto, cpu, cuda or cuda:N"),
    (DEFAULT, "split.val_frac", 1.0, "split.val_frac=1.0 must be a number in [0, 1)"),
    (DEFAULT, "dataset.n_users", 0, "dataset.n_users=0 must be an integer >= 1"),
    (having("mf"), "model.l2", -0.1, "model.l2=-0.1"),
    (having("seqmf"), "model.window", 0, "model.window=0 must be an integer >= 1"),
    (DEFAULT, "eval.cutoffs", [0, 20], "eval.cutoffs=[0, 20]"),
    (DEFAULT, "eval.monitor_cutoff", 7, "eval.monitor_cutoff=7 must be one of eval.cutoffs"),
    (DEFAULT, "eval.basket_gap_s", NAN, "eval.basket_gap_s=nan"),
    (DEFAULT, "train.monitor", "auc", "train.monitor='auc' must be mrr_at_<k>, recall_at_<k> or "
                                      "ndcg_at_<k> (k: one of eval.cutoffs)"),
    (DEFAULT, "train.monitor", "recall_at_15", "train.monitor='recall_at_15' must be one of "
                                               "mrr_at_5, recall_at_5, ndcg_at_5, mrr_at_10, "),
    (DEFAULT, "split.test_frac", 1.0, "split.test_frac=1.0 must be a number in (0, 1)"),
    (DEFAULT, "dataset.p_successor", 0.7,
     "dataset.p_successor=0.7 + dataset.p_favourite=0.5 must not exceed 1"),
    (DEFAULT, "dataset.n_clusters", 500, "dataset.n_clusters=500 must not exceed dataset.n_"),
    (DEFAULT, "dataset.min_events", 500, "dataset.min_events=500 must not exceed"),
    (COMPOSITIONS[0], "split.val_quantile", 0, "split.val_quantile=0"),
    (COMPOSITIONS[1], "dataset.min_item_support", -1, "dataset.min_item_support=-1"),
    (COMPOSITIONS[1], "dataset.min_item_support", 1.5, "dataset.min_item_support=1.5 must be"),
    (COMPOSITIONS[1], "dataset.min_item_support", True, "dataset.min_item_support=True must"),
    (COMPOSITIONS[1], "dataset.archive_md5", "xyz", "dataset.archive_md5='xyz' must be 32 hex"),
    (DEFAULT, "seed", -1, "seed=-1 must be an integer in [0, 4294967295]"),
    (DEFAULT, "mlflow.log_checkpoint", 2, "mlflow.log_checkpoint=2 must be true or false"),
    (DEFAULT, "dataset.format", [], "dataset.format=[] is unknown; choose one of movielens"),
    (having("gru"), "model._target_", "x.Y", "model._target_='x.Y' is not the class of model=gru"),
    (having("gru"), "model.name", "gruu", "model.name='gruu' is not a registered model"),
    # checked by the constructors, readers and evaluator before the schema took them over
    (having("dream"), "model.pooling", "sum", "model.pooling='sum' must be one of max, mean"),
    (having("dream"), "model.cell", "lstm", "model.cell='lstm' must be one of rnn, gru"),
    (having("rectified_ugru"), "model.threshold", "step", "model.threshold='step' must be one "
                                                           "of soft, hard"),
    (having("rectified_ugru"), "model.temperature", 0.0, "model.temperature=0.0 must be"),
    (having("expdecay_knn"), "model.decay_unit", "days", "model.decay_unit='days' must be one "
                                                          "of position, time"),
    (having("expdecay_knn"), "model.window", 0, "model.window=0 must be an integer >= 1"),
    (having("mf"), "model.factors", 0, "model.factors=0 must be an integer >= 1"),
    (having("gru"), "model.loss", "bpr", "model.loss='bpr' must be one of full_softmax"),
    (having("gru"), "model.eval_chunk", 0, "model.eval_chunk=0 must be an integer >= 1"),
    (DEFAULT, "eval.basket_k", 0, "eval.basket_k=0 must be an integer >= 1"),
    (DEFAULT, "eval.batch_users", 0, "eval.batch_users=0 must be an integer >= 1 (or null)"),
    (DEFAULT, "eval.exclude_seen", "yes", "eval.exclude_seen='yes' must be true or false"),
    (with_dataset("ml100k"), "dataset.layout", "tsv", "dataset.layout='tsv' must be one of "
                                                       "ratings_dat, u_data"),
    (with_dataset("lastfm"), "dataset.item", "album", "dataset.item='album' must be one of "
                                                       "track, artist"),
    (having("gru"), "split.name", "random", "split.name='random' is unknown; choose one of"),
]


@pytest.mark.parametrize("where,key,value,message", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_bad_values_are_refused_naming_the_key(configs, where, key, value, message):
    cfg = configs[where].copy()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(SeqexpError) as caught:
        validate(cfg)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.epochs", 3.0, "train.epochs=3.0 must be an integer >= 0; write 3, without a "
                          "decimal point or exponent"),
    ("train.epochs", 1.5, "train.epochs=1.5 must be an integer >= 0"),  # not a whole number
    ("train.lr", -1.0, "train.lr=-1.0 must be a finite number > 0"),  # a number is due
])
def test_a_whole_number_written_as_a_float_is_told_how_to_write_it(configs, key, value,
                                                                    message):
    cfg = configs[DEFAULT].copy()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(SeqexpError) as caught:
        validate(cfg)
    assert str(caught.value) == message


def test_an_interpolation_that_cannot_resolve_is_one_line(configs, monkeypatch):
    monkeypatch.delenv("SEQEXP_UNSET_VARIABLE", raising=False)
    cfg = configs[DEFAULT].copy()
    OmegaConf.update(cfg, "paths.data_dir", "${oc.env:SEQEXP_UNSET_VARIABLE}")
    with pytest.raises(SeqexpError, match=r"^paths.data_dir: cannot resolve \(.*"
                                          r"SEQEXP_UNSET_VARIABLE' not found\"\)$"):
        validate(cfg)


def test_the_generators_settings_are_the_synthetic_datasets_keys_and_it_has_no_defaults():
    """conf/dataset/synthetic.yaml holds every generator setting (the loader passes them by
    name) and the schema checks each; the generator repeats no default of them."""
    parameters = inspect.signature(generate_synthetic).parameters
    dataset = OmegaConf.load(config_dir() / "dataset" / "synthetic.yaml")
    assert set(parameters) <= set(dataset) and set(parameters) <= set(schema.DATASET["synthetic"])
    assert all(p.default is inspect.Parameter.empty for p in parameters.values())
