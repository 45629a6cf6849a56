"""Rule-based predictors that need no configuration: ``none`` and ``sequence``."""

from __future__ import annotations

from .base import Prediction, Predictor, TransferEvent, _new_tuple


class NonePredictor(Predictor):
    """Predicts nothing: the ``pipellm`` mode then encrypts every transfer on demand."""

    name = "none"
    uses_d2h = False

    def predict(self, k: int) -> list[Prediction]:
        return []


class SequencePredictor(Predictor):
    """Next-in-sequence: remembers which host-to-device transfer followed each one last
    time (and each pair of consecutive ones) and predicts the chain of successors from
    the latest transfers.

    Learns any repeating order (layer-by-layer weight loads) after one pass; predicts
    nothing for a transfer it has not seen followed by another. The pair tells apart a
    transfer that recurs within a pass: a tied embedding loaded first and last in every
    forward is followed by the next forward's first load, then by the second.

    >>> p = SequencePredictor()
    >>> for name in ["e", "a", "b", "e", "e", "a", "b", "e"]:
    ...     p.observe(TransferEvent(name, 0, 10))
    >>> [x.region for x in p.predict(4)]
    ['e', 'a', 'b', 'e']
    """

    name = "sequence"
    uses_d2h = False

    def __init__(self) -> None:
        self._next: dict[tuple, tuple] = {}   # a transfer -> what followed it last
        self._after: dict[tuple, tuple] = {}  # (a transfer, the next) -> what followed them last
        self._previous: tuple | None = None
        self._last: tuple | None = None

    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        key = event[:3]
        if self._last is not None:
            self._next[self._last] = key
            if self._previous is not None:
                self._after[(self._previous, self._last)] = key
        self._previous, self._last = self._last, key

    def predict(self, k: int) -> list[Prediction]:
        out, seen = [], set()
        previous, key = self._previous, self._last
        after, successor = self._after.get, self._next.get
        while len(out) < k:
            following = after((previous, key)) or successor(key)
            if following is None or (key, following) in seen:
                break
            seen.add((key, following))
            out.append(_new_tuple(Prediction, following))
            previous, key = key, following
        return out

    def reset(self) -> None:
        self._next.clear()
        self._after.clear()
        self._previous = self._last = None
