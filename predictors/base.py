"""The predictor interface: told every transfer, asked for the next ones."""

from __future__ import annotations

import abc
import inspect
import reprlib
from typing import NamedTuple

from pipellm.errors import ArgumentError

# ``_new_tuple(Prediction, key)`` makes a NamedTuple from a tuple of its fields without a
# Python frame (a NamedTuple's own ``__new__`` and ``_make`` are Python functions, on the
# planning path)
_new_tuple = tuple.__new__


class TransferEvent(NamedTuple):
    """One transfer as it happens. ``region`` is the region's name."""

    region: str
    offset: int
    nbytes: int
    direction: str = "h2d"   # "h2d" or "d2h"
    stream: int = 0
    time: float = 0.0        # seconds, on any monotonic clock

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.region, self.offset, self.nbytes)


class Prediction(NamedTuple):
    """An expected host-to-device transfer: ``nbytes`` of ``region`` at ``offset``."""

    region: str
    offset: int
    nbytes: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.region, self.offset, self.nbytes)


class Predictor(abc.ABC):
    """Base class of predictors. Subclasses implement ``predict`` and usually ``observe``
    and ``reset``.

    scikit-learn's conventions: ``__init__`` takes keyword parameters and stores each under
    its own name (checking it), and builds no more state than ``reset`` would; learned
    state comes from ``observe`` (online) or ``fit`` (offline) and goes with ``reset``.
    ``get_params``/``set_params`` and :func:`pipellm.predictors.clone` work from the
    ``__init__`` signature; ``prepare`` is called when a pipeline takes the predictor, to
    load what it needs and refuse what it cannot use (an :class:`~pipellm.ArgumentError`).

    >>> from pipellm.predictors import LayerwisePredictor, clone
    >>> p = LayerwisePredictor(order=3)
    >>> p.get_params()
    {'order': 3}
    >>> clone(p.set_params(order=2)).order
    2
    """

    name = "?"
    #: whether device-to-host transfers change what this predictor predicts (swap-outs
    #: announce swap-ins); the pipeline skips telling (and re-planning) when False
    uses_d2h = True

    def observe(self, event: TransferEvent) -> None:
        """Told every transfer, in program order."""

    @abc.abstractmethod
    def predict(self, k: int) -> list[Prediction]:
        """The next (up to) ``k`` host-to-device transfers expected, soonest first."""

    def reset(self) -> None:
        """Forget everything learned (``observe``'s state; a fitted model stays)."""

    def fit(self, traces) -> Predictor:
        """Learn from traces (:class:`pipellm.traces.Trace`) ahead of time; ``self``.
        Predictors that learn only online (by ``observe``) have nothing to fit."""
        return self

    def prepare(self) -> None:
        """A pipeline takes this predictor: load what it needs; raise
        :class:`~pipellm.ArgumentError` if it cannot be used."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name, p in signature.parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self, deep: bool = True) -> dict:
        """The ``__init__`` parameters, as stored (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> Predictor:
        """Set parameters (checked as ``__init__`` checks them); forgets what was learned
        online. ``self``."""
        names = self._param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ArgumentError(f"{type(self).__name__} has no parameter {', '.join(map(repr, unknown))}; "
                                f"its parameters: {', '.join(names) or 'none'}")
        fitted = self._fitted_state()
        type(self).__init__(self, **{**self.get_params(), **params})
        self._restore_fitted(fitted)
        return self

    def _fitted_state(self) -> dict:
        """What ``fit`` learned (kept across ``set_params``): attributes ending in ``_``."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")} \
            if hasattr(self, "__dict__") else {}

    def _restore_fitted(self, fitted: dict) -> None:
        for key, value in fitted.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={reprlib.repr(v)}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"
