"""Rule-based predictors that need no configuration: ``none`` and ``sequence``."""

from __future__ import annotations

from .base import Prediction, Predictor, TransferEvent, _new_tuple


class NonePredictor(Predictor):
    """Predicts nothing: the ``pipellm`` mode then encrypts every transfer on demand."""

    name = "none"
    uses_d2h = False


class SequencePredictor(Predictor):
    """Next-in-sequence: remembers which host-to-device transfer followed each one last
    time and predicts the chain of successors from the latest transfer.

    Learns any repeating order (layer-by-layer weight loads) after one pass; predicts
    nothing for a transfer it has not seen followed by another.

    >>> p = SequencePredictor()
    >>> for name in ["a", "b", "c", "a"]:
    ...     p.observe(TransferEvent(name, 0, 10))
    >>> [x.region for x in p.predict(3)]
    ['b', 'c', 'a']
    """

    name = "sequence"
    uses_d2h = False

    def __init__(self) -> None:
        self._next: dict[tuple, tuple] = {}
        self._last: tuple | None = None

    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        key = event[:3]
        if self._last is not None:
            self._next[self._last] = key
        self._last = key

    def predict(self, k: int) -> list[Prediction]:
        out, key, seen, successor = [], self._last, set(), self._next.get
        while len(out) < k:
            key = successor(key)
            if key is None or key in seen:
                break
            seen.add(key)
            out.append(_new_tuple(Prediction, key))
        return out

    def reset(self) -> None:
        self._next.clear()
        self._last = None
