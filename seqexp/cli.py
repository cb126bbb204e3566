"""The `seqexp` command: Hydra composes the config, run_experiment does the work.

Returns the best validation MRR so that sweepers (Optuna) can maximise it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from seqexp.errors import SeqexpError
from seqexp.resources import config_dir, group_options

log = logging.getLogger("seqexp")
CHECKED_GROUPS = ("model", "dataset", "split", "train", "eval", "mlflow", "paths")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _run(cfg: DictConfig) -> float:
    from seqexp.experiment import run_experiment  # after Hydra's argument parsing: fast --help

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = run_experiment(
            cfg, launch_dir=Path(hydra_cfg.runtime.cwd), output_dir=output_dir,
            overrides=list(hydra_cfg.overrides.task),
            hydra_dir=output_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None,
        )
    except (SeqexpError, MissingMandatoryValue) as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # let the sweeper record the failed job and go on
        if isinstance(exc, MissingMandatoryValue):
            exc = f"{exc.full_key} must be set: pass {exc.full_key}=..."
        print(f"seqexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("seqexp: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        sys.exit(130)
    return result.val_score


def check_group_choices(args: list[str]) -> str | None:
    """One-line message for an unknown config-group option (Hydra's own is several lines)."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key not in CHECKED_GROUPS or "(" in value or value in ("", "null"):
            continue
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options:
                return (f"{key}={choice} is not a known {key}; choose one of "
                        f"{', '.join(options)} ({config_dir() / key}/*.yaml)")
    return None


def main() -> None:
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"seqexp: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _run()


if __name__ == "__main__":
    main()
