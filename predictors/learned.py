"""``learned``: a scikit-learn model over the recent history, for data-dependent traffic
(mixture-of-experts offload) that fixed rules cannot follow.

Prediction is candidate ranking. Candidates for the next load are the regions that
followed the current context before; each is described by a few features of the recent
history, and a logistic-regression model (trained offline on traces with
``pipellm predictors train``) scores how likely it is next:

- ``p1``: how often it followed the last load, ``p2``: the last two loads;
- ``last``: it followed the last load's previous occurrence;
- ``segment``: it was among the loads that followed the last load's previous occurrence
  (for a mixture of experts: the experts this layer used for the previous token);
- ``recent``: it was loaded within the last few loads (experts are not loaded twice);
- ``age``: how long ago it was loaded;
- ``layerwise``, ``kvswap``: the rule predictors name it for this position (their
  candidates are ranked too, with their spans); ``*_trust``: the same, weighted by how
  often that rule's first guess was right lately, so the model learns when to trust the
  rules (regular traffic) and when the history knows better (experts).

The model file holds the feature names and the fitted weights as JSON: loading it runs
no code, and inference needs only this module (not scikit-learn). Where the best
candidate is uncertain, the next-best ones are proposed too: with ``iv_order="window"``
an unused candidate costs only its encryption.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque

try:
    import cython
except ImportError:   # the plain module without Cython installed
    from . import _nocython as cython

from pipellm.errors import ArgumentError

from .base import Prediction, Predictor, TransferEvent
from .rules import KVSwapPredictor, LayerwisePredictor

FORMAT = "pipellm-learned-predictor"
VERSION = 1
FEATURES = ("p1", "p2", "last", "segment", "recent", "age", "layerwise", "kvswap", "layerwise_trust",
            "kvswap_trust")
SEGMENT = 3   # loads after a context that make its "segment"
RECENT = 3
#: a rule whose first guess was right this often lately is followed as is (moving
#: average with this weight for the newest guess)
TRUST_RULE = 0.9
TRUST_ALPHA = 0.2
#: a host-to-device copy smaller than this that no rule named is noise to the model (the
#: small non-swap copies between the real traffic: input ids, positions, sampling
#: parameters); it neither moves the rules' trust nor becomes context
SMALL = 8192


def _logit(p: float) -> float:
    """The score a probability threshold means (scores are compared before the sigmoid)."""
    return -math.inf if p <= 0.0 else math.inf if p >= 1.0 else math.log(p / (1.0 - p))


class NotFittedError(ArgumentError, AttributeError):
    """The learned predictor has no model: fit() it or load() one."""


@cython.cclass
class _History:
    """The online statistics both training and prediction compute features from, and the
    rule predictors whose opinions are features too. Compiled, an extension type (its
    state in C fields); the ``cython`` declarations change nothing in the plain module."""

    rules = cython.declare(tuple, visibility="public")    # (LayerwisePredictor, KVSwapPredictor)
    trust = cython.declare(list, visibility="public")
    t = cython.declare(cython.Py_ssize_t, visibility="public")
    events = cython.declare(cython.Py_ssize_t, visibility="public")
    _guessed = cython.declare(tuple, visibility="public")
    loads = cython.declare(object, visibility="public")   # deque
    follow1 = cython.declare(dict, visibility="public")
    follow2 = cython.declare(dict, visibility="public")
    total1 = cython.declare(dict, visibility="public")
    total2 = cython.declare(dict, visibility="public")
    after = cython.declare(dict, visibility="public")
    occurrence = cython.declare(dict, visibility="public")
    span = cython.declare(dict, visibility="public")

    def __init__(self):
        self.rules = (LayerwisePredictor(), KVSwapPredictor())
        self.trust = [0.0, 0.0]   # moving average: was each rule's first guess right?
        self.t = 0
        self.events = 0              # every event observed (the rules see d2h ones too)
        self._guessed = None         # (events, the rules' first guesses then)
        self.loads: deque = deque(maxlen=max(SEGMENT, RECENT) + 2)
        self.follow1: dict = {}      # last -> {next: count}
        self.follow2: dict = {}      # (prev, last) -> {next: count}
        self.total1: dict = {}       # last -> sum of its follow1 counts
        self.total2: dict = {}       # (prev, last) -> sum of its follow2 counts
        self.after: dict = {}        # region -> the loads that followed its previous occurrence
        self.occurrence: dict = {}   # region -> t of its last occurrence
        self.span: dict = {}         # region -> (offset, nbytes)

    def context(self):
        loads = self.loads
        return (loads[-2] if len(loads) > 1 else None, loads[-1] if loads else None)

    def candidates(self, last, rules=(None, None)) -> set:
        out = set(self.follow1.get(last, ()))   # (follow2's regions are among these)
        out.update(self.after.get(last, ()))
        out.update(r.region for r in rules if r is not None)
        return out

    def rule_chains(self, k: int) -> tuple[list, list]:
        return self.rules[0].predict(k), self.rules[1].predict(k)

    def guesses(self) -> list:
        """Each rule's first prediction now (None where it has none), asked once per
        event: training, observe() and predict() share it."""
        if self._guessed is None or self._guessed[0] != self.events:
            self.remember_guesses([next(iter(rule.predict(1)), None) for rule in self.rules])
        return self._guessed[1]

    def remember_guesses(self, guesses: list) -> None:
        """The rules' first predictions, made anyway (predict's chains): observe() needs them."""
        self._guessed = (self.events, guesses)

    @staticmethod
    def noise(event: TransferEvent, guesses) -> bool:
        return event.nbytes < SMALL and not any(g is not None and g.region == event.region for g in guesses)

    @cython.locals(signal=cython.bint, trust=list, i=cython.Py_ssize_t)
    def observe(self, event: TransferEvent) -> None:
        signal = event.direction == "h2d"
        if signal:
            guesses = self.guesses()
            signal = not self.noise(event, guesses)
        if signal:
            trust = self.trust
            for i, guess in enumerate(guesses):
                if guess is not None:  # no guess is no evidence either way
                    trust[i] += TRUST_ALPHA * ((guess.region == event.region) - trust[i])
        for rule in self.rules:
            rule.observe(event)
        self.events += 1
        if signal:
            self.add(event.region, event.offset, event.nbytes)

    def features(self, prev, last, candidates, recent, rules=(None, None)) -> list[list[float]]:
        """One row of FEATURES per candidate (what the context says is computed once)."""
        f1 = self.follow1.get(last, {})
        n1 = self.total1.get(last, 0)
        f2 = self.follow2.get((prev, last), {})
        n2 = self.total2.get((prev, last), 0)
        after = self.after.get(last, ())
        first = after[0] if after else None
        lw_region = rules[0].region if rules[0] is not None else None
        kv_region = rules[1].region if rules[1] is not None else None
        lw_trust, kv_trust = self.trust
        t, occurrence = self.t, self.occurrence
        rows = []
        for c in candidates:
            seen = occurrence.get(c)
            lw = 1.0 if c == lw_region else 0.0
            kv = 1.0 if c == kv_region else 0.0
            rows.append([f1.get(c, 0) / n1 if n1 else 0.0,
                         f2.get(c, 0) / n2 if n2 else 0.0,
                         1.0 if c == first else 0.0,
                         1.0 if c in after else 0.0,
                         1.0 if c in recent else 0.0,
                         1.0 if seen is None else min(1.0, (t - seen) / 100.0),
                         lw, kv, lw * lw_trust, kv * kv_trust])
        return rows

    @cython.locals(f=dict, total=dict, followers=list)
    def add(self, region: str, offset: int, nbytes: int) -> None:
        loads = self.loads
        prev, last = self.context()
        if last is not None:
            f = self.follow1.setdefault(last, {})
            f[region] = f.get(region, 0) + 1
            total = self.total1
            total[last] = total.get(last, 0) + 1
            if prev is not None:
                pair = (prev, last)
                f = self.follow2.setdefault(pair, {})
                f[region] = f.get(region, 0) + 1
                total = self.total2
                total[pair] = total.get(pair, 0) + 1
        # the load SEGMENT back now has its segment, unless it came again within it
        # (then that later occurrence collects one of its own)
        if len(loads) >= SEGMENT:
            followers = [loads[i] for i in range(1 - SEGMENT, 0)]
            owner = loads[-SEGMENT]
            if owner not in followers:
                followers.append(region)
                self.after[owner] = followers
        self.occurrence[region] = self.t
        self.span[region] = (offset, nbytes)
        loads.append(region)
        self.t += 1

    @cython.locals(b=cython.double, n1=cython.Py_ssize_t, n2=cython.Py_ssize_t, f1=dict, f2=dict,
                   a1=cython.double, a2=cython.double, w_segment=cython.double, w_recent=cython.double,
                   w_age=cython.double, t=cython.Py_ssize_t, occurrence=dict, scored=list, extra=list,
                   age=cython.double, v=cython.double)
    def ranked(self, w, b, prev, last, recent, rules, n: int) -> list[tuple[float, str]]:
        """The ``n`` best candidates (score, region), best first (equal scores: the
        greatest name first), under the model with weights ``w`` and intercept ``b``. A
        score is the model's logit, the same as ``b + w . features(...)`` over the
        candidates of ``candidates`` but with no rows built (they cost more than the
        scoring); a test holds the two equal."""
        n1, n2 = self.total1.get(last, 0), self.total2.get((prev, last), 0)
        f1 = self.follow1.get(last, {}) if n1 else {}
        f2 = self.follow2.get((prev, last), {}) if n2 else {}
        a1, a2 = (w[0] / n1 if n1 else 0.0), (w[1] / n2 if n2 else 0.0)
        after = self.after.get(last, ())
        first = after[0] if after else None
        lw = rules[0].region if rules[0] is not None else None
        kv = rules[1].region if rules[1] is not None else None
        w_segment, w_recent, w_age = w[3], w[4], w[5]
        t, occurrence = self.t, self.occurrence
        scored, extra = [], []   # (score, region); candidates not in f1, once each
        # (what followed (prev, last) followed last too: follow2's regions are follow1's)
        for source in (f1, after, (lw, kv)):
            for c in source:
                if source is not f1:
                    if c is None or c in f1 or c in extra:
                        continue
                    extra.append(c)
                seen = occurrence.get(c)
                age = 1.0 if seen is None else (t - seen) / 100.0   # at most 1 (no min(): a call)
                v = (b + a1 * f1.get(c, 0) + a2 * f2.get(c, 0)
                     + (w_segment if c in after else 0.0) + (w_recent if c in recent else 0.0)
                     + w_age * (age if age < 1.0 else 1.0))
                # the features that name one candidate each
                if c == first:
                    v += w[2]
                if c == lw:
                    v += w[6] + w[8] * self.trust[0]
                if c == kv:
                    v += w[7] + w[9] * self.trust[1]
                scored.append((v, c))
        if n == 1:   # (tuples compare by score, then by name)
            return [max(scored)] if scored else []
        return sorted(scored, reverse=True)[:n]


class LearnedPredictor(Predictor):
    """A learned next-load predictor. ``model`` is the path of a model file written by
    ``pipellm predictors train`` (or :meth:`save`); without one, call :meth:`fit`.

    ``width``: at most that many candidates per position, while the best one's
    probability is below ``confident`` (1: only the best; more pays only with
    ``iv_order="window"``, where an unused candidate costs just its encryption);
    candidates under ``floor`` are never proposed.
    """

    name = "learned"

    def __init__(self, model: str | None = None, horizon: int = 2, width: int = 1, confident: float = 0.8,
                 floor: float = 0.15):
        self.model, self.horizon, self.width = model, horizon, width
        self.confident, self.floor = confident, floor
        self.coef_ = self.intercept_ = None
        if model is not None:
            self.load(model)
        self.reset()

    def reset(self) -> None:
        self._history = _History()
        self._thresholds = (None, None, 0.0, 0.0)   # confident, floor, and their logits

    # -- model files -----------------------------------------------------------------------
    def load(self, path) -> LearnedPredictor:
        try:
            with open(os.fspath(path), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text at all
            raise ArgumentError(f"cannot read a learned-predictor model from {os.fspath(path)}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ArgumentError(f"{os.fspath(path)} is not a {FORMAT} version {VERSION} file")
        coef, intercept = data.get("coef"), data.get("intercept")
        if data.get("features") != list(FEATURES) or not isinstance(coef, list) or len(coef) != len(FEATURES) \
                or not all(isinstance(c, (int, float)) for c in coef + [intercept]):
            raise ArgumentError(f"{os.fspath(path)}: the model's features or weights are malformed")
        self.coef_, self.intercept_ = [float(c) for c in coef], float(intercept)
        return self

    def save(self, path) -> None:
        self._check_fitted()
        with open(os.fspath(path), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "features": list(FEATURES), "coef": self.coef_,
                       "intercept": self.intercept_}, f, indent=1)

    def _check_fitted(self):
        if self.coef_ is None:
            raise NotFittedError("the learned predictor has no model: fit() it on traces or load() a model file")

    # -- training ---------------------------------------------------------------------------
    def fit(self, traces) -> LearnedPredictor:
        """Fit on traces (``pipellm.traces.Trace`` objects). Needs scikit-learn."""
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as exc:
            raise ImportError("training the learned predictor needs scikit-learn: "
                              "pip install 'pipellm[learned]'") from exc
        X, y = [], []
        for trace in traces:
            history = _History()
            for r in trace.records:
                if r.op not in ("h2d", "d2h"):
                    continue
                prev, last = history.context()
                event = TransferEvent(r.region, r.offset, r.nbytes, r.op)
                if r.op == "h2d":
                    rules = history.guesses()
                    if last is not None and not history.noise(event, rules):
                        recent = set(list(history.loads)[-RECENT:])
                        candidates = list(history.candidates(last, rules))
                        X += history.features(prev, last, candidates, recent, rules)
                        y += [1 if c == r.region else 0 for c in candidates]
                history.observe(event)
        if not X or len(set(y)) < 2:
            raise ArgumentError("the traces give nothing to learn from (too short, or no choice ever to make)")
        model = LogisticRegression(max_iter=1000).fit(X, y)
        self.coef_ = [float(c) for c in model.coef_[0]]
        self.intercept_ = float(model.intercept_[0])
        return self

    # -- predicting ----------------------------------------------------------------------------
    def observe(self, event: TransferEvent) -> None:
        self._history.observe(event)

    @cython.locals(h=_History, out=list, proposed=set, j=cython.Py_ssize_t)
    def predict(self, k: int) -> list[Prediction]:
        self._check_fitted()
        h = self._history
        prev, last = h.context()
        if last is None:
            return []
        # while a rule has been right nearly always, its own (cheap, longer) chain is the
        # answer: regular traffic needs no model (the most trusted rule, if any)
        trust = h.trust
        best = 0 if trust[0] >= trust[1] else 1
        if trust[best] >= TRUST_RULE:
            chain = h.rules[best].predict(k)
            if chain:
                return chain
        recent = list(h.loads)[-RECENT:]
        steps = min(k, self.horizon)
        lw, kv = h.rule_chains(k)
        h.remember_guesses([lw[0] if lw else None, kv[0] if kv else None])
        out, proposed = [], set()
        thresholds = self._thresholds
        if thresholds[0] != self.confident or thresholds[1] != self.floor:   # (public: may be set anew)
            thresholds = self._thresholds = (self.confident, self.floor, _logit(self.confident), _logit(self.floor))
        confident, floor = thresholds[2], thresholds[3]   # scores are logits
        for j in range(steps):
            rules = (lw[j] if j < len(lw) else None, kv[j] if j < len(kv) else None)
            ranked = h.ranked(self.coef_, self.intercept_, prev, last, recent, rules, self.width)   # (3 loads: a list is as quick as a set)
            if not ranked:
                break
            for z, c in ranked[:1 if ranked[0][0] >= confident else self.width]:
                if z >= floor and c not in proposed and len(out) < k:
                    proposed.add(c)
                    # a rule's candidate comes with its span; others repeat their last one
                    named = [r for r in rules if r is not None and r.region == c]
                    out.append(named[0] if named else Prediction(c, *h.span.get(c, (0, 1))))
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
