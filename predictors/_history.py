"""The learned predictor's history (``learned.py``) in compact form, compiled: the online
statistics its features come from, regions as small integers, follow counts in integer
tables (``pipellm._ext.intmap``) and rows of one integer array. The ``cython``
declarations (pure-Python mode) change nothing where the plain module runs."""

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

from .base import Prediction, TransferEvent, _new_tuple

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
    _layerwise = cython.declare(object)                  # rules[0]
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
    _edge_of = cython.declare(IntMap)     # (last, next) -> its follow edge
    _count2 = cython.declare(IntMap)      # ((prev, last), next) -> how often next followed both
    _total2 = cython.declare(IntMap)      # (prev, last) -> the sum of those counts

    def __init__(self, rules: tuple):
        self.rules = rules
        self._layerwise = rules[0]
        self.trust = [0.0, 0.0]   # moving average: was each rule's first guess right?
        self.t = 0
        self.events = 0              # every event observed (the rules see d2h ones too)
        self._guessed = None         # (events, the rules' first guesses then)
        self._loads, self._ids, self._names = [], {}, []
        self._rows_array = int64s(64 * _H_COLUMNS, cython.compiled)
        self._rows = self._rows_array
        self._edges_array = int64s(64 * _E_COLUMNS, cython.compiled)
        self._edges = self._edges_array
        self._nedges = 0
        self._edge_of, self._count2, self._total2 = IntMap(), IntMap(), IntMap()

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
                self._rows_array = doubled(self._rows_array)
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
                    self._edges_array = doubled(self._edges_array)
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
