"""``experts``: mixture-of-experts offload, where each layer loads only the experts its
router picks, so the next load is one of several."""

from __future__ import annotations

import re
from collections import Counter

from pipellm.errors import ArgumentError

from .base import Prediction, Predictor, TransferEvent, _new_tuple

_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> tuple:
    """A name's natural sort key: its numbers compared as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(name))


#: an anchor is loaded in at least this share of the passes (an expert a router favoured
#: for a few tokens in a row is not one)
ANCHOR_SHARE = 0.95


class ExpertsPredictor(Predictor):
    """Predicts several candidates where the next load is one of several (a fan-out): a
    mixture-of-experts layer loads its fixed tensors (attention, router, shared experts),
    then the experts the router picked for the tokens at hand, which no rule can name
    ahead of the router. Loading every candidate ahead turns those misses into hits at
    the cost of encrypting the ones not picked: worth it where the host has cores to
    spare (a serving host's workers outpace the link), not on two.

    A *pass* starts at each load of the first region ever loaded (a decode step). A
    region loaded in nearly every pass (``ANCHOR_SHARE`` of them) is an *anchor*; the
    loads between two anchors are the first one's *group*. Predicted: the rest of the current
    group, then the next anchor and its group, and so on for up to one pass. A group's
    candidates are its ``width`` members with the highest score (each group's members
    add 1, and older scores fade by ``decay`` per group: routers favour some experts and
    a token tends to reuse the last token's), in the order their loads came before (a
    before b and b before c: a before c; never seen together: by name, numbers as
    numbers, as stacks load a router's experts in index order), those before what the
    group has loaded already left out. A dense model (every region an anchor) gets the order of
    its last pass.

    >>> p = ExpertsPredictor(width=3)
    >>> picks = [(1, 2), (0, 3), (1, 2), (1, 3)]        # the router's choice, per token
    >>> for chosen in picks:
    ...     for region in ["attn"] + [f"expert{e}" for e in chosen] + ["head"]:
    ...         p.observe(TransferEvent(region, 0, 64))
    >>> p.observe(TransferEvent("attn", 0, 64))
    >>> [x.region for x in p.predict(8)]               # the candidates, in load order
    ['expert1', 'expert2', 'expert3', 'head']
    >>> p.observe(TransferEvent("expert2", 0, 64))
    >>> [x.region for x in p.predict(8)]
    ['expert3', 'head']
    """

    name = "experts"
    uses_d2h = False

    def __init__(self, width: int = 4, decay: float = 0.6):
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ArgumentError(f"width must be a positive integer (candidates per group), got {width!r}")
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
            raise ArgumentError(f"decay must be a number from 0 to 1 (what an older score keeps per group), "
                                f"got {decay!r}")
        self.width, self.decay = width, float(decay)
        self.reset()

    def reset(self) -> None:
        self._first: str | None = None       # a pass starts at each of its loads
        self._passes = 0
        self._order: dict[str, int] = {}      # region -> first-seen position
        self._loads: dict[str, int] = {}      # region -> passes it was loaded in
        self._last_pass: dict[str, int] = {}
        self._span: dict[str, tuple[int, int]] = {}            # region -> (offset, nbytes) last loaded
        self._next_anchor: dict[str, str] = {}                 # anchor -> the anchor after its group
        self._scores: dict[str, dict[str, float]] = {}         # anchor -> member -> score
        self._ranked: dict[str, list[str]] = {}                # anchor -> its candidates, in load order
        self._before: Counter = Counter()                      # (a, b): a loaded before b in a group
        self._anchor: str | None = None                        # the group being loaded
        self._group: list[str] = []                            # its members so far, in order

    def _is_anchor(self, region: str) -> bool:
        return self._loads[region] >= ANCHOR_SHARE * self._passes

    def observe(self, event: TransferEvent) -> None:
        if event.direction != "h2d":
            return
        region = event.region
        if self._first is None:
            self._first = region
        if region == self._first:
            self._passes += 1
        if region not in self._order:
            self._order[region] = len(self._order)
        if self._last_pass.get(region) != self._passes:
            self._last_pass[region] = self._passes
            self._loads[region] = self._loads.get(region, 0) + 1
        self._span[region] = (event.offset, event.nbytes)
        if not self._is_anchor(region):
            if region not in self._group:
                self._group.append(region)
            return
        if self._anchor is not None:
            self._close_group()
            self._next_anchor[self._anchor] = region
        self._anchor, self._group = region, []

    def _close_group(self) -> None:
        anchor, group = self._anchor, self._group
        scores = self._scores.setdefault(anchor, {})
        for member in scores:
            scores[member] *= self.decay
        for i, member in enumerate(group):
            scores[member] = scores.get(member, 0.0) + 1.0
            for later in group[i + 1:]:
                self._before[member, later] += 1
        # its candidates: the best ``width``, in load order (until the group comes again)
        best = sorted(scores, key=lambda m: (-scores[m], -self._last_pass[m], self._order[m]))[:self.width]
        self._ranked[anchor] = self._in_load_order(best)

    def _precedes(self, a: str, b: str) -> bool:
        """Whether ``a`` loads before ``b``: as they came in groups where both were
        loaded, else by their names' natural order (expert 2 before expert 10)."""
        ab, ba = self._before[a, b], self._before[b, a]
        return ab > ba if ab != ba else _natural(a) < _natural(b)

    def _in_load_order(self, members: list[str]) -> list[str]:
        """``members`` ordered by what was seen (a before b, b before c: a before c),
        the rest by name."""
        n, before = len(members), self._before
        earlier = [[before[a, b] > before[b, a] for b in members] for a in members]  # [i][j]: i before j
        for k in range(n):  # the transitive closure (a group holds a few members)
            for i in range(n):
                if earlier[i][k]:
                    for j in range(n):
                        earlier[i][j] = earlier[i][j] or earlier[k][j]
        ahead = {m: sum(earlier[j][i] for j in range(n)) for i, m in enumerate(members)}  # members before m
        return sorted(members, key=lambda m: (ahead[m], _natural(m)))

    def _rest_of_group(self) -> list[str]:
        """The current group's candidates still to come: not loaded, and after the last
        one loaded."""
        loaded, ranked = self._group, self._ranked.get(self._anchor, [])
        if not loaded:
            return list(ranked)
        last = loaded[-1]
        if last in ranked:
            return [m for m in ranked[ranked.index(last) + 1:] if m not in loaded]
        return [m for m in ranked if m not in loaded and self._precedes(last, m)]

    def predict(self, k: int) -> list[Prediction]:
        if self._anchor is None:
            return []
        out = self._rest_of_group()
        seen, anchor = {self._anchor}, self._next_anchor.get(self._anchor)
        while anchor is not None and anchor not in seen and len(out) < k:  # up to one pass ahead
            seen.add(anchor)
            out.append(anchor)
            out.extend(self._ranked.get(anchor, ()))
            anchor = self._next_anchor.get(anchor)
        return [_new_tuple(Prediction, (region, *self._span[region])) for region in out[:k]]
