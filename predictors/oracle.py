"""``oracle``: knows the future (for evaluation: the upper bound any predictor can reach)."""

from __future__ import annotations

from .base import Prediction, Predictor, TransferEvent, _new_tuple


class OraclePredictor(Predictor):
    """Predicts exactly the host-to-device transfers that come next.

    ``future`` is the whole sequence of (region, offset, nbytes) host-to-device transfers
    in program order, e.g. from a trace (``pipellm replay`` passes it).

    >>> p = OraclePredictor(future=[("a", 0, 8), ("b", 0, 8), ("a", 0, 8)])
    >>> p.observe(TransferEvent("a", 0, 8))
    >>> [x.region for x in p.predict(5)]
    ['b', 'a']
    """

    name = "oracle"
    uses_d2h = False

    def __init__(self, future=()):
        self.future = [tuple(k) for k in future]
        self._next = 0

    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        key = event[:3]
        future, i = self.future, self._next
        if i < len(future) and future[i] == key:
            self._next = i + 1
            return
        for j in range(i, min(i + 64, len(future))):  # resynchronize after a detour
            if future[j] == key:
                self._next = j + 1
                return

    def predict(self, k: int) -> list[Prediction]:
        return [_new_tuple(Prediction, key) for key in self.future[self._next:self._next + k]]

    def reset(self) -> None:
        self._next = 0
