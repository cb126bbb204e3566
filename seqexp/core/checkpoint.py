"""The checkpoint file format: what seqexp writes with torch.save and how it reads it back
(tensors and plain values only, never pickled code). The trainer writes best.pt and last.pt,
seqexp.load reads them."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqexp.core.atomic import atomic_path, write_failure
from seqexp.core.errors import SeqexpError, message_line

# The best checkpoint with the resolved config, the raw ids and the training histories beside
# the weights (seqexp.run.artifacts.checkpoint_contents): what seqexp.load needs.
CHECKPOINT_FORMAT = "seqexp-checkpoint-1"


def save_checkpoint(model: nn.Module, path: Path,
                    contents: Mapping[str, Any] | None = None) -> None:
    """The model's weights under "model", with `contents` (the resolved config, the raw ids and
    the training histories: seqexp.run.artifacts) beside them."""
    save_tensors({**(contents or {}), "model": model.state_dict()}, path)


def save_tensors(payload: Mapping[str, Any], path: Path) -> None:
    """torch.save(payload) to `path`, atomically. A write the file system refuses (a full disk,
    the file size limit) is the OSError behind it, naming `path`: torch words it as a
    RuntimeError of its own."""
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:
            refused = write_failure(tmp, path)
            if refused is None:
                raise
            raise refused from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint or training state written by seqexp. Only tensors and plain Python values
    are read (torch.load(weights_only=True)): a file holding any other pickled object is
    refused, so loading never runs code from the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = message_line(exc, limit=300)
        raise SeqexpError(f"{path}: refused, it holds Python objects other than tensors and plain "
                          f"values ({reason}); seqexp never unpickles them") from None
    except Exception as exc:  # a damaged file: the unpickler's IndexError, ...
        reason = message_line(exc, limit=300)
        if reason != type(exc).__name__ and not isinstance(exc, (OSError, RuntimeError)):
            reason = f"{type(exc).__name__}: {reason}"  # "pop from empty list" says little
        raise SeqexpError(f"{path}: cannot read it as a checkpoint ({reason}); it is damaged or "
                          f"not a seqexp checkpoint") from None
    if not isinstance(payload, dict):
        raise SeqexpError(f"{path}: not a seqexp checkpoint")
    return payload
