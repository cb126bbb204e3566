"""Checks of the command line before Hydra runs anything: every key an override names must exist
in the composed config of every job of a sweep, and a sweeper that ranks jobs must get a score.
Hydra's own messages for these are several lines long, suggest `+key` (which turns a typo into
a silent no-op) and come only once a sweep's first job has started."""

from __future__ import annotations

import difflib
import errno
import importlib
import inspect
import itertools
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqexp.core.errors import SeqexpError, message_line, unwritable
from seqexp.core.resources import config_dir
from seqexp.data.raw_files import resolve_raw_file
from seqexp.run.registry import check_model_together, key_of, keys_of

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Command-line flags of Hydra's that take a value (the value is no override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_NO_CHECK_FLAGS = {"--help", "-h", "--hydra-help", "--shell-completion", "-sc", "--info", "-i",
                   "--experimental-rerun", "--version"}
MAX_COMBINATIONS = 64  # group combinations composed to check a sweep's keys


def split_command_line(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun, checkable) from seqexp's arguments; checkable is False for
    Hydra's informational flags (--help, --info, ...)."""
    overrides: list[str] = []
    multirun, checkable, skip = False, True, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _NO_CHECK_FLAGS or arg.split("=", 1)[0] in _NO_CHECK_FLAGS:
            checkable = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides, multirun, checkable


def _is_group(key: str) -> bool:
    return "/" in key or (config_dir() / key).is_dir()


def _leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config, containers and leaves."""
    if not isinstance(cfg, DictConfig):
        return []
    keys: list[str] = []
    for key in cfg:
        name = f"{prefix}{key}"
        keys.append(name)
        keys.extend(_leaf_keys(cfg._get_node(key), f"{name}."))
    return keys


def _has_key(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    # `leaf in node` is False for a key whose value is ??? (MISSING): ask for the key itself.
    return isinstance(node, DictConfig) and leaf in node.keys()  # noqa: SIM118


def known_keys(cfg: DictConfig) -> list[str]:
    """The keys of this config that the schema has (seqexp/core/schema.py: this model's,
    dataset's and split's tables), with their groups; the composed config's own keys where a
    group has no table in the schema (a `model._target_` of another package)."""
    try:
        keys = list(keys_of(cfg))
    except (SeqexpError, OmegaConfBaseException):  # no table, or a selector that won't resolve
        return [k for k in _leaf_keys(cfg) if not k.startswith("hydra")]
    return sorted({k.split(".", 1)[0] for k in keys if "." in k} | set(keys))


def unknown_key_message(cfg: DictConfig, key: str) -> str:
    """`train.epoch is not a config key; did you mean train.epochs? (train keys: ...)`."""
    keys = known_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    group = key.split(".", 1)[0]
    siblings = sorted(k.split(".", 1)[1] for k in keys
                      if k.startswith(f"{group}.") and k.count(".") == 1)
    hint = f"; did you mean {close[0]}?" if close else ""
    listing = f" ({group} keys: {', '.join(siblings)})" if siblings else ""
    return f"{key} is not a config key{hint}{listing}"


def _constructor_reads(cfg: DictConfig, key: str) -> bool:
    """An added `model.<name>` is passed to the model's constructor (conf/model/*.yaml is a
    `_partial_` target): it is read when the constructor takes a parameter of that name."""
    if not key.startswith("model.") or key.count(".") != 1:
        return False
    target = OmegaConf.select(cfg, "model._target_")
    if not target:
        return False
    module, _, name = str(target).rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(factory).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    leaf = key.split(".", 1)[1]
    return leaf in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _group_combinations(group_values: dict[str, list[str]]) -> Iterable[list[str]]:
    names = list(group_values)
    for values in itertools.islice(itertools.product(*group_values.values()), MAX_COMBINATIONS):
        yield [f"{name}={value}" for name, value in zip(names, values, strict=True)]


def _choices_of(value: Any) -> list[str]:
    return [str(v).strip() for v in str(value).split(",")]


def check_command_line(argv: Sequence[str], check_data: bool = True) -> str | None:
    """One-line message for the first problem with the command line's overrides, else None;
    for a multirun that would run (not --cfg), with `check_data` also one line per dataset
    whose raw file can be neither found nor downloaded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, multirun, checkable = split_command_line(argv)
    if not checkable:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        return f"cannot read the override: {message_line(exc)}"

    fixed_groups, swept_groups, key_overrides = _sorted_overrides(parsed)
    try:
        base = _compose(fixed_groups)
    except Exception as exc:  # Hydra's composition errors, reported in one line
        return f"cannot compose the config: {message_line(exc)}"
    # Presets sweep groups too (experiment=table2: hydra.sweeper.params.model = a,b,...).
    preset_params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    for group, value in preset_params.items():
        if _is_group(group) and group not in swept_groups and not any(
                g.split("=", 1)[0].lstrip("+~") == group for g in fixed_groups):
            swept_groups[group] = _choices_of(value)
    swept = multirun or str(OmegaConf.select(base, "hydra.mode")).endswith("MULTIRUN")

    configs = [(combo, _compose(fixed_groups + combo) if combo else base)
               for combo in _group_combinations(swept_groups)]
    for override in key_overrides:
        problem = _check_key_override(override, configs)
        if problem:
            return problem
    refused = (check_override_values(key_overrides, configs)
               or check_model_keys_together(key_overrides, configs))
    if refused:
        return refused
    folder_problem = check_outputs_folder(base, parsed, swept)
    if folder_problem:
        return folder_problem
    if swept:
        fixed_keys = [o.input_line for o in key_overrides if not o.is_sweep_override()]
        shows_config = any(a.split("=", 1)[0] in ("--cfg", "-c") for a in argv)  # runs nothing
        return ((None if shows_config or not check_data else check_sweep_data(
                    [combo + fixed_keys for combo, _ in configs], fixed_groups))
                or _check_sweeper_score(configs, parsed))
    return None


def _sorted_overrides(parsed: list) -> tuple[list[str], dict[str, list[str]], list]:
    """(fixed group choices, {swept group: its choices}, key overrides) of the parsed
    overrides; deletions and hydra.* are left to Hydra."""
    fixed_groups: list[str] = []
    swept_groups: dict[str, list[str]] = {}
    key_overrides = []
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra.") or key == "hydra":
            continue
        if _is_group(key):
            if override.is_sweep_override():
                swept_groups[key] = list(override.sweep_string_iterator())
            else:
                fixed_groups.append(override.input_line)
        else:
            key_overrides.append(override)
    return fixed_groups, swept_groups, key_overrides


def _check_key_override(override: Any, configs: list[tuple[list[str], DictConfig]]
                        ) -> str | None:
    """One line when a key override names a key that some composed config (of each swept
    group combination) lacks, or adds with '+' a key that exists."""
    key = override.key_or_group
    adds = override.is_add() or override.is_force_add()
    lacking = [i for i, (_, cfg) in enumerate(configs) if not _has_key(cfg, key)
               and not (adds and _constructor_reads(cfg, key))]
    if not lacking:
        if override.is_add() and any(_has_key(cfg, key) for _, cfg in configs):
            return (f"{override.input_line}: {key} exists already; set it without the "
                    f"'+': {override.input_line[1:]}")
        return None
    combo, cfg = configs[lacking[0]]
    if len(lacking) < len(configs):
        having = next(c for i, (c, _) in enumerate(configs) if i not in lacking)
        return (f"{key}: {' '.join(combo)} has no such key (it is a key of "
                f"{' '.join(having)}); sweep a per-model key in a sweep of its own model "
                f"family, e.g. seqexp -m {' '.join(having)} {override.input_line}")
    message = unknown_key_message(cfg, key)
    return f"{override.input_line}: nothing would read it; {message}" if adds else message


def check_sweep_data(combinations: list[list[str]], fixed_groups: list[str]) -> str | None:
    """One line per dataset of a multirun whose raw file is neither here nor downloadable
    (where to get it, where to put it, or dataset.path=), before any job starts: otherwise each
    job would fail on its own, each leaving a FAILED run. What can be downloaded is, once."""
    sources: dict[tuple, tuple[dict, Path]] = {}
    for combo in combinations:
        cfg = _compose(fixed_groups + combo)
        dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
        if dataset.get("format") == "synthetic":
            continue
        key = (dataset.get("name"), dataset.get("path"), dataset.get("url"))
        sources.setdefault(key, (dataset, Path(str(cfg.paths.raw_dir))))
    missing = []
    for dataset, raw_dir in sources.values():
        try:
            resolve_raw_file(dataset, raw_dir, progress=True)
        except SeqexpError as exc:
            missing.append(f"dataset {dataset.get('name')}: {exc}")
    return "\n".join(missing) or None


def check_override_values(key_overrides: list, configs: list) -> str | None:
    """The schema's one line for an overridden value its key refuses (train.lr=abc), checked
    on the composed configs, before the run loads torch and MLflow. Keys whose options are the
    implementations' lists (optimizers, cells, ...) are left to the run's full check."""
    for override in key_overrides:
        key = override.key_or_group
        if override.is_sweep_override() or override.is_delete():
            continue
        for _, cfg in configs:
            try:
                entry = key_of(cfg, key) if _has_key(cfg, key) else None
            except SeqexpError:  # a model the schema does not know yet: the run's check says
                continue
            value = override.value()
            if entry is None or entry.rule.listed is not None or (
                    isinstance(value, str) and "${" in value):
                continue
            try:
                entry.rule.complain(key, value, {})
            except SeqexpError as exc:
                return str(exc)
            except Exception:  # an interpolation: the run's check resolves it
                continue
    return None


def check_model_keys_together(key_overrides: list, configs: list) -> str | None:
    """The model class's checks of several of its keys together (model.n_heads must divide
    model.hidden_size) on the composed configs, where the command line sets a model.* key (the
    class is imported then for that key's rule as well; the model files' own values pass)."""
    changes = {o.key_or_group.split(".", 1)[1]: o.value() for o in key_overrides
               if o.key_or_group.startswith("model.") and not o.is_sweep_override()
               and not o.is_delete()}
    if not changes or any(isinstance(v, str) and "${" in v for v in changes.values()):
        return None  # an interpolation: the run's check resolves it
    for _, cfg in configs:
        try:
            check_model_together(OmegaConf.to_container(cfg.model, resolve=True) | changes)
        except SeqexpError as exc:
            return str(exc)
        except OmegaConfBaseException:  # an interpolation: the run's check resolves it
            continue
    return None


def check_outputs_folder(base: DictConfig, parsed: list, swept: bool) -> str | None:
    """One line when the folder that Hydra makes for the run's (sweep's) outputs cannot be
    made: a read-only launch folder, a file where a folder belongs. Hydra's own is a traceback.
    Checked on the part of hydra.run.dir (hydra.sweep.dir) before its first interpolation, by
    making and removing a folder in the nearest existing one: the real test, also for root."""
    key = "hydra.sweep.dir" if swept else "hydra.run.dir"
    pattern = next((str(o.value()) for o in reversed(parsed) if o.key_or_group == key), None)
    if pattern is None:
        pattern = str(OmegaConf.to_container(base.hydra, resolve=False)[key.split(".")[1]]["dir"])
    static = pattern.split("${", 1)[0]
    folder = Path(static if static.endswith("/") or "${" not in pattern else Path(static).parent)
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    also = None if key in {o.key_or_group for o in parsed} else "start seqexp in a writable folder"
    if not existing.is_dir():
        refused = OSError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        return message_line(unwritable(folder, refused, "the run's outputs", key, also))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".seqexp-check-", dir=existing))
    except OSError as exc:
        return message_line(unwritable(folder, exc, "the run's outputs", key, also))
    return None


def sweeper_ranks_jobs(hydra_cfg: Any) -> bool:
    """Whether the sweep's sweeper chooses by the jobs' returned scores (Optuna) rather than
    running a fixed grid."""
    return str(OmegaConf.select(hydra_cfg, "sweeper._target_")) != BASIC_SWEEPER


def _check_sweeper_score(configs: list[tuple[list[str], DictConfig]], parsed: list) -> str | None:
    """A sweeper other than the grid (Optuna) ranks jobs by their validation score: a split
    configured without validation events gives it none."""
    for _, cfg in configs:
        if not sweeper_ranks_jobs(cfg.hydra):
            continue
        sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_"))
        val_fracs = [str(OmegaConf.select(cfg, "split.val_frac"))]
        for override in parsed:
            if override.key_or_group == "split.val_frac":
                val_fracs = (list(override.sweep_string_iterator()) if override.is_discrete_sweep()
                             else [str(override.value())])
        if OmegaConf.select(cfg, "split.name") == "user_tail" and any(
                _is_zero(v) for v in val_fracs):
            return ("split.val_frac=0 leaves no validation events, but this sweep's "
                    f"{sweeper.rsplit('.', 1)[-1]} ranks jobs by their validation score "
                    "(train.monitor); set split.val_frac > 0")
    return None


def _is_zero(value: str) -> bool:
    try:
        return float(value) == 0.0
    except ValueError:
        return False
