"""pruneshot: pruning methods benchmarked on few-shot transfer."""

__version__ = "0.1.0"
