"""The predictor interface: told every transfer, asked for the next ones."""

from __future__ import annotations

from typing import NamedTuple

# ``_new_tuple(Prediction, key)`` makes a NamedTuple from a tuple of its fields in C: a
# NamedTuple's own ``__new__`` and ``_make`` are Python frames, on the planning path
from pipellm._ext.tuples import new_tuple as _new_tuple


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


class Predictor:
    """Base class of predictors. Subclasses override ``observe`` and ``predict``.

    Following scikit-learn's conventions, ``__init__`` only stores its keyword options;
    learned state is built by ``observe`` (online) and cleared by ``reset``.
    """

    name = "?"
    #: whether device-to-host transfers change what this predictor predicts (swap-outs
    #: announce swap-ins); the pipeline skips telling (and re-planning) when False
    uses_d2h = True

    def observe(self, event: TransferEvent) -> None:
        """Told every transfer, in program order."""

    def predict(self, k: int) -> list[Prediction]:
        """The next (up to) ``k`` host-to-device transfers expected, soonest first."""
        return []

    def reset(self) -> None:
        """Forget everything learned."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
