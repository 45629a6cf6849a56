"""A union of time intervals, asked how much of a span it covers (for the replay's
explanation: stall inside a wait, link time inside a wait, and so on).

>>> u = Union([(0, 2), (1, 3), (5, 6)])
>>> u.total, u.overlap(2.5, 5.5), u.before(10)
(4.0, 1.0, 4.0)
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate


class Union:
    """The union of ``(start, end)`` intervals (any order, overlapping or not)."""

    def __init__(self, intervals):
        merged: list[list[float]] = []
        for a, b in sorted(intervals):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]
        self._cum = [0.0, *accumulate(b - a for a, b in merged)]
        self.total = float(self._cum[-1])

    def before(self, t: float) -> float:
        """How much of the union lies before ``t``."""
        i = bisect_right(self.starts, t)  # intervals starting at or before t
        if i == 0:
            return 0.0
        return float(self._cum[i - 1] + min(t, self.ends[i - 1]) - self.starts[i - 1])

    def overlap(self, a: float, b: float) -> float:
        """How much of ``[a, b)`` the union covers."""
        return max(0.0, self.before(b) - self.before(a)) if b > a else 0.0

    def __iter__(self):
        return iter(zip(self.starts, self.ends))
