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
from .experts import ExpertsPredictor
from .learned import LearnedPredictor
from .oracle import OraclePredictor
from .rules import KVSwapPredictor, LayerwisePredictor, LRUPredictor
from .simple import NonePredictor, SequencePredictor

GROUP = "pipellm.predictors"
BUILTIN = {"none": NonePredictor, "sequence": SequencePredictor, "layerwise": LayerwisePredictor,
           "kvswap": KVSwapPredictor, "lru": LRUPredictor, "oracle": OraclePredictor, "learned": LearnedPredictor,
           "experts": ExpertsPredictor}


def _plugins() -> list:
    """The group's entry points other than pipellm's own built-ins."""
    return [ep for ep in entry_points(group=GROUP)
            if not (ep.name in BUILTIN and (ep.dist is None or ep.dist.name == "pipellm"))]


def _owner(ep) -> str:
    return ep.dist.name if ep.dist else ep.value


def _shadowing(name: str) -> None:
    """A plugin that takes a built-in's name is refused: which one a name meant would
    depend on what happens to be installed."""
    for ep in _plugins():
        if ep.name == name and name in BUILTIN:
            owner = _owner(ep)
            raise ArgumentError(f"predictor plugin {name!r} from {owner} ({ep.value}) takes the name of pipellm's "
                                f"built-in predictor; a plugin may not shadow a built-in: rename it in {owner}'s "
                                f"entry points (group {GROUP!r})")


def available() -> dict[str, str]:
    """Predictor names and where each comes from (a plugin that shadows a built-in is
    listed as refused)."""
    names = {name: "pipellm (built-in)" for name in BUILTIN}
    for ep in _plugins():
        if ep.name in BUILTIN:
            names[ep.name] = f"pipellm (built-in); refused: a plugin from {_owner(ep)} takes this name"
        else:
            names.setdefault(ep.name, _owner(ep))
    return names


def clone(predictor: Predictor) -> Predictor:
    """A new, unfitted predictor with the same parameters (scikit-learn's ``clone``)."""
    if not isinstance(predictor, Predictor):
        raise ArgumentTypeError(f"clone() takes a Predictor, got {type(predictor).__name__}")
    return type(predictor)(**predictor.get_params())


def _load(name: str):
    _shadowing(name)
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in _plugins():
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


__all__ = ["ExpertsPredictor", "GROUP", "KVSwapPredictor", "LRUPredictor", "LayerwisePredictor", "LearnedPredictor", "NonePredictor",
           "OraclePredictor",
           "Prediction", "Predictor", "SequencePredictor", "TransferEvent",
           "available", "clone", "get"]
