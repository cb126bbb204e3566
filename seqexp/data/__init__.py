"""Data: raw formats, download, preprocessing, splits, cache and batching. Knows nothing of
models, training or tracking."""

from seqexp.data.loading import load_dataset
from seqexp.data.sequences import SequenceData

__all__ = ["SequenceData", "load_dataset"]
