"""Rule-based predictors for the traffic of offloading stacks: ``layerwise`` (weight
loads), ``kvswap`` (vLLM-style KV-cache swapping) and ``lru`` (offload pools)."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

try:
    import cython
except ImportError:   # the plain module without Cython installed
    from . import _nocython as cython

from .base import Prediction, Predictor, TransferEvent


@cython.cclass
class _LayerwiseCore:
    """LayerwisePredictor's state and its per-transfer methods, apart from the public
    class so that the compiled module makes them an extension type: the state in C
    fields, not an instance dict (about a sixth of observe + predict on MoE). The
    ``cython`` declarations change nothing where the plain module runs."""

    order = cython.declare(cython.Py_ssize_t, visibility="public")
    _history = cython.declare(object, visibility="public")     # deque(maxlen=order) of regions
    _next = cython.declare(dict, visibility="public")
    _flipped = cython.declare(set, visibility="public")
    _span = cython.declare(dict, visibility="public")
    _seen = cython.declare(dict, visibility="public")
    _step_like = cython.declare(dict, visibility="public")
    _position = cython.declare(dict, visibility="public")
    _by_position = cython.declare(list, visibility="public")
    _steps = cython.declare(object, visibility="public")       # deque(maxlen=2)
    _step_counts = cython.declare(dict, visibility="public")
    _step_best = cython.declare(dict, visibility="public")
    _context_score = cython.declare(cython.double, visibility="public")
    _walk_score = cython.declare(cython.double, visibility="public")
    _chain = cython.declare(list, visibility="public")         # None: to be rebuilt
    _guesses = cython.declare(list, visibility="public")
    _chain_steps = cython.declare(set, visibility="public")
    _tail = cython.declare(tuple, visibility="public")
    _chain_ended = cython.declare(cython.bint, visibility="public")
    _predicted = cython.declare(list, visibility="public")     # None: to be made

    def reset(self) -> None:
        self._history: deque = deque(maxlen=self.order)
        self._next: dict[tuple, str] = {}
        self._flipped: set = set()        # contexts that kept their successor once
        self._span: dict[str, tuple[int, int, int, int]] = {}   # offset, nbytes, d_offset, d_nbytes
        self._seen: dict[str, int] = {}
        self._step_like: dict[tuple[int, int], tuple[int, int]] = {}
        self._position: dict[str, int] = {}
        self._by_position: list[str] = []
        self._steps: deque = deque(maxlen=2)
        self._step_counts: dict[tuple, dict[int, list[int]]] = {}
        self._step_best: dict[tuple, int] = {}
        self._context_score = self._walk_score = 0.5
        # the predicted chain of regions and the state at its end, kept while what is
        # observed follows it and nothing learned would change it (observe + predict then
        # cost one step, not k)
        self._chain: list[str] | None = None
        self._guesses: list[tuple] = []    # each chain step's _guess()
        self._chain_steps: set = set()     # the walk model's keys the chain looked up
        self._tail: tuple[list, list] = ([], [])
        self._chain_ended = False
        # the chain's predictions (spans included), kept with it: None = to be made
        self._predicted: list[Prediction] | None = None

    @cython.cfunc
    @cython.locals(n=cython.Py_ssize_t, size=cython.Py_ssize_t, nexts=dict, whole=tuple, target=cython.Py_ssize_t,
                   by_position=list)
    def _guess(self, history, steps) -> tuple:
        """(context model's region, walk model's region, context length used)."""
        context, n = None, 0
        nexts, size = self._next, len(history)
        whole = tuple(history)   # (its slices are tuples: one allocation each)
        for n in range(min(self.order, size), 0, -1):
            context = nexts.get(whole if n == size else whole[-n:])
            if context is not None:
                break
        walk = None
        if len(steps) >= 2:
            step = self._step_best.get((steps[-2], steps[-1]))
            if step is not None:
                target = self._position[history[-1]] + step
                by_position = self._by_position
                if 0 <= target < len(by_position):
                    walk = by_position[target]
        return context, walk, n

    @cython.cfunc
    @cython.locals(n=cython.Py_ssize_t)
    def _choose(self, context, walk, n):
        if context is not None and (n >= self.order or walk is None):
            return context
        if walk is not None and (context is None or self._walk_score > self._context_score):
            return walk
        return context

    @cython.locals(position=dict, chain=list, changed=cython.bint, before=cython.bint, step=cython.Py_ssize_t,
                   counts=dict, entry=list, step_best=dict, context=tuple, nexts=dict, flipped=set,
                   relearned=cython.bint, created=cython.bint, n=cython.Py_ssize_t, span=dict, predicted=list)
    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        region = event.region
        history, steps, position = self._history, self._steps, self._position
        chain = self._chain
        changed = False     # something every prediction may depend on changed
        if history:
            # while the chain holds, its head's guesses are the ones made now
            guessed, walk, _ = self._guesses[0] if chain else self._guess(tuple(history), tuple(steps))
            before = self._walk_score > self._context_score
            if guessed is not None:
                self._context_score += 0.25 * ((guessed == region) - self._context_score)
            if walk is not None:
                self._walk_score += 0.25 * ((walk == region) - self._walk_score)
            if before != (self._walk_score > self._context_score) and chain:
                # the other model leads now: the chain stands if no step of it changes hands
                changed = any(self._choose(g[0], g[1], g[2]) != c for g, c in zip(self._guesses[1:], chain[1:]))
        if region not in position:
            position[region] = len(self._by_position)
            self._by_position.append(region)
            changed = True
        if history:
            step = position[region] - position[history[-1]]
            if len(steps) == 2:
                key = (steps[0], steps[1])
                # the most frequent step after these two (the first seen among equals),
                # kept up to date by the one count that grew
                counts = self._step_counts.setdefault(key, {})
                entry = counts.get(step)
                if entry is None:
                    entry = counts[step] = [0, len(counts)]   # count, order first seen
                entry[0] += 1
                step_best = self._step_best
                best = step_best.get(key)
                top = counts[best] if best is not None else None
                if best != step and (top is None or entry[0] > top[0] or (entry[0] == top[0] and entry[1] < top[1])):
                    step_best[key] = step
                    changed = changed or key in self._chain_steps   # the chain walked by it
            steps.append(step)
        context = tuple(history)
        nexts, flipped = self._next, self._flipped
        relearned = False   # what follows contexts ending in history[-1] changed
        created = False     # a longer context than the one at hand is new, and names region
        for n in range(len(context), 0, -1):
            key = context[-n:]
            old = nexts.get(key)
            if old == region:
                continue
            if old is None:
                created = True
            elif created and n >= 2 and key not in flipped:
                # the first time a successor is contradicted where a longer context
                # (new) now tells the exception apart, it keeps its context: LoRA's first
                # wrap to the next step (after layer 0's backward loads) would otherwise
                # overwrite what follows layer 0's forward loads, and the next step
                # misses layer 1 once more
                flipped.add(key)
                continue
            nexts[key] = region
            relearned = True
        span = self._span
        last = span.get(region)
        if last is None:
            span[region] = (event.offset, event.nbytes, 0, 0)
        else:
            change = (event.offset - last[0], event.nbytes - last[1])
            span[region] = (event.offset, event.nbytes, *change)
            if self._step_like.get((last[0], last[1])) != change:
                self._step_like[(last[0], last[1])] = change
                self._predicted = None   # spans of regions seen once may follow it
        self._seen[region] = self._seen.get(region, 0) + 1
        # The chain stands if it foresaw this load and nothing it was computed from
        # changed: its later steps looked up contexts ending in this region or in its
        # own regions, so a relearned context ending in the previous load matters only
        # where that load comes again in it (or where the chain had ended for want of one).
        if (not changed and chain and chain[0] == region
                and not (relearned and (self._chain_ended or context[-1] == region or context[-1] in chain[1:-1]))):
            chain.pop(0)
            self._guesses.pop(0)
            predicted = self._predicted
            # the other predictions stand unless this region comes again in the chain
            # (its next span follows the one just seen)
            if predicted and region not in chain:
                predicted.pop(0)
            else:
                self._predicted = None
        else:
            self._chain = self._predicted = None
        history.append(region)

    @cython.locals(k=cython.Py_ssize_t, chain=list, history=list, steps=list, position=dict, order=cython.Py_ssize_t,
                   walked=set, guesses=list, guess=tuple, out=list)
    def predict(self, k: int) -> list[Prediction]:
        if self._chain is None:
            self._chain, self._guesses, self._chain_steps = [], [], set()
            self._tail, self._chain_ended = (list(self._history), list(self._steps)), False
        chain, (history, steps) = self._chain, self._tail
        if len(chain) < k and not self._chain_ended:
            # (locals: this loop is most of a rebuild's cost)
            position, order = self._position, self.order
            walked, guesses = self._chain_steps, self._guesses
            while len(chain) < k and history:
                if len(steps) >= 2:
                    walked.add((steps[-2], steps[-1]))
                guess = self._guess(history, steps)
                region = self._choose(guess[0], guess[1], guess[2])
                if region is None:
                    self._chain_ended = True
                    break
                steps.append(position[region] - position[history[-1]])
                history.append(region)
                if len(history) > order:
                    del history[0], steps[0]
                chain.append(region)
                guesses.append(guess)
        out = self._predicted
        if out is None:
            out = self._predicted = []
        if len(out) < k:
            self._spans(chain, out)
        return out[:k]

    @cython.cfunc
    @cython.locals(span=dict, seen=dict, step_like=dict, times_of=dict, i=cython.Py_ssize_t, times=cython.Py_ssize_t)
    def _spans(self, chain: list, out: list) -> None:
        """Extend the chain's predictions ``out``: each region's next span (up to the
        first that makes no sense, a negative offset or size)."""
        span, seen, step_like = self._span, self._seen, self._step_like
        times_of = {}   # region -> its loads in chain[:i + 1]: its next load, or the one after...
        for region in chain[:len(out)]:
            times_of[region] = times_of.get(region, 0) + 1
        for i in range(len(out), len(chain)):
            region = chain[i]
            times = times_of[region] = times_of.get(region, 0) + 1
            offset, nbytes, d_offset, d_nbytes = span[region]
            if seen[region] == 1:
                d_offset, d_nbytes = step_like.get((offset, nbytes), (0, 0))
            offset, nbytes = offset + times * d_offset, nbytes + times * d_nbytes
            if nbytes <= 0 or offset < 0:
                break
            out.append(Prediction(region, offset, nbytes))


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
        out = []
        # newest first, without copying the stack (it may hold thousands of groups)
        for group in itertools.chain([self._open] if self._open else (), reversed(self._groups)):
            for key in group:
                out.append(Prediction._make(key))
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
            out.append(Prediction._make(key))
        if not out:
            out = [Prediction._make(key) for key in reversed(self._order)][:k]
        return out
