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
no code, and inference needs only this package (not scikit-learn). Where the best
candidate is uncertain, the next-best ones are proposed too: with ``iv_order="window"``
an unused candidate costs only its encryption.
"""

from __future__ import annotations

import json
import math
import os

from pipellm.errors import ArgumentError, NotFittedError

from ._history import RECENT, _History
from .base import Prediction, Predictor, TransferEvent
from .rules import KVSwapPredictor, LayerwisePredictor

FORMAT = "pipellm-learned-predictor"
VERSION = 1
#: the model shipped with pipellm, trained on the generated workloads
#: (``pipellm predictors train -o predictors/learned_model.json``)
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "learned_model.json")
FEATURES = ("p1", "p2", "last", "segment", "recent", "age", "layerwise", "kvswap", "layerwise_trust",
            "kvswap_trust")


def _logit(p: float) -> float:
    """The score a probability threshold means (scores are compared before the sigmoid)."""
    return -math.inf if p <= 0.0 else math.inf if p >= 1.0 else math.log(p / (1.0 - p))


class LearnedPredictor(Predictor):
    """A learned next-load predictor. ``model`` is the path of a model file written by
    ``pipellm predictors train`` (or :meth:`save`); ``None``: the model shipped with
    pipellm, trained on the generated workloads, unless :meth:`fit` gives one. The file is
    read when a pipeline takes the predictor (:meth:`prepare`), or at the first
    :meth:`predict` outside one.

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
        self.coef_ = self.intercept_ = None   # the fitted (or loaded) model
        self.reset()

    def prepare(self) -> None:
        """Load the model file (``model``, or the shipped one) unless fitted already;
        :class:`~pipellm.ArgumentError` if it cannot be used."""
        if self.coef_ is None:
            self.load(self.model if self.model is not None else DEFAULT_MODEL)

    def reset(self) -> None:
        self._history = _new_history()
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
            raise NotFittedError("the learned predictor has no model yet: fit() it on traces, load() a model "
                                 "file, or prepare() it (the model file it names, or the shipped one)")

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
            history = _new_history()
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

    def predict(self, k: int) -> list[Prediction]:
        if self.coef_ is None:
            self.prepare()
        thresholds = self._thresholds
        if thresholds[0] != self.confident or thresholds[1] != self.floor:   # (public: may be set anew)
            thresholds = self._thresholds = (self.confident, self.floor, _logit(self.confident), _logit(self.floor))
        return self._history.propose(k, self.coef_, self.intercept_, self.horizon, self.width, thresholds[2],
                                     thresholds[3])


def _new_history() -> _History:
    return _History((LayerwisePredictor(), KVSwapPredictor()))
