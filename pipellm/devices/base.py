"""The small interface the pipeline sees of a device, and the objects it hands out.

A device allocates memory (:class:`DeviceBuffer`), orders work on streams
(:class:`Stream`), takes ciphertext messages and plain copies, runs (modelled) compute,
and reports completion through :class:`Op` handles. It knows nothing of predictors or
speculation. ``emulated`` and ``cuda`` both implement :class:`Device`.
"""

from __future__ import annotations

import abc
import contextlib
import threading

import numpy as np

from .. import _fork
from ._clock import DeviceClock
from ._submission import Op, Stream  # (C: made and submitted on every transfer's request path)
from ..errors import ArgumentError, ArgumentTypeError, ChannelClosedError, DeviceError, TransferTimeoutError


#: ``synchronize(session=...)``'s default: raise any error, whoever's work it was
ANY_SESSION = object()


def _owned(op, session) -> bool:
    """``op`` is ``session``'s work (None: work outside any channel)."""
    return op.session is None if session is None else (op.session is not None and op.session.id == session)


class DeviceBuffer:
    """A block of device memory. Comes from :meth:`Device.alloc`.

    ``dtype`` and ``shape`` are what :meth:`Device.read` gives back by default (the
    pipeline records those of the host array it mirrors).
    """

    __slots__ = ("device", "id", "nbytes", "dtype", "shape", "freed", "__weakref__")

    def __init__(self, device: Device, id: int, nbytes: int, dtype=np.uint8, shape=None):
        self.device, self.id, self.nbytes = device, id, nbytes
        self.dtype = np.dtype(dtype)
        self.shape = shape if shape is not None else (nbytes // self.dtype.itemsize,)
        self.freed = False

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        return f"<DeviceBuffer {self.id} {self.nbytes}B on {self.device.kind}{state}>"


class Device(abc.ABC):
    """What every device offers the pipeline. Use :func:`pipellm.open_device`."""

    kind: str = "?"
    #: the largest message (ciphertext and tag) it takes in one piece, or None: no limit
    #: (the pipeline refuses a chunk size above it)
    max_message_bytes: int | None = None

    def __init__(self) -> None:
        self._fork_generation = _fork.generation
        self._closed = False
        #: the error the device failed with for good, if any: like a CUDA context after an
        #: uncorrectable error, a failed device refuses all later work (close() excepted)
        self.failure: DeviceError | None = None
        self._buffers: dict[int, DeviceBuffer] = {}
        self._next_buffer = 1
        self._streams: list[Stream] = []
        self._alloc_lock = threading.Lock()
        self.default_stream = self.create_stream()

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the device; idempotent. Later use raises :class:`ChannelClosedError`."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    #: the device's clock (``devices/_clock.pyx``: every device of ours has one, from
    #: its C base), on which ``Op.end`` times are given
    clock: DeviceClock

    def now(self) -> float:
        """The device's clock (seconds), on which ``Op.end`` times are given."""
        return self.clock.now()

    def frozen_s(self) -> float:
        """Seconds the device clock has stood still so far (the emulated device's
        emulation stall, the current one included; 0 on real hardware)."""
        return self.clock.frozen_s()

    @property
    def gate(self) -> threading.Event:
        """Set while host work may proceed in step with the device clock (the emulated
        device shuts it while the emulator lags its model)."""
        return self.clock.gate

    def hold(self, seconds: float) -> None:
        """Wait ``seconds`` on the device clock: a host worker whose task ran while the
        clock stood still (see the emulated device); a no-op where it never does."""

    def clock_held(self) -> contextlib.AbstractContextManager:
        """A context inside which the device clock stands still, for tools whose own
        work must not count as device time (the trace replayer's bookkeeping); on a device
        whose clock is the wall clock it changes nothing.

        >>> import pipellm
        >>> with pipellm.open_device("emulated") as dev, dev.clock_held():
        ...     pass
        """
        return contextlib.nullcontext()

    def _check_not_forked(self) -> None:
        """ForkedError in a child forked after the device was opened: its threads, and
        the locks they held, are the parent's."""
        if self._fork_generation != _fork.generation:
            _fork.check(self._fork_generation, f"{self.kind} device")

    def _check_open(self) -> None:
        self._check_not_forked()
        if self._closed:
            raise ChannelClosedError(f"the {self.kind} device is closed")
        if self.failure is not None:
            raise DeviceError(f"the {self.kind} device failed earlier and refuses all work: "
                              f"{self.failure}") from self.failure

    @property
    def forked_away(self) -> bool:
        """True in a child process forked after this device was opened."""
        return self._fork_generation != _fork.generation

    # -- memory and streams ------------------------------------------------------------------
    def create_stream(self) -> Stream:
        self._check_open()
        with self._alloc_lock:
            stream = Stream(self, len(self._streams))
            self._streams.append(stream)
        return stream

    def alloc(self, nbytes: int, *, dtype=np.uint8, shape=None) -> DeviceBuffer:
        """Allocate ``nbytes`` of device memory (zero-filled)."""
        self._check_open()
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise ArgumentTypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ArgumentError(f"nbytes must be positive, got {nbytes}")
        with self._alloc_lock:
            buf = DeviceBuffer(self, self._next_buffer, int(nbytes), dtype, shape)
            self._next_buffer += 1
            self._allocate(buf)
            self._buffers[buf.id] = buf
        return buf

    def free(self, buf: DeviceBuffer) -> None:
        self.check_buffer(buf)
        with self._alloc_lock:
            self._buffers.pop(buf.id, None)
            buf.freed = True
            self._release(buf)

    def check_buffer(self, buf) -> DeviceBuffer:
        if not isinstance(buf, DeviceBuffer):
            raise ArgumentTypeError(f"expected a DeviceBuffer, got {type(buf).__name__}")
        if buf.device is not self:
            raise ArgumentError(f"{buf!r} belongs to another device")
        if buf.freed:
            raise ArgumentError(f"{buf!r} was freed")
        return buf

    def check_stream(self, stream) -> Stream:
        if stream is None:
            return self.default_stream
        if not isinstance(stream, Stream):
            raise ArgumentTypeError(f"stream must come from device.create_stream(), got {type(stream).__name__}")
        if stream.device is not self:
            raise ArgumentError(f"{stream!r} belongs to another device")
        return stream

    def synchronize(self, stream: Stream | None = None, *, timeout: float | None = None,
                    session=ANY_SESSION) -> None:
        """Wait for all work submitted so far (on ``stream``, or on every stream); raise
        the first error any of it failed with.

        ``session`` (a pipeline's channel, or None for work outside any channel) narrows
        the wait to that owner's work and work outside any channel, and the errors raised
        to that owner's and the device's own failure: pipelines sharing a device and its
        streams neither wait for nor see each other's lost or refused messages. For an open session
        the device also checks that every message sent before the call arrived (see
        ``audit``): a message lost on the link fails the session instead of a wait."""
        self._check_not_forked()  # (a parent thread may hold a stream's lock)
        streams = list(self._streams) if stream is None else [self.check_stream(stream)]
        if session is not ANY_SESSION and session is not None:
            try:
                self.audit(streams[0] if stream is not None else self.default_stream, session)
            except ChannelClosedError:
                pass  # the session is closed already: its own error says why
        first_error = None
        for s in streams:
            with s._lock:
                for op in list(s._pending):
                    # another pipeline's work is its own to wait for (a message it lost must
                    # not hold this one up); work outside any channel (compute) is waited for
                    if op.session is not None and session is not ANY_SESSION and op.session.id != session:
                        continue
                    if not op.wait_done(timeout):
                        raise TransferTimeoutError(
                            f"stream {s.id}: {op.kind} of {op.nbytes} bytes did not complete within "
                            f"{timeout} s (a message lost on the link, or the device is stalled)")
                    if op.error is not None and first_error is None and (
                            session is ANY_SESSION or op.error is self.failure or _owned(op, session)):
                        first_error = op.error
                # what is finished goes, but an error stays until its owner has seen it
                pending = s._pending
                while pending and pending[0].finished and (
                        pending[0].error is None or session is ANY_SESSION or _owned(pending[0], session)):
                    pending.popleft()
        if first_error is not None:
            raise first_error

    def audit(self, stream: Stream, session: int) -> Op | None:
        """Check, behind everything submitted so far, that every message ``session`` sent
        arrived (a copy-engine device fails the session naming a lost one). A device that
        cannot lose messages has nothing to check."""
        return None

    # -- what each device implements ---------------------------------------------------------
    @abc.abstractmethod
    def _allocate(self, buf: DeviceBuffer) -> None: ...

    @abc.abstractmethod
    def _release(self, buf: DeviceBuffer) -> None: ...

    @abc.abstractmethod
    def _wait_op(self, op: Op, timeout: float | None) -> bool: ...

    @abc.abstractmethod
    def open_session(self, host_public: bytes, *, rotate_after: int, window: int = 0) -> tuple[int, bytes]:
        """Key agreement: returns (session id, the device's X25519 public key). ``window``
        is the host-to-device receiver's IV window (0: strict order)."""

    @abc.abstractmethod
    def close_session(self, session: int) -> None: ...

    @abc.abstractmethod
    def submit_messages(self, stream: Stream, session: int, msgs) -> Op:
        """Send sealed host-to-device messages, in order (payloads sit in bounce slots);
        the op is done when all of them landed."""

    @abc.abstractmethod
    def submit_sealed_read(self, stream: Stream, session: int, src: DeviceBuffer, src_offset: int,
                           region_id: int, offset: int, nbytes: int, out: memoryview,
                           on_delivered) -> Op:
        """Device to host: seal ``nbytes`` of ``src`` for host destination (region_id,
        offset) into ``out`` (a bounce slot); each message the link delivers is passed
        to ``on_delivered``."""

    @abc.abstractmethod
    def submit_copy_in(self, stream: Stream, src: memoryview, dst: DeviceBuffer, dst_offset: int) -> Op:
        """Plain (unencrypted) host to device copy."""

    @abc.abstractmethod
    def submit_copy_out(self, stream: Stream, src: DeviceBuffer, src_offset: int, dst: memoryview) -> Op:
        """Plain (unencrypted) device to host copy."""

    @abc.abstractmethod
    def compute(self, us: float, *, stream: Stream | None = None) -> Op:
        """Device work lasting ``us`` microseconds, after earlier work on the stream."""

    @abc.abstractmethod
    def read(self, buf: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """A numpy copy of device memory, for tests and tools (outside the channel)."""

    def pin_host(self, address: int, nbytes: int) -> None:
        """Host memory at ``address`` will carry this device's transfers (a bounce pool):
        a device that DMAs from host memory registers it (the cuda device); others need
        nothing. Undo with :meth:`unpin_host` before the memory goes away."""

    def unpin_host(self, address: int) -> None:
        """Forget host memory given to :meth:`pin_host`."""

    def info(self) -> dict:
        """What the device is (kind, and its model or hardware where it has one)."""
        return {"kind": self.kind}

    def stats(self) -> dict:
        """The device's own counters (none here; the copy-engine devices count their
        work), merged into :meth:`pipellm.Pipeline.stats`."""
        return {}
