"""The predictors' hot state in compact form, compiled: region names become small
integers, sequences of them 63-bit keys into open-addressing integer tables, per-region
facts rows of one integer array. Inside a pipeline each call to a predictor follows a
transfer's encryption, which flushes the CPU caches; a dict keyed by tuples of names
costs three or four cache misses per lookup where these tables cost one, and those
misses were most of the predictors' cost. The public predictors (``rules.py``,
``learned.py``) wrap the cores here. The ``cython`` declarations (pure-Python mode)
change nothing where the plain module runs."""

from __future__ import annotations

import numpy as np

try:
    import cython
except ImportError:   # the plain module without Cython installed
    from . import _nocython as cython

from pipellm.errors import ArgumentError
from .base import Prediction, TransferEvent, _new_tuple

#: splitmix64's constants (the keys below), and the masks that make Python's integers
#: wrap as C's 64-bit ones do (the plain module computes the same keys)
_MASK64 = cython.declare(cython.ulonglong, 0xFFFFFFFFFFFFFFFF)
_MASK63 = cython.declare(cython.ulonglong, 0x7FFFFFFFFFFFFFFF)
_GOLDEN = cython.declare(cython.ulonglong, 0x9E3779B97F4A7C15)
_MIX1 = cython.declare(cython.ulonglong, 0xBF58476D1CE4E5B9)
_MIX2 = cython.declare(cython.ulonglong, 0x94D049BB133111EB)
#: "absent" for maps whose values may be negative (steps)
_NONE = cython.declare(cython.longlong, -(1 << 62))
#: a guess packs (context's region + 1, walk's region + 1, context length) in one integer
_FIELD = cython.declare(cython.longlong, (1 << 28) - 1)
MAX_REGIONS = (1 << 28) - 2
MAX_ORDER = 64   # (the context length has 7 bits of a guess)


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


@cython.cfunc
@cython.returns(cython.longlong)
@cython.locals(a=cython.longlong, b=cython.longlong)
def _pair(a, b):
    """The key of the pair (a, b) in one table: every site that looks a pair up or stores
    it calls this (two steps, a span, learned's (prev + 1, last))."""
    return _key(_key(0, a), b)


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
    @cython.returns(cython.Py_ssize_t)
    @cython.locals(key=cython.longlong, i=cython.Py_ssize_t)
    def _claim(self, key):
        """The key's slot, the key inserted (value 0) where absent."""
        i = self._slot(key)
        if self._slots[2 * i] != key:
            if 2 * (self.size + 1) > self.mask + 1:   # at most half full
                self._grow()
                i = self._slot(key)
            self._slots[2 * i], self._slots[2 * i + 1] = key, 0
            self.size += 1
        return i

    @cython.cfunc
    @cython.locals(key=cython.longlong, value=cython.longlong, i=cython.Py_ssize_t)
    def put(self, key, value):
        i = self._claim(key)   # (first: it may grow the table, a new array)
        self._slots[2 * i + 1] = value

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(key=cython.longlong, delta=cython.longlong, i=cython.Py_ssize_t)
    def add(self, key, delta):
        """Add ``delta`` to the key's value (0 if absent); the new value."""
        i = self._claim(key)
        self._slots[2 * i + 1] += delta
        return self._slots[2 * i + 1]

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
# its two walkers (see _walkers), and how many walk keys a chain keeps
_OBSERVED = cython.declare(cython.Py_ssize_t, 0)
_TAIL = cython.declare(cython.Py_ssize_t, 1)
_WALKED = cython.declare(cython.Py_ssize_t, 64)


@cython.cclass
class _LayerwiseCore:
    """LayerwisePredictor's state and its per-transfer methods, apart from the public
    class so that the compiled module makes them an extension type (C fields, C methods).
    Regions are small integers (their position in the first-seen order), contexts and
    steps are 63-bit keys into ``_IntMap`` tables, a region's spans one row of an array,
    the recent loads and the predicted chain integer arrays: the state a call touches is
    a few cache lines, not a graph of tuples and strings. The ``cython`` declarations
    change nothing where the plain module runs."""

    order = cython.declare(cython.Py_ssize_t, visibility="public")
    _ids = cython.declare(dict, visibility="public")            # name -> region
    _names = cython.declare(list, visibility="public")          # region -> name
    _rows_array = cython.declare(object)
    _rows = cython.declare(cython.longlong[:])                  # region * _COLUMNS + _OFFSET.._SEEN
    _keys = cython.declare(cython.longlong[:])                  # scratch: one context's keys
    # two walkers, each (loads held, steps held, the step before the last, the last step,
    # then its last ``order`` loads, oldest first): _OBSERVED, what was loaded (two steps
    # at most), and _TAIL, the chain's end (its steps drop with its oldest loads)
    _walkers_array = cython.declare(object)
    _walkers = cython.declare(cython.longlong[:])
    _next = cython.declare(_IntMap)               # context -> region * 2 + kept its successor once
    _step_counts = cython.declare(_IntMap)        # (steps, step) -> count * 2**24 + order first seen
    _step_distinct = cython.declare(_IntMap)      # steps -> how many steps followed them
    _step_best = cython.declare(_IntMap)          # steps -> the most frequent step after them
    _like_offset = cython.declare(_IntMap)        # span -> change of offset that followed it
    _like_nbytes = cython.declare(_IntMap)        # span -> change of size that followed it
    _context_score = cython.declare(cython.double, visibility="public")
    _walk_score = cython.declare(cython.double, visibility="public")
    # the predicted chain (regions and each step's _guess(), live from _start) and the
    # walk keys it looked up (at most _WALKED; past that any change of a walk step drops it)
    _chain_valid = cython.declare(cython.bint)
    _chain_array = cython.declare(object)
    _chain = cython.declare(cython.longlong[:])   # region, guess, region, guess...
    _start = cython.declare(cython.Py_ssize_t)
    _length = cython.declare(cython.Py_ssize_t)
    _walked_array = cython.declare(object)
    _walked = cython.declare(cython.longlong[:])
    _nwalked = cython.declare(cython.Py_ssize_t)
    _chain_ended = cython.declare(cython.bint)
    _predicted = cython.declare(list)             # the chain's predictions; None: to be made

    def reset(self) -> None:
        self._ids, self._names = {}, []
        self._rows_array = _zeros(64 * _COLUMNS)
        self._rows = self._rows_array
        self._keys = _zeros(self.order + 1)
        self._walkers_array = _zeros(2 * (self.order + 4))
        self._walkers = self._walkers_array
        self._next, self._step_counts, self._step_distinct = _IntMap(), _IntMap(), _IntMap()
        self._step_best, self._like_offset, self._like_nbytes = _IntMap(), _IntMap(), _IntMap()
        self._context_score = self._walk_score = 0.5
        # the chain and the state at its end are kept while what is observed follows it
        # and nothing learned would change it (observe + predict then cost one step, not k)
        self._chain_valid = False
        self._chain_array = _zeros(2 * 16)
        self._chain = self._chain_array
        self._start = self._length = 0
        self._walked_array = _zeros(_WALKED)
        self._walked = self._walked_array
        self._nwalked = 0
        self._chain_ended = False
        self._predicted = None

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(region=cython.longlong)
    def _new_region(self, name):
        region = len(self._names)
        if region > MAX_REGIONS:
            raise ArgumentError(f"the layerwise predictor tells at most {MAX_REGIONS} regions apart")
        if region * _COLUMNS == len(self._rows_array):
            self._rows_array = _doubled(self._rows_array)
            self._rows = self._rows_array
        self._ids[name] = region
        self._names.append(name)
        return region

    # -- the walkers ----------------------------------------------------------------------------
    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(walker=cython.Py_ssize_t, base=cython.Py_ssize_t)
    def _last(self, walker):
        """The walker's last load, -1 for none."""
        base = walker * (self.order + 4)
        return self._walkers[base + 3 + self._walkers[base]] if self._walkers[base] > 0 else -1

    @cython.cfunc
    @cython.locals(walker=cython.Py_ssize_t, region=cython.longlong, w=cython.longlong[:], base=cython.Py_ssize_t,
                   held=cython.Py_ssize_t, i=cython.Py_ssize_t)
    def _push(self, walker, region):
        """The walker loads ``region``: a step from its last load, the oldest dropped
        past ``order`` loads (with the oldest step, on the tail)."""
        w, base = self._walkers, walker * (self.order + 4)
        held = w[base]
        if held > 0:
            w[base + 1] += 1
            w[base + 2], w[base + 3] = w[base + 3], region - w[base + 3 + held]
        if held == self.order:
            for i in range(held - 1):
                w[base + 4 + i] = w[base + 5 + i]
            w[base + 3 + held] = region
            if walker == _TAIL:
                w[base + 1] -= 1
        else:
            w[base + 4 + held] = region
            w[base] = held + 1
        if walker == _OBSERVED and w[base + 1] > 2:
            w[base + 1] = 2

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(walker=cython.Py_ssize_t, base=cython.Py_ssize_t)
    def _walk_key(self, walker):
        """The key of the walker's last two steps, 0 with fewer."""
        base = walker * (self.order + 4)
        if self._walkers[base + 1] < 2:
            return 0
        return _pair(self._walkers[base + 2], self._walkers[base + 3])

    @cython.cfunc
    @cython.returns(cython.Py_ssize_t)
    @cython.locals(walker=cython.Py_ssize_t, base=cython.Py_ssize_t, size=cython.Py_ssize_t, n=cython.Py_ssize_t,
                   key=cython.longlong)
    def _context_keys(self, walker):
        """The keys of the contexts ending at the walker's last load, ``_keys[n]`` for the
        last n loads (1 <= n <= the returned count)."""
        base = walker * (self.order + 4)
        size, key = self._walkers[base], 0
        for n in range(1, size + 1):
            key = _key(key, self._walkers[base + 4 + size - n])
            self._keys[n] = key
        return size

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(walker=cython.Py_ssize_t, n=cython.Py_ssize_t, found=cython.longlong, context=cython.longlong,
                   walk=cython.longlong, step=cython.longlong, target=cython.longlong, key=cython.longlong)
    def _guess(self, walker):
        """(context model's region + 1, walk model's region + 1, context length used),
        packed: the longest context seen before names the first."""
        context, walk = 0, 0
        n = self._context_keys(walker)
        while n > 0:
            found = self._next.get(self._keys[n], -1)
            if found >= 0:
                context = (found >> 1) + 1
                break
            n -= 1
        key = self._walk_key(walker)
        if key != 0:
            step = self._step_best.get(key, _NONE)
            if step != _NONE:
                target = self._last(walker) + step   # (a region is its position)
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

    # -- the chain ------------------------------------------------------------------------------
    @cython.cfunc
    @cython.returns(cython.bint)
    @cython.locals(region=cython.longlong, first=cython.Py_ssize_t, end=cython.Py_ssize_t, i=cython.Py_ssize_t)
    def _in_chain(self, region, first, end):
        """Whether the chain's steps first..end-1 (from its head) hold the region."""
        for i in range(first, end):
            if self._chain[2 * (self._start + i)] == region:
                return True
        return False

    @cython.cfunc
    @cython.returns(cython.bint)
    @cython.locals(key=cython.longlong, i=cython.Py_ssize_t)
    def _walked_by_chain(self, key):
        if self._nwalked > _WALKED:
            return True   # (too many to keep: any change may matter)
        for i in range(min(self._nwalked, _WALKED)):
            if self._walked[i] == key:
                return True
        return False

    @cython.cfunc
    @cython.locals(key=cython.longlong)
    def _note_walked(self, key):
        """The chain looked up this walk key."""
        if not self._walked_by_chain(key):
            if self._nwalked < _WALKED:
                self._walked[self._nwalked] = key
            self._nwalked += 1

    @cython.cfunc
    @cython.locals(region=cython.longlong, guess=cython.longlong, end=cython.Py_ssize_t)
    def _extend(self, region, guess):
        """Append a step to the chain."""
        end = self._start + self._length
        if 2 * end == len(self._chain_array):
            if self._start > 0:   # move the live steps to the front
                self._chain_array[:2 * self._length] = self._chain_array[2 * self._start:2 * end]
                self._start, end = 0, self._length
            else:
                self._chain_array = _doubled(self._chain_array)
            self._chain = self._chain_array
        self._chain[2 * end], self._chain[2 * end + 1] = region, guess
        self._length += 1

    @cython.locals(region=cython.longlong, changed=cython.bint, before=cython.bint, guess=cython.longlong,
                   guessed=cython.longlong, walk=cython.longlong, step=cython.longlong, key=cython.longlong,
                   counted=cython.longlong, entry=cython.longlong, best=cython.longlong, top=cython.longlong,
                   better=cython.bint, n=cython.Py_ssize_t, found=cython.longlong, nexts=_IntMap,
                   relearned=cython.bint, created=cython.bint, rows=cython.longlong[:], row=cython.Py_ssize_t,
                   offset=cython.longlong, nbytes=cython.longlong, d_offset=cython.longlong,
                   d_nbytes=cython.longlong, last=cython.longlong, predicted=list, i=cython.Py_ssize_t,
                   live=cython.bint)
    @cython.ccall
    def observe(self, event: TransferEvent):
        if event.direction != "h2d":
            return
        region = self._ids.get(event.region, -1)
        last = self._last(_OBSERVED)
        live = self._chain_valid and self._length > 0
        changed = False     # something every prediction may depend on changed
        if last >= 0:
            # while the chain holds, its head's guesses are the ones made now
            guess = self._chain[2 * self._start + 1] if live else self._guess(_OBSERVED)
            guessed, walk = (guess & _FIELD) - 1, ((guess >> 28) & _FIELD) - 1
            before = self._walk_score > self._context_score
            if guessed >= 0:
                self._context_score += 0.25 * ((guessed == region) - self._context_score)
            if walk >= 0:
                self._walk_score += 0.25 * ((walk == region) - self._walk_score)
            if before != (self._walk_score > self._context_score) and live:
                # the other model leads now: the chain stands if no step of it changes hands
                for i in range(1, self._length):
                    changed = changed or (self._choose(self._chain[2 * (self._start + i) + 1])
                                          != self._chain[2 * (self._start + i)])
        if region < 0:
            region = self._new_region(event.region)
            changed = True
        if last >= 0:
            step = region - last
            key = self._walk_key(_OBSERVED)
            if key != 0:
                # the most frequent step after these two (the first seen among equals),
                # kept up to date by the one count that grew
                counted = _key(key, step)
                entry = self._step_counts.get(counted, -1)
                if entry < 0:
                    entry = self._step_distinct.add(key, 1) - 1   # (the order first seen)
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
                        changed = changed or self._walked_by_chain(key)   # the chain walked by it
        nexts = self._next
        relearned = False   # what follows contexts ending in the last load changed
        created = False     # a longer context than the one at hand is new, and names region
        n = self._context_keys(_OBSERVED)
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
            key = _pair(rows[row + _OFFSET], rows[row + _NBYTES])
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
        if (not changed and live and self._chain[2 * self._start] == region
                and not (relearned and (self._chain_ended or last == region
                                        or self._in_chain(last, 1, self._length - 1)))):
            self._start += 1
            self._length -= 1
            predicted = self._predicted
            # the other predictions stand unless this region comes again in the chain
            # (its next span follows the one just seen)
            if predicted and not self._in_chain(region, 0, self._length):
                predicted.pop(0)
            else:
                self._predicted = None
        else:
            self._chain_valid = False
            self._predicted = None
        self._push(_OBSERVED, region)

    @cython.locals(k=cython.Py_ssize_t, guess=cython.longlong, region=cython.longlong, out=list, base=cython.Py_ssize_t,
                   i=cython.Py_ssize_t, key=cython.longlong)
    @cython.ccall
    def predict(self, k) -> list:
        if not self._chain_valid:
            self._chain_valid, self._start, self._length, self._nwalked = True, 0, 0, 0
            self._chain_ended = False
            base = self.order + 4   # the tail starts where the loads observed end
            for i in range(base):
                self._walkers[base + i] = self._walkers[i]
        if self._length < k and not self._chain_ended:
            while self._length < k and self._last(_TAIL) >= 0:
                key = self._walk_key(_TAIL)
                if key != 0:
                    self._note_walked(key)
                guess = self._guess(_TAIL)
                region = self._choose(guess)
                if region < 0:
                    self._chain_ended = True
                    break
                self._push(_TAIL, region)
                self._extend(region, guess)
        out = self._predicted
        if out is None:
            out = self._predicted = []
        if len(out) < k:
            self._spans(out)
        return out[:k]

    def _recomputed(self, k: int) -> list:
        """What ``predict(k)`` gives computed afresh now, the kept chain left as it is
        (tests hold the two equal after every event)."""
        saved = (self._chain_valid, self._chain_array.copy(), self._start, self._length, self._walked_array.copy(),
                 self._nwalked, self._chain_ended, self._predicted, self._walkers_array.copy())
        self._chain_valid, self._predicted = False, None
        try:
            return self.predict(k)
        finally:
            (self._chain_valid, self._chain_array, self._start, self._length, self._walked_array, self._nwalked,
             self._chain_ended, self._predicted, self._walkers_array) = saved
            self._chain, self._walked, self._walkers = self._chain_array, self._walked_array, self._walkers_array

    @cython.cfunc
    @cython.locals(out=list, rows=cython.longlong[:], row=cython.Py_ssize_t, i=cython.Py_ssize_t,
                   j=cython.Py_ssize_t, region=cython.longlong, times=cython.longlong, offset=cython.longlong,
                   nbytes=cython.longlong, d_offset=cython.longlong, d_nbytes=cython.longlong, key=cython.longlong)
    def _spans(self, out) -> None:
        """Extend the chain's predictions ``out``: each region's next span (up to the
        first that makes no sense, a negative offset or size)."""
        rows = self._rows
        for i in range(len(out), self._length):
            region = self._chain[2 * (self._start + i)]
            times = 1   # its loads in the chain up to here: its next load, or the one after...
            for j in range(i):
                if self._chain[2 * (self._start + j)] == region:
                    times += 1
            row = region * _COLUMNS
            offset, nbytes = rows[row + _OFFSET], rows[row + _NBYTES]
            if rows[row + _SEEN] == 1:
                key = _pair(offset, nbytes)
                d_offset, d_nbytes = self._like_offset.get(key, 0), self._like_nbytes.get(key, 0)
            else:
                d_offset, d_nbytes = rows[row + _D_OFFSET], rows[row + _D_NBYTES]
            offset, nbytes = offset + times * d_offset, nbytes + times * d_nbytes
            if nbytes <= 0 or offset < 0:
                break
            out.append(_new_tuple(Prediction, (self._names[region], int(offset), int(nbytes))))   # (no Python frame)


# learned's history (see learned.py):
SEGMENT = 3   # loads after a context that make its "segment"
RECENT = 3    # loads that count as recent
#: a rule whose first guess was right this often lately is followed as is (a moving
#: average, with this weight for the newest guess)
TRUST_RULE = 0.9
TRUST_ALPHA = 0.2
#: a host-to-device copy smaller than this that no rule named is noise to the model (the
#: small non-swap copies between the real traffic: input ids, positions, sampling
#: parameters); it neither moves the rules' trust nor becomes context
SMALL = 8192
_LOADS = max(SEGMENT, RECENT) + 2
# the columns of _History's per-region rows: when it was last loaded (-1: never), its
# last span, the sum of its follow counts, its first follow edge + 1, the SEGMENT loads
# that followed its previous occurrence (each + 1; 0: none)
_OCCURRED = cython.declare(cython.Py_ssize_t, 0)
_LAST_OFFSET = cython.declare(cython.Py_ssize_t, 1)
_LAST_NBYTES = cython.declare(cython.Py_ssize_t, 2)
_TOTAL = cython.declare(cython.Py_ssize_t, 3)
_HEAD = cython.declare(cython.Py_ssize_t, 4)
_AFTER = cython.declare(cython.Py_ssize_t, 5)
_H_COLUMNS = cython.declare(cython.Py_ssize_t, 5 + SEGMENT)
# a follow edge: (the region that followed, how often, the next edge of the same region + 1)
_E_COLUMNS = cython.declare(cython.Py_ssize_t, 3)


@cython.ccall
@cython.locals(guesses=list)
def _noise(event, guesses) -> cython.bint:
    """A copy under SMALL bytes that no rule named."""
    if event.nbytes >= SMALL:
        return False
    for guess in guesses:
        if guess is not None and guess.region == event.region:
            return False
    return True


@cython.cclass
class _History:
    """The online statistics the learned predictor's features come from (training and
    prediction), and the rule predictors whose opinions are features too. Regions are
    small integers here (``id_of``); the methods that take and give names (``context``,
    ``candidates``, ``features``, ``ranked``) are for training and tests."""

    rules = cython.declare(tuple, visibility="public")    # (LayerwisePredictor, KVSwapPredictor)
    _layerwise = cython.declare(_LayerwiseCore)           # rules[0], called as C
    trust = cython.declare(list, visibility="public")
    t = cython.declare(cython.Py_ssize_t, visibility="public")
    events = cython.declare(cython.Py_ssize_t, visibility="public")
    _guessed = cython.declare(tuple, visibility="public")
    _loads = cython.declare(list, visibility="public")     # the last _LOADS signal loads' regions
    _ids = cython.declare(dict, visibility="public")
    _names = cython.declare(list, visibility="public")
    _rows_array = cython.declare(object)
    _rows = cython.declare(cython.longlong[:])
    _edges_array = cython.declare(object)
    _edges = cython.declare(cython.longlong[:])
    _nedges = cython.declare(cython.Py_ssize_t)
    _edge_of = cython.declare(_IntMap)     # (last, next) -> its follow edge
    _count2 = cython.declare(_IntMap)      # ((prev, last), next) -> how often next followed both
    _total2 = cython.declare(_IntMap)      # (prev, last) -> the sum of those counts

    def __init__(self, rules: tuple):
        self.rules = rules
        self._layerwise = rules[0]
        self.trust = [0.0, 0.0]   # moving average: was each rule's first guess right?
        self.t = 0
        self.events = 0              # every event observed (the rules see d2h ones too)
        self._guessed = None         # (events, the rules' first guesses then)
        self._loads, self._ids, self._names = [], {}, []
        self._rows_array = _zeros(64 * _H_COLUMNS)
        self._rows = self._rows_array
        self._edges_array = _zeros(64 * _E_COLUMNS)
        self._edges = self._edges_array
        self._nedges = 0
        self._edge_of, self._count2, self._total2 = _IntMap(), _IntMap(), _IntMap()

    # -- regions ------------------------------------------------------------------------------
    @cython.ccall
    @cython.returns(cython.longlong)
    @cython.locals(region=cython.longlong)
    def id_of(self, name):
        """The region's integer (a new one, never loaded, for a name not seen yet)."""
        region = self._ids.get(name, -1)
        if region < 0:
            region = len(self._names)
            if region * _H_COLUMNS == len(self._rows_array):
                self._rows_array = _doubled(self._rows_array)
                self._rows = self._rows_array
            self._rows[region * _H_COLUMNS + _OCCURRED] = -1
            self._ids[name] = region
            self._names.append(name)
        return region

    @cython.ccall
    @cython.locals(region=cython.longlong, row=cython.Py_ssize_t)
    def span_of(self, region) -> tuple:
        """The region's last span (offset, nbytes); (0, 1) if it was never loaded."""
        row = region * _H_COLUMNS
        if self._rows[row + _OCCURRED] < 0:
            return (0, 1)
        return (int(self._rows[row + _LAST_OFFSET]), int(self._rows[row + _LAST_NBYTES]))

    @property
    def loads(self) -> list:
        """The last loads' names, oldest first."""
        return [self._names[r] for r in self._loads]

    def context(self):
        """(The load before the last, the last load), names; None where there is none."""
        loads = self._loads
        return (self._names[loads[-2]] if len(loads) > 1 else None, self._names[loads[-1]] if loads else None)

    # -- the rules ------------------------------------------------------------------------------
    @cython.ccall
    def rule_chains(self, k) -> tuple:
        return self._layerwise.predict(k), self.rules[1].predict(k)

    @cython.ccall
    @cython.locals(chains=tuple)
    def guesses(self) -> list:
        """Each rule's first prediction now (None where it has none), asked once per
        event: training, observe() and predict() share it."""
        if self._guessed is None or self._guessed[0] != self.events:
            chains = self.rule_chains(1)
            self.remember_guesses([chains[0][0] if chains[0] else None, chains[1][0] if chains[1] else None])
        return self._guessed[1]

    @cython.ccall
    def remember_guesses(self, guesses: list):
        """The rules' first predictions, made anyway (predict's chains): observe() needs them."""
        self._guessed = (self.events, guesses)

    @staticmethod
    def noise(event: TransferEvent, guesses) -> bool:
        return _noise(event, guesses)

    # -- learning ---------------------------------------------------------------------------------
    @cython.locals(signal=cython.bint, trust=list, i=cython.Py_ssize_t)
    def observe(self, event: TransferEvent) -> None:
        signal = event.direction == "h2d"
        if signal:
            guesses = self.guesses()
            signal = not _noise(event, guesses)
        if signal:
            trust = self.trust
            for i, guess in enumerate(guesses):
                if guess is not None:  # no guess is no evidence either way
                    trust[i] += TRUST_ALPHA * ((guess.region == event.region) - trust[i])
        self._layerwise.observe(event)
        self.rules[1].observe(event)
        self.events += 1
        if signal:
            self.add(event.region, event.offset, event.nbytes)

    @cython.locals(region=cython.longlong, prev=cython.longlong, last=cython.longlong, loads=list,
                   size=cython.Py_ssize_t, edge=cython.longlong, pair=cython.longlong, key=cython.longlong,
                   rows=cython.longlong[:], edges=cython.longlong[:], owner=cython.longlong, row=cython.Py_ssize_t,
                   j=cython.Py_ssize_t, repeated=cython.bint)
    @cython.ccall
    def add(self, name, offset, nbytes):
        region = self.id_of(name)
        loads = self._loads
        size = len(loads)
        prev = loads[size - 2] if size > 1 else -1
        last = loads[size - 1] if size else -1
        if last >= 0:
            key = _key(last + 1, region)
            edge = self._edge_of.get(key, -1)
            if edge < 0:   # a new follow edge, first in its region's list
                edge = self._nedges
                self._nedges += 1
                if edge * _E_COLUMNS == len(self._edges_array):
                    self._edges_array = _doubled(self._edges_array)
                    self._edges = self._edges_array
                edges, rows = self._edges, self._rows
                edges[edge * _E_COLUMNS] = region
                edges[edge * _E_COLUMNS + 2] = rows[last * _H_COLUMNS + _HEAD]
                rows[last * _H_COLUMNS + _HEAD] = edge + 1
                self._edge_of.put(key, edge)
            self._edges[edge * _E_COLUMNS + 1] += 1
            self._rows[last * _H_COLUMNS + _TOTAL] += 1
            if prev >= 0:
                pair = _pair(prev + 1, last)
                key = _key(pair, region)
                self._count2.add(key, 1)
                self._total2.add(pair, 1)
        rows = self._rows
        # the load SEGMENT back now has its segment, unless it came again within it
        # (then that later occurrence collects one of its own)
        if size >= SEGMENT:
            owner = loads[size - SEGMENT]
            repeated = False
            for j in range(size - SEGMENT + 1, size):
                repeated = repeated or loads[j] == owner
            if not repeated:
                row = owner * _H_COLUMNS + _AFTER
                for j in range(SEGMENT - 1):
                    rows[row + j] = loads[size - SEGMENT + 1 + j] + 1
                rows[row + SEGMENT - 1] = region + 1
        row = region * _H_COLUMNS
        rows[row + _OCCURRED] = self.t
        rows[row + _LAST_OFFSET], rows[row + _LAST_NBYTES] = offset, nbytes
        loads.append(region)
        if len(loads) > _LOADS:
            del loads[0]
        self.t += 1

    # -- scoring ------------------------------------------------------------------------------------
    @cython.locals(prev=cython.longlong, last=cython.longlong, lw=cython.longlong, kv=cython.longlong,
                   n=cython.Py_ssize_t, b=cython.double, rows=cython.longlong[:], edges=cython.longlong[:],
                   lrow=cython.Py_ssize_t, n1=cython.longlong, n2=cython.longlong, pair=cython.longlong,
                   a1=cython.double, a2=cython.double, w_first=cython.double, w_segment=cython.double,
                   w_recent=cython.double, w_age=cython.double, w_lw=cython.double, w_kv=cython.double,
                   after0=cython.longlong, after1=cython.longlong, after2=cython.longlong, t=cython.longlong,
                   c=cython.longlong, count=cython.longlong, seen=cython.longlong, age=cython.double,
                   v=cython.double, best_v=cython.double, best=cython.longlong, edge=cython.longlong,
                   i=cython.Py_ssize_t, candidates=list, counts=list, scored=list, r=cython.longlong, in_recent=cython.bint)
    @cython.ccall
    def rank_ids(self, w, b, prev, last, recent: list, lw, kv, n) -> list:
        """The ``n`` best candidates (score, region), best first (equal scores: the
        greatest name first), under the model with weights ``w`` and intercept ``b``,
        after the loads ``prev`` and ``last`` (-1: none) with the ``recent`` loads and
        the rules naming ``lw`` and ``kv`` (-1: none). A score is the model's logit,
        ``b + w . features(...)`` over ``candidates(...)``, with no rows built (they cost
        more than the scoring); a test holds the two equal."""
        rows, edges = self._rows, self._edges
        lrow = last * _H_COLUMNS
        n1 = rows[lrow + _TOTAL]
        pair = _pair(prev + 1, last) if prev >= 0 else 0
        n2 = self._total2.get(pair, 0) if prev >= 0 else 0
        a1, a2 = (w[0] / n1 if n1 else 0.0), (w[1] / n2 if n2 else 0.0)
        w_first, w_segment, w_recent, w_age = w[2], w[3], w[4], w[5]
        w_lw, w_kv = w[6] + w[8] * self.trust[0], w[7] + w[9] * self.trust[1]
        # (SEGMENT is 3: the segment's loads are three locals)
        after0, after1, after2 = rows[lrow + _AFTER] - 1, rows[lrow + _AFTER + 1] - 1, rows[lrow + _AFTER + 2] - 1
        t = self.t
        best_v, best, scored = 0.0, -1, []
        # the candidates: what followed last (follow2's regions are among them), then the
        # loads of its segment and the rules' regions that did not, once each
        candidates, counts, edge = [], [], rows[lrow + _HEAD] - 1
        while edge >= 0:
            candidates.append(edges[edge * _E_COLUMNS])
            counts.append(edges[edge * _E_COLUMNS + 1])
            edge = edges[edge * _E_COLUMNS + 2] - 1
        for c in (after0, after1, after2, lw, kv):
            if c >= 0 and c not in candidates:
                candidates.append(c)
                counts.append(0)
        for i in range(len(candidates)):
            c, count = candidates[i], counts[i]
            seen = rows[c * _H_COLUMNS + _OCCURRED]
            age = 1.0 if seen < 0 else (t - seen) / 100.0   # at most 1 (no min(): a call)
            in_recent = False
            for r in recent:
                in_recent = in_recent or r == c
            v = (b + a1 * count + a2 * (self._count2.get(_key(pair, c), 0) if n2 else 0)
                 + (w_segment if c == after0 or c == after1 or c == after2 else 0.0)
                 + (w_recent if in_recent else 0.0) + w_age * (age if age < 1.0 else 1.0))
            # the features that name one candidate each
            if c == after0:
                v += w_first
            if c == lw:
                v += w_lw
            if c == kv:
                v += w_kv
            if n != 1:
                scored.append((v, self._names[c], c))
            elif best < 0 or v > best_v or (v == best_v and self._names[c] > self._names[best]):
                best_v, best = v, c
        if n == 1:
            return [(best_v, best)] if best >= 0 else []
        scored.sort(reverse=True)   # (by score, then by name: names are unique)
        return [(s[0], s[2]) for s in scored[:n]]

    # -- predicting -----------------------------------------------------------------------------------
    @cython.locals(k=cython.Py_ssize_t, horizon=cython.Py_ssize_t, width=cython.Py_ssize_t, confident=cython.double,
                   floor=cython.double, loads=list, out=list, proposed=set, j=cython.Py_ssize_t,
                   prev=cython.longlong, last=cython.longlong, lw_id=cython.longlong, kv_id=cython.longlong,
                   c=cython.longlong, z=cython.double, best=cython.Py_ssize_t, ranked=list, trust=list)
    def propose(self, k, w, b, horizon, width, confident, floor) -> list[Prediction]:
        """The learned predictor's next ``k`` loads under the model ``w``, ``b``: its
        ranking for ``horizon`` positions (up to ``width`` candidates each while the
        best one's score is under ``confident``; none under ``floor``: both logits),
        then the most trusted rule's chain."""
        loads = self._loads
        if not loads:
            return []
        prev, last = (loads[len(loads) - 2] if len(loads) > 1 else -1), loads[len(loads) - 1]
        # while a rule has been right nearly always, its own (cheap, longer) chain is the
        # answer: regular traffic needs no model (the most trusted rule, if any)
        trust = self.trust
        best = 0 if trust[0] >= trust[1] else 1
        if trust[best] >= TRUST_RULE:
            chain = self.rules[best].predict(k)
            if chain:
                return chain
        recent = loads[-RECENT:]
        lw, kv = self.rule_chains(k)
        self.remember_guesses([lw[0] if lw else None, kv[0] if kv else None])
        out, proposed = [], set()   # (proposed: names)
        for j in range(min(k, horizon)):
            lw_rule = lw[j] if j < len(lw) else None
            kv_rule = kv[j] if j < len(kv) else None
            lw_id = self.id_of(lw_rule.region) if lw_rule is not None else -1
            kv_id = self.id_of(kv_rule.region) if kv_rule is not None else -1
            ranked = self.rank_ids(w, b, prev, last, recent, lw_id, kv_id, width)
            if not ranked:
                break
            for z, c in ranked[:1 if ranked[0][0] >= confident else width]:
                name = self._names[c]
                if z >= floor and name not in proposed and len(out) < k:
                    proposed.add(name)
                    # a rule's candidate comes with its span; others repeat their last one
                    out.append(lw_rule if c == lw_id else kv_rule if c == kv_id
                               else _new_tuple(Prediction, (name, *self.span_of(c))))
            prev, last = last, ranked[0][1]
            recent = (recent + [last])[-RECENT:]
        # past the model's horizon, the most trusted rule's chain: with iv_order="window"
        # every queued candidate can still hit, and in strict order they cost only AES.
        # (Even a rule trusted less than half the time pays here: requiring trust >= 0.5
        # cost 0.7 points offline on MoE and 1.4 on mixed accelerate.)
        for p in (lw, kv)[best]:
            if len(out) >= k:
                break
            if p.region not in proposed:
                proposed.add(p.region)
                out.append(p)
        return out

    # -- the same by name (training, tests) ------------------------------------------------------------
    def _rule_ids(self, rules) -> tuple:
        return tuple(self.id_of(r.region) if r is not None else -1 for r in rules)

    def ranked(self, w, b, prev, last, recent, rules, n: int) -> list[tuple[float, str]]:
        """``rank_ids`` by name: (score, name) pairs."""
        lw, kv = self._rule_ids(rules)
        ranked = self.rank_ids(w, b, self.id_of(prev) if prev is not None else -1, self.id_of(last),
                               [self.id_of(r) for r in recent], lw, kv, n)
        return [(z, self._names[c]) for z, c in ranked]

    def _segment(self, region: int) -> list:
        """The loads that followed the region's previous occurrence (SEGMENT, or none)."""
        row = region * _H_COLUMNS + _AFTER
        return [self._rows[row + j] - 1 for j in range(SEGMENT) if self._rows[row + j] > 0]

    def _follow_counts(self, region: int) -> dict:
        """region -> how often it followed this one."""
        counts, edge = {}, self._rows[region * _H_COLUMNS + _HEAD] - 1
        while edge >= 0:
            counts[self._edges[edge * _E_COLUMNS]] = self._edges[edge * _E_COLUMNS + 1]
            edge = self._edges[edge * _E_COLUMNS + 2] - 1
        return counts

    def candidates(self, last, rules=(None, None)) -> set:
        """The names that followed ``last``, made its segment, or a rule names."""
        region = self.id_of(last)
        out = {self._names[c] for c in self._follow_counts(region)}
        out.update(self._names[c] for c in self._segment(region))
        out.update(r.region for r in rules if r is not None)
        return out

    def features(self, prev, last, candidates, recent, rules=(None, None)) -> list[list[float]]:
        """One row of the model's features per candidate (names; see learned.py)."""
        last_id = self.id_of(last)
        f1, n1 = self._follow_counts(last_id), self._rows[last_id * _H_COLUMNS + _TOTAL]
        pair = _pair(self.id_of(prev) + 1, last_id) if prev is not None else 0
        n2 = self._total2.get(pair, 0) if prev is not None else 0
        after = self._segment(last_id)
        first = after[0] if after else -1
        lw_id, kv_id = self._rule_ids(rules)
        recent_ids = {self.id_of(r) for r in recent}
        rows = []
        for name in candidates:
            c = self.id_of(name)
            seen = self._rows[c * _H_COLUMNS + _OCCURRED]
            lw = 1.0 if c == lw_id else 0.0
            kv = 1.0 if c == kv_id else 0.0
            rows.append([f1.get(c, 0) / n1 if n1 else 0.0,
                         self._count2.get(_key(pair, c), 0) / n2 if n2 else 0.0,
                         1.0 if c == first else 0.0,
                         1.0 if c in after else 0.0,
                         1.0 if c in recent_ids else 0.0,
                         1.0 if seen < 0 else min(1.0, (self.t - seen) / 100.0),
                         lw, kv, lw * self.trust[0], kv * self.trust[1]])
        return rows
