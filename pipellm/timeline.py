"""A timeline of where a run's time goes, for ``pipellm replay --explain``.

Off by default. The datapath's hooks check :data:`recording` (one attribute read) and,
while it is on, append a *span* ``(thread, kind, start, end, cpu)``: ``start``/``end``
on ``time.perf_counter``'s clock, ``cpu`` the thread's CPU seconds inside the span where
the hook measures it (else 0), ``thread`` the :func:`threading.get_ident` of the thread
that did the work, or :data:`MODEL` for spans on the emulated device's modelled clock
(link and compute bookings, which no thread runs).

Kinds: ``encrypt`` / ``decrypt`` (AES-GCM, any thread), ``wait-worker`` (a request
waiting for a worker's chunk), ``wait-receive`` (waiting for another thread to finish
receiving device-to-host chunks), ``predictor``, ``wait-device`` (a host thread waiting for
a device op or a bounce slot's DMA), ``stall`` (the emulated clock standing still),
``device:<op kind>`` (the copy engine handling an op), ``task:<what>`` (a worker's task),
``gated`` (a worker held at the emulated device's gate), ``link-h2d`` / ``link-d2h`` /
``compute`` (modelled bookings). Tools add their own (the replayer: ``app:<record op>``
and ``held`` for its bookkeeping).

>>> from pipellm import timeline
>>> with timeline.recorded() as spans:
...     timeline.span("encrypt", 1.0, 1.5)
>>> [s[1:4] for s in spans]
[('encrypt', 1.0, 1.5)]
>>> timeline.recording
False
"""

from __future__ import annotations

from contextlib import contextmanager
from threading import get_ident

from .errors import UsageError

#: the thread field of spans on the emulated device's modelled clock
MODEL = 0

#: hooks record only while this is True (see :func:`recorded`)
recording = False
_spans: list = []


def span(kind: str, start: float, end: float, cpu: float = 0.0) -> None:
    """Record one span of the calling thread (list.append: safe from any thread)."""
    _spans.append((get_ident(), kind, start, end, cpu))


def model_span(kind: str, start: float, end: float) -> None:
    """Record a booking on the emulated device's modelled clock."""
    _spans.append((MODEL, kind, start, end, 0.0))


@contextmanager
def recorded():
    """Record spans inside the block; yields the list they go to (one recording at a time)."""
    global recording, _spans
    if recording:
        raise UsageError("a timeline is already being recorded: one recording at a time")
    _spans = out = []
    recording = True
    try:
        yield out
    finally:
        recording = False
        _spans = []
