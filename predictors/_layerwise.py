"""LayerwisePredictor's hot state in compact form, compiled: region names become small
integers, sequences of them 63-bit keys into integer tables (``pipellm._ext.intmap``),
per-region facts rows of one integer array. The public predictor (``rules.py``) wraps
the core here. The ``cython`` declarations (pure-Python mode) change nothing where the
plain module runs."""

from __future__ import annotations

try:
    import cython
except ImportError:   # the plain module without Cython installed
    from . import _nocython as cython

if cython.compiled:
    from cython.cimports.pipellm._ext.intmap import IntMap, key as _key, pair as _pair
else:
    from pipellm._ext.intmap import IntMap, py_key as _key, py_pair as _pair
from pipellm._ext.intmap import doubled, int64s

from pipellm.errors import ArgumentError
from .base import Prediction, TransferEvent, _new_tuple

#: "absent" for maps whose values may be negative (steps)
_NONE = cython.declare(cython.longlong, -(1 << 62))
#: a guess packs (context's region + 1, walk's region + 1, context length) in one integer
_FIELD = cython.declare(cython.longlong, (1 << 28) - 1)
MAX_REGIONS = (1 << 28) - 2
MAX_ORDER = 64   # (the context length has 7 bits of a guess)


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
    steps are 63-bit keys into ``IntMap`` tables, a region's spans one row of an array,
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
    _next = cython.declare(IntMap)               # context -> region * 2 + kept its successor once
    _step_counts = cython.declare(IntMap)        # (steps, step) -> count * 2**24 + order first seen
    _step_distinct = cython.declare(IntMap)      # steps -> how many steps followed them
    _step_best = cython.declare(IntMap)          # steps -> the most frequent step after them
    _like_offset = cython.declare(IntMap)        # span -> change of offset that followed it
    _like_nbytes = cython.declare(IntMap)        # span -> change of size that followed it
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
        self._rows_array = int64s(64 * _COLUMNS, cython.compiled)
        self._rows = self._rows_array
        self._keys = int64s(self.order + 1, cython.compiled)
        self._walkers_array = int64s(2 * (self.order + 4), cython.compiled)
        self._walkers = self._walkers_array
        self._next, self._step_counts, self._step_distinct = IntMap(), IntMap(), IntMap()
        self._step_best, self._like_offset, self._like_nbytes = IntMap(), IntMap(), IntMap()
        self._context_score = self._walk_score = 0.5
        # the chain and the state at its end are kept while what is observed follows it
        # and nothing learned would change it (observe + predict then cost one step, not k)
        self._chain_valid = False
        self._chain_array = int64s(2 * 16, cython.compiled)
        self._chain = self._chain_array
        self._start = self._length = 0
        self._walked_array = int64s(_WALKED, cython.compiled)
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
            self._rows_array = doubled(self._rows_array)
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
    def _walkkey(self, walker):
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
        key = self._walkkey(walker)
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
                self._chain_array = doubled(self._chain_array)
            self._chain = self._chain_array
        self._chain[2 * end], self._chain[2 * end + 1] = region, guess
        self._length += 1

    @cython.locals(region=cython.longlong, changed=cython.bint, before=cython.bint, guess=cython.longlong,
                   guessed=cython.longlong, walk=cython.longlong, step=cython.longlong, key=cython.longlong,
                   counted=cython.longlong, entry=cython.longlong, best=cython.longlong, top=cython.longlong,
                   better=cython.bint, n=cython.Py_ssize_t, found=cython.longlong, nexts=IntMap,
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
            key = self._walkkey(_OBSERVED)
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
                key = self._walkkey(_TAIL)
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
