# cython: language_level=3
"""Device work in C: :class:`Op`, the completion handle of one piece of device work,
and :class:`Submitter`, which puts ops in order on their stream and hands them to a
copy engine.

``devices/engine.py`` (the copy-engine devices, emulated and cuda) derives from
:class:`Submitter`; every transfer's request path goes through it, so an op and its
submission are in C (in Python they were a large share of a speculative hit's cost on
the requesting thread: ``pipellm bench hotpath``, figures in docs/figures.md).
"""

from collections import deque
from queue import SimpleQueue

from pipellm import _fork
from pipellm.devices._clock cimport DeviceClock
from pipellm._ext.locks cimport Lock
from pipellm.channel._message cimport Message
from pipellm.channel.protocol import TAG_BYTES as _TAG_BYTES
from pipellm.errors import ArgumentTypeError, TransferTimeoutError, UnknownSessionError

cdef Py_ssize_t TAG_BYTES = _TAG_BYTES
cdef dict _FORK = vars(_fork)  # (its live ``generation``, read without a module lookup)


cdef bint _forked_since(generation) except -1:
    """``generation != _fork.generation``: what was made at ``generation`` was made
    before an ``os.fork()`` of this process (read in C on every request)."""
    return generation != _FORK["generation"]
cdef Py_ssize_t PRUNE_ABOVE = 64  # a stream's pending ops before finished ones are dropped


cdef inline double _now_of(device) except? -1:
    """``device.now()``, in C for the devices of ours (every op reads it)."""
    return (<Submitter>device).now() if isinstance(device, Submitter) else device.now()


cdef class Stream:
    """An ordered queue of device work. Work on one stream completes in order; work on
    different streams may overlap. Comes from :meth:`Device.create_stream`. (Its fields
    are declared in ``_submission.pxd``: every submission reads them in C.)"""

    def __init__(self, device, Py_ssize_t id):
        self.device, self.id = device, id
        self._last = None
        self._pending = deque()
        self._lock = Lock()

    def synchronize(self, timeout: float | None = None) -> None:
        self.device.synchronize(self, timeout=timeout)

    def __repr__(self) -> str:
        return f"<Stream {self.id} on {self.device.kind}>"


cdef class SessionBase:
    """The fields of a device's end of a channel (``devices/engine.py``'s ``Session``)
    that every submission and request reads, in C."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is SessionBase:
            raise ArgumentTypeError("SessionBase is the C base of a device's end of a channel: Device.open_session makes it")

    def __init__(self):
        self.pending = set()
        self.failure = None


cdef class Op(Fence):
    """Completion handle of one piece of device work (a message, a copy, a compute).

    It is *done* once the device has really finished it (or failed it) and the modelled
    hardware time of it has passed. ``error`` is set when it failed. (Its fields are
    declared in ``_submission.pxd``; ``finished`` in ``Fence``'s.)
    """

    def __init__(self, device, kind: str, stream, Py_ssize_t nbytes=0, session=None, tuple args=(),
                 on_delivered=None):
        self._set(device, kind, stream, nbytes, session, args, on_delivered)

    cdef _set(self, device, kind, stream, Py_ssize_t nbytes, session, tuple args, on_delivered):
        self.device, self.kind, self.stream, self.nbytes = device, kind, stream, nbytes
        self.session, self.args, self.on_delivered = session, args, on_delivered
        self.submit_t = _now_of(device)
        self.remaining = 1

    cpdef bint done(self) except -1:
        """Finished, and its modelled time has passed. (In C: a bounce pool asks it of
        every sent slot's op before reusing the slot.)"""
        return self.finished and _now_of(self.device) >= self.end

    def wait_done(self, timeout=None) -> bool:
        """Block until done; False on timeout. Never raises the op's own error."""
        return self.device._wait_op(self, timeout)

    def wait(self, timeout=None) -> None:
        """Block until done; raise the op's error, or :class:`TransferTimeoutError`."""
        if not self.wait_done(timeout):
            raise TransferTimeoutError(
                f"{self.kind} of {self.nbytes} bytes on stream {self.stream.id} did not complete "
                f"within {timeout} s (a message lost on the link, or the device is stalled)")
        if self.error is not None:
            raise self.error

    def __repr__(self) -> str:
        state = "failed" if self.error else ("done" if self.finished else "pending")
        return f"<Op {self.kind} {self.nbytes}B stream={self.stream.id} {state}>"


cdef class Submitter:
    """Orders submitted ops: numbered (``_seq``, under ``_submit_lock``), chained on their
    stream, queued for the copy engine (``_queue``; ``_put``, its put bound once); the
    device's end of each session (``_sessions``) and its ``clock``. ``_closed``,
    ``failure`` and ``_fork_generation`` are the ``Device``'s, initialised there and
    stored here so that a submission reads them in C."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is Submitter:
            raise ArgumentTypeError("Submitter is the C base of the copy-engine devices: use pipellm.open_device")
        self.clock = DeviceClock()

    def __init__(self):
        self._queue = SimpleQueue()
        self._put = self._queue.put
        self._submit_lock = Lock()
        self._sessions, self._seq = {}, 0

    cpdef double now(self) except? -1:
        """The device's clock (seconds), on which ``Op.end`` times are given: wall time
        less the emulation stall (see ``_clock.pyx``). (In C: every op reads it, and a
        pool reaping slots reads it once per finished op.)"""
        return self.clock.now()

    cpdef double frozen_s(self) except? -1:
        """Seconds the device clock has stood still so far (the emulated device's
        emulation stall, the current one included; 0 on real hardware)."""
        return self.clock.frozen_s()

    cpdef Op _submit(self, Op op):
        if self._closed or self.failure is not None or _forked_since(self._fork_generation):
            self._check_open()  # (Device's, which raises the error that fits)
        cdef Stream stream = op.stream
        self._submit_lock.enter()
        try:
            self._seq += 1
            op.seq = self._seq
            op.prev, stream._last = stream._last, op
            pending = stream._pending
            pending.append(op)
            if op.session is not None:
                (<SessionBase?>op.session).pending.add(op)
            self._put(op)
        finally:
            self._submit_lock.exit()
        if len(pending) > PRUNE_ABOVE and stream._lock.try_enter():  # drop finished ops
            try:
                now = self.now()
                while len(pending) > 1:
                    head = <Op>pending[0]
                    if not (head.finished and head.end <= now and head.error is None):
                        break
                    pending.popleft()
            finally:
                stream._lock.exit()
        return op

    cpdef _session(self, session):
        s = self._sessions.get(session)
        if s is None:
            raise UnknownSessionError(f"no open session {session} on this device")
        return s

    cpdef Op submit_messages(self, stream, session, msgs):
        """Send sealed host-to-device messages, in order (payloads sit in bounce slots);
        the op is done when all of them landed."""
        cdef Py_ssize_t nbytes = 0
        cdef Op op
        cdef Message msg
        s = self._session(session)
        for msg in msgs:
            nbytes += len(msg.payload) - TAG_BYTES
        op = Op.__new__(Op)  # (without __init__'s argument parsing)
        op._set(self, "h2d message", stream, nbytes, s, (msgs,), None)
        op.remaining = len(msgs)
        for msg in msgs:
            msg._owner = op
        return self._submit(op)
