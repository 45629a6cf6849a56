"""Rule-based predictors for the traffic of offloading stacks: ``layerwise`` (weight
loads), ``kvswap`` (vLLM-style KV-cache swapping) and ``lru`` (offload pools)."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

from pipellm.errors import ArgumentError

from ._layerwise import MAX_ORDER, _LayerwiseCore
from .base import Prediction, Predictor, TransferEvent, _new_tuple


class LayerwisePredictor(_LayerwiseCore, Predictor):
    """Learns the repeating order of host-to-device loads (FlexGen, accelerate, DeepSpeed).

    Two models predict the next *region*, and the one that has been right more often
    lately wins (a tournament, as in branch predictors). (Its underscore methods are
    internal: compiled, they are C functions that a subclass cannot override.)

    - an exact context model: the region that followed the longest recent context seen
      before (up to ``order`` loads), which tells repeated orders with shared stretches
      apart (several micro-batches per layer, small irregular tensors between layers).
      The first time a context of two or more loads is contradicted where a longer,
      new context tells the exception apart, it keeps its successor;
    - a walk model over positions in the first-seen order: the step (position delta)
      that followed the last two steps most often. Training's backward pass walks the
      layers in reverse but each layer's tensors forwards (steps +1, -3, +1, -3, ...): the
      walk model predicts it from its first layers on, before the exact contexts of a
      backward pass have ever been seen.

    An exact context of full length always wins. The *span* of a predicted load follows
    the region's own history (same offset and size as last time, plus the change seen
    between its last two loads: a KV cache that grows by one token per step), or, for a
    region seen once, the change its look-alikes (same previous span) made. Nothing is
    predicted before something has been seen.

    >>> p = LayerwisePredictor()
    >>> for step in range(2):
    ...     for layer in ["l0", "l1", "l2"]:
    ...         p.observe(TransferEvent(layer, 0, 100 + 10 * step))
    >>> [(x.region, x.nbytes) for x in p.predict(3)]
    [('l0', 120), ('l1', 120), ('l2', 120)]
    >>> p = LayerwisePredictor()
    >>> forward = [f"l{i}.{t}" for i in range(6) for t in "af"]
    >>> for region in forward + ["l5.a", "l5.f", "l4.a", "l4.f", "l3.a", "l3.f"]:   # then backward
    ...     p.observe(TransferEvent(region, 0, 10))
    >>> [x.region for x in p.predict(4)]
    ['l2.a', 'l2.f', 'l1.a', 'l1.f']
    """

    name = "layerwise"
    uses_d2h = False

    def __init__(self, order: int = 4):   # (here, not in the core: a signature to inspect)
        if not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ArgumentError(f"order must be an integer from 1 to {MAX_ORDER} (the loads a context holds), "
                                f"got {order!r}")
        self.order = order
        self.reset()


class KVSwapPredictor(Predictor):
    """vLLM-style swapping: blocks swapped out (device to host) come back in later, FIFO
    across layers within a preempted request and LIFO across preempted requests.

    A *group* is one request's swap-out: a run of device-to-host copies that goes through
    the layers in order; a new group starts when the copies return to the group's first
    layer. Predicted next: the most recently swapped-out group's blocks, in the order
    they left.

    >>> p = KVSwapPredictor()
    >>> for group in (["a", "b"], ["c", "d"]):          # two requests preempted
    ...     for layer in ("L0", "L1"):
    ...         for block in group:
    ...             p.observe(TransferEvent(layer, ord(block) * 10, 10, "d2h"))
    >>> [(x.region, x.offset) for x in p.predict(4)]      # the newest group first
    [('L0', 990), ('L0', 1000), ('L1', 990), ('L1', 1000)]
    """

    name = "kvswap"

    def __init__(self, max_groups: int = 4096):
        self.max_groups = max_groups
        self.reset()

    def reset(self) -> None:
        self._groups: list[deque] = []       # a stack; the newest group last
        self._open: deque | None = None      # the swap-out being observed
        self._first: str | None = None
        self._last: str | None = None
        self._swap_regions: set[str] = set()  # regions blocks were swapped out of

    def observe(self, event: TransferEvent) -> None:
        if event.direction == "h2d" and event.region not in self._swap_regions:
            return  # not swap traffic (input ids, sampling parameters): it ends no swap-out
        key = (event.region, event.offset, event.nbytes)
        if event.direction == "d2h":
            self._swap_regions.add(event.region)
            if self._open is not None and event.region == self._first and self._last != event.region:
                self._close()
            if self._open is None:
                self._open, self._first = deque(), event.region
            self._open.append(key)
            self._last = event.region
            return
        self._close()
        groups = self._groups
        if groups and groups[-1] and groups[-1][0] == key:   # the common case: in order
            groups[-1].popleft()
            if not groups[-1]:
                groups.pop()
            return
        for g in range(len(groups) - 1, max(-1, len(groups) - 1 - 64), -1):  # newest first, bounded
            group = groups[g]
            if key in group:
                group.remove(key)
                if not group:
                    del groups[g]
                return

    def _close(self) -> None:
        if self._open:
            self._groups.append(self._open)
            if len(self._groups) > self.max_groups:
                del self._groups[0]
        self._open, self._first, self._last = None, None, None

    def predict(self, k: int) -> list[Prediction]:
        if not self._open and not self._groups:
            return []   # (the learned predictor asks at every load, swaps or not)
        out = []
        # newest first, without copying the stack (it may hold thousands of groups)
        for group in itertools.chain([self._open] if self._open else (), reversed(self._groups)):
            for key in group:
                out.append(_new_tuple(Prediction, key))
                if len(out) >= k:
                    return out
        return out


class LRUPredictor(Predictor):
    """Offload pools with LRU eviction (vLLM's offloading connector, LMCache): blocks
    stored to the host come back when a request reuses their prefix, and a prefix comes
    back in the order it was stored. After a load of a stored block, the blocks stored
    right after it are predicted next; with nothing loaded yet, the most recently stored
    blocks (the pool's MRU end) are.

    >>> p = LRUPredictor()
    >>> for off in (0, 10, 20, 30):
    ...     p.observe(TransferEvent("pool", off, 10, "d2h"))
    >>> p.observe(TransferEvent("pool", 10, 10))
    >>> [x.offset for x in p.predict(2)]
    [20, 30]
    """

    name = "lru"

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        self._order: OrderedDict[tuple, None] = OrderedDict()   # stored blocks, oldest first
        self._after: dict[tuple, tuple] = {}                     # block -> block stored right after it
        self._last_store: tuple | None = None
        self._cursor: tuple | None = None

    def observe(self, event: TransferEvent) -> None:
        key = (event.region, event.offset, event.nbytes)
        if event.direction == "d2h":
            if self._last_store is not None:
                self._after[self._last_store] = key
            self._last_store = key
            self._order[key] = None
            self._order.move_to_end(key)
            while len(self._order) > self.capacity:
                old, _ = self._order.popitem(last=False)
                self._after.pop(old, None)
            return
        if key in self._order:
            self._order.move_to_end(key)  # a hit refreshes it
        self._cursor = key

    def predict(self, k: int) -> list[Prediction]:
        out, key, seen = [], self._cursor, set()
        while key is not None and len(out) < k:
            key = self._after.get(key)
            if key is None or key in seen or key not in self._order:
                break
            seen.add(key)
            out.append(_new_tuple(Prediction, key))
        if not out:
            out = [_new_tuple(Prediction, key) for key in reversed(self._order)][:k]
        return out
