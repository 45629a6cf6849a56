"""Predictors of the next transfers (installed as ``pipellm.predictors``).

Built-ins and third-party predictors are found by name through the entry-point group
``pipellm.predictors``; the built-ins are also known without installed metadata, so a
source checkout works.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from pipellm.errors import ArgumentError, ArgumentTypeError

from .base import Prediction, Predictor, TransferEvent
from .learned import LearnedPredictor
from .oracle import OraclePredictor
from .rules import KVSwapPredictor, LayerwisePredictor, LRUPredictor
from .simple import NonePredictor, SequencePredictor

GROUP = "pipellm.predictors"
BUILTIN = {"none": NonePredictor, "sequence": SequencePredictor, "layerwise": LayerwisePredictor,
           "kvswap": KVSwapPredictor, "lru": LRUPredictor, "oracle": OraclePredictor, "learned": LearnedPredictor}


def available() -> dict[str, str]:
    """Predictor names and where each comes from."""
    names = {name: "pipellm (built-in)" for name in BUILTIN}
    for ep in entry_points(group=GROUP):
        names.setdefault(ep.name, ep.dist.name if ep.dist else ep.value)
    return names


def _load(name: str):
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as exc:  # a broken plugin is named, not fatal to the host
                warnings.warn(f"predictor plugin {name!r} ({ep.value}) failed to load: {exc!r}", stacklevel=3)
                return None
            if not (isinstance(cls, type) and issubclass(cls, Predictor)):
                warnings.warn(f"predictor plugin {name!r} ({ep.value}) is not a Predictor subclass", stacklevel=3)
                return None
            return cls
    return None


def get(predictor, **options) -> Predictor:
    """A predictor from a name (with options; ``"learned:PATH"`` loads a model file) or
    an instance (returned as is)."""
    if isinstance(predictor, Predictor):
        if options:
            raise ArgumentError("options can't be applied to a predictor instance")
        return predictor
    if not isinstance(predictor, str):
        raise ArgumentTypeError(f"predictor must be a name or a Predictor, got {type(predictor).__name__}")
    name, _, model = predictor.partition(":")  # "learned:model.json": a model file by path
    if model:
        options.setdefault("model", model)
        predictor = name
    cls = _load(predictor)
    if cls is None:
        raise ArgumentError(f"unknown predictor {predictor!r}; available: {', '.join(sorted(available()))}")
    return cls(**options)


__all__ = ["GROUP", "KVSwapPredictor", "LRUPredictor", "LayerwisePredictor", "LearnedPredictor", "NonePredictor",
           "OraclePredictor",
           "Prediction", "Predictor", "SequencePredictor", "TransferEvent",
           "available", "get"]
