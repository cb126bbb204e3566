"""Data: raw formats, download, preprocessing, splits, cache and batching. Knows nothing of
models, training or tracking.

Import the module you need (seqexp.data.loading.load_dataset, seqexp.data.sequences
.SequenceData, ...): this package file imports nothing, so that a model, which needs only
sequences and batches, does not load pandas, pyarrow and the downloader."""
