"""Rule-based predictors for the traffic of offloading stacks: ``layerwise`` (weight
loads), ``kvswap`` (vLLM-style KV-cache swapping) and ``lru`` (offload pools)."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

import numpy as np

try:
    import cython
except ImportError:   # the plain module without Cython installed
    from . import _nocython as cython

from .base import Prediction, Predictor, TransferEvent


#: splitmix64's constants (the keys below), and the masks that make Python's integers
#: wrap as C's 64-bit ones do (the plain module computes the same keys)
_MASK64 = cython.declare(cython.ulonglong, 0xFFFFFFFFFFFFFFFF)
_MASK63 = cython.declare(cython.ulonglong, 0x7FFFFFFFFFFFFFFF)
_GOLDEN = cython.declare(cython.ulonglong, 0x9E3779B97F4A7C15)
_MIX1 = cython.declare(cython.ulonglong, 0xBF58476D1CE4E5B9)
_MIX2 = cython.declare(cython.ulonglong, 0x94D049BB133111EB)
_new_tuple = tuple.__new__
#: "absent" for maps whose values may be negative (steps)
_NONE = cython.declare(cython.longlong, -(1 << 62))
#: a guess packs (context's region + 1, walk's region + 1, context length) in one integer
_FIELD = cython.declare(cython.longlong, (1 << 28) - 1)
MAX_REGIONS = (1 << 28) - 2
MAX_ORDER = 64


@cython.cfunc
@cython.returns(cython.longlong)
@cython.locals(a=cython.longlong, b=cython.longlong, x=cython.ulonglong)
def _key(a, b):
    """A non-zero 63-bit key for the pair (a, b), chained for longer sequences (splitmix64's
    finalizer). Distinct sequences collide with probability about 2**-63; a collision
    would cost one wrong guess, never wrong data (the pipeline validates what it sends)."""
    x = ((a & _MASK64) * _GOLDEN + (b & _MASK64)) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    x = (x ^ (x >> 31)) & _MASK63
    return x if x != 0 else 1


def _zeros(n: int):
    """An array of n 64-bit integers: numpy's where compiled (typed memoryviews read it as
    C), a list where the plain module runs (its elements are Python integers, as the
    compiled code's arithmetic gives)."""
    return np.zeros(n, np.int64) if cython.compiled else [0] * n


def _doubled(array):
    return np.concatenate([array, np.zeros_like(array)]) if cython.compiled else array + [0] * len(array)


@cython.cclass
class _IntMap:
    """Non-zero 63-bit keys (from ``_key``) to 64-bit values: open addressing with linear
    probing over one array of (key, value) pairs, so a lookup reads one cache line where
    a dict keyed by tuples of names reads three or four. Inside a pipeline each call to a
    predictor follows a transfer's encryption, which flushes the CPU caches: those misses
    were most of the predictors' cost."""

    _array = cython.declare(object)
    _slots = cython.declare(cython.longlong[:])
    mask = cython.declare(cython.Py_ssize_t)
    size = cython.declare(cython.Py_ssize_t)

    def __init__(self, capacity: int = 64):   # (a power of two)
        self._array = _zeros(2 * capacity)
        self._slots = self._array
        self.mask, self.size = capacity - 1, 0

    @cython.cfunc
    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.returns(cython.Py_ssize_t)
    @cython.locals(key=cython.longlong, i=cython.Py_ssize_t, found=cython.longlong)
    def _slot(self, key):
        i = key & self.mask
        found = self._slots[2 * i]
        while found != key and found != 0:
            i = (i + 1) & self.mask
            found = self._slots[2 * i]
        return i

    @cython.cfunc
    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.returns(cython.longlong)
    @cython.locals(key=cython.longlong, default=cython.longlong, i=cython.Py_ssize_t)
    def get(self, key, default):
        i = self._slot(key)
        return self._slots[2 * i + 1] if self._slots[2 * i] == key else default

    @cython.cfunc
    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.locals(key=cython.longlong, value=cython.longlong, i=cython.Py_ssize_t)
    def put(self, key, value):
        i = self._slot(key)
        if self._slots[2 * i] != key:
            if 2 * (self.size + 1) > self.mask + 1:   # at most half full
                self._grow()
                i = self._slot(key)
            self._slots[2 * i] = key
            self.size += 1
        self._slots[2 * i + 1] = value

    @cython.cfunc
    @cython.locals(old=cython.longlong[:], j=cython.Py_ssize_t)
    def _grow(self):
        old = self._array
        self._array = _zeros(2 * len(self._array))
        self._slots = self._array
        self.mask, self.size = len(old) - 1, 0   # (twice the capacity: len(old) slots)
        for j in range(0, len(old), 2):
            if old[j] != 0:
                self.put(old[j], old[j + 1])


# the columns of _LayerwiseCore's per-region rows: the last span, its change from the
# one before, and how often the region was loaded
_OFFSET = cython.declare(cython.Py_ssize_t, 0)
_NBYTES = cython.declare(cython.Py_ssize_t, 1)
_D_OFFSET = cython.declare(cython.Py_ssize_t, 2)
_D_NBYTES = cython.declare(cython.Py_ssize_t, 3)
_SEEN = cython.declare(cython.Py_ssize_t, 4)
_COLUMNS = cython.declare(cython.Py_ssize_t, 5)


@cython.cclass
class _LayerwiseCore:
    """LayerwisePredictor's state and its per-transfer methods, apart from the public
    class so that the compiled module makes them an extension type (C fields, C methods).
    Regions are small integers (their position in the first-seen order), contexts and
    steps are 63-bit keys into ``_IntMap`` tables, a region's spans one row of an array:
    the state a call touches is a few cache lines, not a graph of tuples and strings. The
    ``cython`` declarations change nothing where the plain module runs."""

    order = cython.declare(cython.Py_ssize_t, visibility="public")
    _ids = cython.declare(dict, visibility="public")            # name -> region
    _names = cython.declare(list, visibility="public")          # region -> name
    _rows_array = cython.declare(object)
    _rows = cython.declare(cython.longlong[:])                  # region * _COLUMNS + _OFFSET.._SEEN
    _keys = cython.declare(cython.longlong[:])                  # scratch: one context's keys
    _history = cython.declare(list, visibility="public")        # the last ``order`` regions
    _steps = cython.declare(list, visibility="public")          # the last two steps
    _next = cython.declare(_IntMap)               # context -> region * 2 + kept its successor once
    _step_counts = cython.declare(_IntMap)        # (steps, step) -> count * 2**24 + order first seen
    _step_distinct = cython.declare(_IntMap)      # steps -> how many steps followed them
    _step_best = cython.declare(_IntMap)          # steps -> the most frequent step after them
    _like_offset = cython.declare(_IntMap)        # span -> change of offset that followed it
    _like_nbytes = cython.declare(_IntMap)        # span -> change of size that followed it
    _context_score = cython.declare(cython.double, visibility="public")
    _walk_score = cython.declare(cython.double, visibility="public")
    _chain = cython.declare(list, visibility="public")         # None: to be rebuilt
    _guesses = cython.declare(list, visibility="public")
    _chain_steps = cython.declare(set, visibility="public")
    _tail = cython.declare(tuple, visibility="public")
    _chain_ended = cython.declare(cython.bint, visibility="public")
    _predicted = cython.declare(list, visibility="public")     # None: to be made

    def reset(self) -> None:
        self._ids, self._names = {}, []
        self._rows_array = _zeros(64 * _COLUMNS)
        self._rows = self._rows_array
        self._keys = _zeros(self.order + 1)
        self._history, self._steps = [], []
        self._next, self._step_counts, self._step_distinct = _IntMap(), _IntMap(), _IntMap()
        self._step_best, self._like_offset, self._like_nbytes = _IntMap(), _IntMap(), _IntMap()
        self._context_score = self._walk_score = 0.5
        # the predicted chain of regions and the state at its end, kept while what is
        # observed follows it and nothing learned would change it (observe + predict then
        # cost one step, not k)
        self._chain: list | None = None
        self._guesses: list = []           # each chain step's _guess()
        self._chain_steps: set = set()     # the walk model's keys the chain looked up
        self._tail: tuple[list, list] = ([], [])
        self._chain_ended = False
        # the chain's predictions (spans included), kept with it: None = to be made
        self._predicted: list[Prediction] | None = None

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(region=cython.longlong, rows=cython.longlong[:], row=cython.Py_ssize_t)
    def _new_region(self, name):
        region = len(self._names)
        if region > MAX_REGIONS:
            raise ValueError(f"the layerwise predictor tells at most {MAX_REGIONS} regions apart")
        if region * _COLUMNS == len(self._rows_array):
            self._rows_array = _doubled(self._rows_array)
            self._rows = self._rows_array
        self._ids[name] = region
        self._names.append(name)
        return region

    @cython.cfunc
    @cython.returns(cython.Py_ssize_t)
    @cython.locals(history=list, size=cython.Py_ssize_t, n=cython.Py_ssize_t, key=cython.longlong,
                   keys=cython.longlong[:])
    def _context_keys(self, history):
        """The keys of the contexts ending at the last load, ``_keys[n]`` for the last n
        loads (1 <= n <= the returned count)."""
        size, keys, key = len(history), self._keys, 0
        size = min(size, self.order)
        for n in range(1, size + 1):
            key = _key(key, history[len(history) - n])
            keys[n] = key
        return size

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(history=list, steps=list, n=cython.Py_ssize_t, found=cython.longlong, context=cython.longlong,
                   walk=cython.longlong, step=cython.longlong, target=cython.longlong, nexts=_IntMap)
    def _guess(self, history, steps):
        """(context model's region + 1, walk model's region + 1, context length used),
        packed: the longest context seen before names the first."""
        context, walk, nexts = 0, 0, self._next
        n = self._context_keys(history)
        while n > 0:
            found = nexts.get(self._keys[n], -1)
            if found >= 0:
                context = (found >> 1) + 1
                break
            n -= 1
        if len(steps) >= 2:
            step = self._step_best.get(_key(_key(0, steps[len(steps) - 2]), steps[len(steps) - 1]), _NONE)
            if step != _NONE:
                target = history[len(history) - 1] + step   # (a region is its position)
                if 0 <= target < len(self._names):
                    walk = target + 1
        return context | (walk << 28) | (n << 56)

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(guess=cython.longlong, context=cython.longlong, walk=cython.longlong)
    def _choose(self, guess):
        """The region a guess predicts, -1 for none."""
        context, walk = (guess & _FIELD) - 1, ((guess >> 28) & _FIELD) - 1
        if context >= 0 and ((guess >> 56) >= self.order or walk < 0):
            return context
        if walk >= 0 and (context < 0 or self._walk_score > self._context_score):
            return walk
        return context

    @cython.locals(region=cython.longlong, history=list, steps=list, chain=list, changed=cython.bint,
                   before=cython.bint, guess=cython.longlong, guessed=cython.longlong, walk=cython.longlong,
                   step=cython.longlong, key=cython.longlong, counted=cython.longlong, entry=cython.longlong,
                   best=cython.longlong, top=cython.longlong, better=cython.bint, n=cython.Py_ssize_t,
                   found=cython.longlong, nexts=_IntMap, relearned=cython.bint, created=cython.bint,
                   rows=cython.longlong[:], row=cython.Py_ssize_t, offset=cython.longlong, nbytes=cython.longlong,
                   d_offset=cython.longlong, d_nbytes=cython.longlong, last=cython.longlong, predicted=list)
    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        region = self._ids.get(event.region, -1)
        history, steps = self._history, self._steps
        chain = self._chain
        changed = False     # something every prediction may depend on changed
        if history:
            # while the chain holds, its head's guesses are the ones made now
            guess = self._guesses[0] if chain else self._guess(history, steps)
            guessed, walk = (guess & _FIELD) - 1, ((guess >> 28) & _FIELD) - 1
            before = self._walk_score > self._context_score
            if guessed >= 0:
                self._context_score += 0.25 * ((guessed == region) - self._context_score)
            if walk >= 0:
                self._walk_score += 0.25 * ((walk == region) - self._walk_score)
            if before != (self._walk_score > self._context_score) and chain:
                # the other model leads now: the chain stands if no step of it changes hands
                changed = any(self._choose(g) != c for g, c in zip(self._guesses[1:], chain[1:]))
        if region < 0:
            region = self._new_region(event.region)
            changed = True
        if history:
            step = region - history[len(history) - 1]
            if len(steps) == 2:
                key = _key(_key(0, steps[0]), steps[1])
                # the most frequent step after these two (the first seen among equals),
                # kept up to date by the one count that grew
                counted = _key(key, step)
                entry = self._step_counts.get(counted, -1)
                if entry < 0:
                    entry = self._step_distinct.get(key, 0)
                    self._step_distinct.put(key, entry + 1)
                entry += 1 << 24
                self._step_counts.put(counted, entry)
                best = self._step_best.get(key, _NONE)
                if best != step:
                    better = best == _NONE
                    if not better:
                        top = self._step_counts.get(_key(key, best), 0)
                        better = (entry >> 24) > (top >> 24) or ((entry >> 24) == (top >> 24)
                                                                 and (entry & 0xFFFFFF) < (top & 0xFFFFFF))
                    if better:
                        self._step_best.put(key, step)
                        changed = changed or key in self._chain_steps   # the chain walked by it
            steps.append(step)
            if len(steps) > 2:
                del steps[0]
        nexts = self._next
        relearned = False   # what follows contexts ending in the last load changed
        created = False     # a longer context than the one at hand is new, and names region
        n = self._context_keys(history)
        while n > 0:
            key = self._keys[n]
            found = nexts.get(key, -1)
            n -= 1
            if found >= 0 and (found >> 1) == region:
                continue
            if found < 0:
                created = True
            elif created and n >= 1 and not (found & 1):
                # the first time a successor is contradicted where a longer context
                # (new) now tells the exception apart, it keeps its context: LoRA's first
                # wrap to the next step (after layer 0's backward loads) would otherwise
                # overwrite what follows layer 0's forward loads, and the next step
                # misses layer 1 once more
                nexts.put(key, found | 1)
                continue
            nexts.put(key, region * 2 + (found & 1 if found >= 0 else 0))
            relearned = True
        rows, row = self._rows, region * _COLUMNS
        offset, nbytes = event.offset, event.nbytes
        if rows[row + _SEEN] == 0:
            rows[row + _D_OFFSET] = rows[row + _D_NBYTES] = 0
        else:
            d_offset, d_nbytes = offset - rows[row + _OFFSET], nbytes - rows[row + _NBYTES]
            rows[row + _D_OFFSET], rows[row + _D_NBYTES] = d_offset, d_nbytes
            key = _key(_key(0, rows[row + _OFFSET]), rows[row + _NBYTES])
            if (self._like_offset.get(key, _NONE) != d_offset
                    or self._like_nbytes.get(key, _NONE) != d_nbytes):
                self._like_offset.put(key, d_offset)
                self._like_nbytes.put(key, d_nbytes)
                self._predicted = None   # spans of regions seen once may follow it
        rows[row + _OFFSET], rows[row + _NBYTES] = offset, nbytes
        rows[row + _SEEN] += 1
        # The chain stands if it foresaw this load and nothing it was computed from
        # changed: its later steps looked up contexts ending in this region or in its
        # own regions, so a relearned context ending in the previous load matters only
        # where that load comes again in it (or where the chain had ended for want of one).
        last = history[len(history) - 1] if history else -1
        if (not changed and chain and chain[0] == region
                and not (relearned and (self._chain_ended or last == region or last in chain[1:-1]))):
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
        if len(history) > self.order:
            del history[0]

    @cython.locals(k=cython.Py_ssize_t, chain=list, history=list, steps=list, walked=set, guesses=list,
                   guess=cython.longlong, region=cython.longlong, out=list)
    def predict(self, k: int) -> list[Prediction]:
        if self._chain is None:
            self._chain, self._guesses, self._chain_steps = [], [], set()
            self._tail, self._chain_ended = (list(self._history), list(self._steps)), False
        chain, (history, steps) = self._chain, self._tail
        if len(chain) < k and not self._chain_ended:
            walked, guesses = self._chain_steps, self._guesses
            while len(chain) < k and history:
                if len(steps) >= 2:
                    walked.add(_key(_key(0, steps[len(steps) - 2]), steps[len(steps) - 1]))
                guess = self._guess(history, steps)
                region = self._choose(guess)
                if region < 0:
                    self._chain_ended = True
                    break
                steps.append(region - history[len(history) - 1])
                history.append(region)
                if len(history) > self.order:
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
    @cython.locals(chain=list, out=list, rows=cython.longlong[:], row=cython.Py_ssize_t, times_of=dict, i=cython.Py_ssize_t,
                   region=cython.longlong, times=cython.longlong, offset=cython.longlong, nbytes=cython.longlong,
                   d_offset=cython.longlong, d_nbytes=cython.longlong, key=cython.longlong)
    def _spans(self, chain, out) -> None:
        """Extend the chain's predictions ``out``: each region's next span (up to the
        first that makes no sense, a negative offset or size)."""
        rows = self._rows
        times_of = {}   # region -> its loads in chain[:i + 1]: its next load, or the one after...
        for region in chain[:len(out)]:
            times_of[region] = times_of.get(region, 0) + 1
        for i in range(len(out), len(chain)):
            region = chain[i]
            times = times_of[region] = times_of.get(region, 0) + 1
            row = region * _COLUMNS
            offset, nbytes = rows[row + _OFFSET], rows[row + _NBYTES]
            if rows[row + _SEEN] == 1:
                key = _key(_key(0, offset), nbytes)
                d_offset, d_nbytes = self._like_offset.get(key, 0), self._like_nbytes.get(key, 0)
            else:
                d_offset, d_nbytes = rows[row + _D_OFFSET], rows[row + _D_NBYTES]
            offset, nbytes = offset + times * d_offset, nbytes + times * d_nbytes
            if nbytes <= 0 or offset < 0:
                break
            out.append(_new_tuple(Prediction, (self._names[region], int(offset), int(nbytes))))   # (no Python frame)


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
