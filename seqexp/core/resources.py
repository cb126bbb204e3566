"""Where seqexp finds its config tree, from a source checkout and from an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # seqexp/, above core/


def config_dir() -> Path:
    """seqexp/conf inside an installed wheel; the repository's conf/ in a checkout or an
    editable install (the wheel build copies conf/ into the package, see pyproject.toml)."""
    packaged = _PACKAGE / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return _PACKAGE.parent / "conf"


def group_options(group: str) -> list[str]:
    """The choices of a config group, e.g. group_options("model") -> ["gru", "itemknn", ...]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
