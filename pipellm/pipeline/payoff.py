"""Speculation kept only while it pays on this machine (``Pipeline(adaptive=True)``, the default).

Encrypting ahead on workers takes the AES off the requesting thread, but not for free:
the workers need cores, memory bandwidth and the GIL that the requests and (on the
emulated device) the copy engine need too, and mispredictions cost encryption thrown
away. On a host with spare cores, or where the application computes while the link is
idle, speculation wins by far; on a 2-core VM running a transfer-bound workload it can
lose to plain on-demand encryption (``pipellm replay --explain`` shows where).

The controller measures instead of guessing: requests are counted in *epochs* of
``epoch`` host-to-device requests (the first ``warmup`` epochs, while the predictor
learns, not counted), each run with speculation on or off, and each epoch's
rate (bytes requested per second of the device's clock, the application's own compute
included: the same in both) is kept per state. After an epoch the better state runs
next; the other is tried again after 1, 2, 4, ... up to ``max_interval`` epochs while the
same state keeps winning, so a workload whose phases change is re-measured, and one
where speculation wins by far loses at most 1 epoch in ``max_interval + 1`` to trying.

>>> p = Payoff(epoch=10, warmup=0)
>>> p.update(0, 0, 0.0)         # the first epoch begins (speculating)
True
>>> p.update(10, 1000, 1.0)     # speculating: 1000 bytes per second; now try without
False
>>> p.update(20, 3000, 2.0)     # without: 2000 bytes per second, better: it runs on
False
>>> p.update(30, 5000, 3.0)     # an epoch of the winner; speculation is tried again
True
>>> p.update(40, 6000, 4.0)     # it lost again (1000/s): off, and tried again later
False
"""

from __future__ import annotations


class Payoff:
    """On/off for speculation by measured request rate (see the module docstring)."""

    def __init__(self, epoch: int = 96, max_interval: int = 64, warmup: int = 1):
        self.epoch, self.max_interval = epoch, max_interval
        self._warmup = warmup  # epochs not measured: the predictor's first pass is all misses
        self.speculating = True
        self.rates: dict[bool, float | None] = {True: None, False: None}
        self.switches = 0
        self._start: tuple[int, int, float] | None = None  # (requests, bytes, clock) of this epoch
        self._interval = 1   # epochs the winner runs before the other is tried again
        self._since = 0      # epochs the winner has run since

    def update(self, requests: int, nbytes: int, now: float) -> bool:
        """Count the requests so far (``requests``, ``nbytes``) at device time ``now``;
        returns whether to speculate from here."""
        if self._start is None:
            self._start = (requests, nbytes, now)
            return self.speculating
        r0, b0, t0 = self._start
        if requests - r0 < self.epoch:
            return self.speculating
        self._start = (requests, nbytes, now)
        if self._warmup:
            self._warmup -= 1
            return self.speculating
        self.rates[self.speculating] = (nbytes - b0) / max(now - t0, 1e-9)
        on, off = self.rates[True], self.rates[False]
        if on is None or off is None:               # try each state once
            choice, self._since = not self.speculating, -1
        else:
            winner = on >= off                      # (a tie keeps speculation)
            if self._since < 0:                     # this epoch tried the state that lost before
                # it won: it runs on, tried against again soon; it lost again: tried later
                self._interval = 1 if winner == self.speculating else min(2 * self._interval, self.max_interval)
                choice, self._since = winner, 0
            elif winner != self.speculating:        # the winner's rate fell under the other's
                choice, self._since, self._interval = winner, 0, 1
            else:
                self._since += 1
                choice = winner
                if self._since >= self._interval:   # time to try the other again
                    choice, self._since = not winner, -1
        if choice != self.speculating:
            self.switches += 1
        self.speculating = choice
        return choice
