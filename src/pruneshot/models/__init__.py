"""Backbones built from JSON architecture specs: the registry and ``Backbone`` base (``base``),
layers (``layers``), the backbones (``small_cnn``, ``cifar``), physical pruning (``surgery``),
basis decomposition (``basis``) and params/FLOPs counting (``cost``)."""

from pruneshot.models import cifar, small_cnn  # noqa: F401  (importing them registers the backbones)
