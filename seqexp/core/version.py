"""The package version, in a module of its own so that any layer can read it without importing
the top-level package (whose seqexp.load reaches the applications)."""

__version__ = "0.2.0"
