"""The embedded ``emulated`` device: an H100 in confidential-computing mode, in-process.

It has protected memory (only its copy engine writes it), a copy engine that really
authenticates and decrypts every host-to-device message (and encrypts device-to-host
ones) with the channel's own code, a modelled PCIe link and modelled compute, and an
explicit untrusted link where tests attach a :class:`pipellm.testing.Adversary`.

How time works. Every op gets a *modelled* end time computed from the link model
(bandwidth, per-copy latency, one link per direction), the compute engine and stream
order. The copy engine's real work (AES-GCM, memcpy) runs on one device thread; an op is
done once that work is finished *and* its modelled end has passed.

On an H100 the copy engine works at line rate in hardware, so when a host thread has to
wait for the emulator's CPU work beyond the model (the op's modelled end has passed, or
the copy engine has not even reached the op), that is *emulation stall*: the device
clock (:meth:`EmulatedDevice.now`, on which all modelled times are given) stands still
for it, and the device's ``gate`` event is shut, so host worker threads that check the
gate (the pipellm mode's do, between chunks) do not get work done in time that does not
exist in the model. Wall time minus stall is then the *modelled time* of the host's
work, which benchmarks report next to wall time. Residual error: a chunk a worker is in
the middle of when a stall begins finishes during the stall.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from .._ext import copy_into
from ..channel import H2D_KINDS, Direction, KeyAgreement, Kind, Opener, Receiver, Sealer
from ..channel.protocol import TAG_BYTES, check_rotate_after
from ..errors import (
    ArgumentError,
    ChannelClosedError,
    DeviceError,
    IntegrityError,
)
from .base import Device, DeviceBuffer, Op, Stream


class _Failed(Exception):
    """Raised inside the copy engine once the device has failed (see inject_fault)."""


@dataclass(frozen=True)
class LinkModel:
    """The modelled host<->device link: one link per direction (PCIe is full duplex).

    Defaults are those of PCIe Gen5 x16 on an H100 without CC: ~50 GB/s achieved per
    direction (64 GB/s raw; NVIDIA's nvbandwidth reports ~53 GB/s for copy-engine copies)
    and a few microseconds per copy.
    """

    h2d_bytes_per_s: float = 50e9
    d2h_bytes_per_s: float = 50e9
    latency_s: float = 2e-6

    def __post_init__(self):
        for name in ("h2d_bytes_per_s", "d2h_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ArgumentError(f"LinkModel.{name} must be positive, got {getattr(self, name)}")
        if not self.latency_s >= 0:
            raise ArgumentError(f"LinkModel.latency_s must be >= 0, got {self.latency_s}")


class _Session:
    """The device's end of one host's channel."""

    def __init__(self, id: int, keys, rotate_after: int, window: int):
        self.id = id
        self.opener = Opener(keys, Direction.H2D, rotate_after, window=window, kinds=H2D_KINDS)
        self.receiver = Receiver(self.opener)
        self.sealer = Sealer(keys, Direction.D2H, rotate_after)
        self.pending: set[Op] = set()
        self.failure: BaseException | None = None


def sleep_until(clock, t: float) -> None:
    """Sleep until clock() >= t: coarse sleeps, then yield-spin the last 0.3 ms."""
    while (remaining := t - clock()) > 5e-4:
        time.sleep(remaining - 3e-4)
    while clock() < t:
        time.sleep(0)


class EmulatedDevice(Device):
    """An emulated confidential GPU. Use ``pipellm.open_device("emulated", ...)``.

    >>> import pipellm
    >>> with pipellm.open_device("emulated") as dev:
    ...     buf = dev.alloc(16)
    ...     dev.read(buf).tolist()[:4]
    [0, 0, 0, 0]
    """

    kind = "emulated"

    def __init__(self, *, adversary=None, link: LinkModel | None = None,
                 memory_bytes: int = 80 << 30, staging_bytes: int = 64 << 20):
        if link is not None and not isinstance(link, LinkModel):
            raise ArgumentError(f"link must be a LinkModel, got {type(link).__name__}")
        if adversary is not None and not callable(getattr(adversary, "on_message", None)):
            raise ArgumentError("adversary must have an on_message(msg) method (see pipellm.testing.Adversary)")
        self.link = link or LinkModel()
        self.adversary = adversary
        self.memory_bytes = int(memory_bytes)
        self._allocated = 0
        self._mem: dict[int, np.ndarray] = {}
        self._sessions: dict[int, _Session] = {}
        self._session_ids = itertools.count(1)
        self._staging = memoryview(bytearray(staging_bytes))
        self.max_message_bytes = staging_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._running = threading.Event()
        self._running.set()
        self._submit_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._seq = 0
        self._handled = 0
        self._link_free = [0.0, 0.0]  # per Direction
        self._compute_free = 0.0
        self._busy_s = 0.0
        self._stall_s = 0.0          # total time the device clock stood still
        self._stalling = 0           # host threads stalled right now
        self._stall_since = 0.0
        self._stall_lock = threading.Lock()
        self._fault: tuple[int, str] | None = None  # (units of work left, reason): inject_fault
        super().__init__()
        self._thread = threading.Thread(target=self._run, name="pipellm-emulated-copy-engine", daemon=True)
        self._thread.start()

    # -- memory ---------------------------------------------------------------------------------
    def _allocate(self, buf: DeviceBuffer) -> None:
        if self._allocated + buf.nbytes > self.memory_bytes:
            raise DeviceError(f"out of device memory: {buf.nbytes} bytes asked, "
                              f"{self.memory_bytes - self._allocated} of {self.memory_bytes} free")
        self._mem[buf.id] = np.zeros(buf.nbytes, np.uint8)
        self._allocated += buf.nbytes

    def _release(self, buf: DeviceBuffer) -> None:
        if self._mem.pop(buf.id, None) is not None:
            self._allocated -= buf.nbytes

    def read(self, buf: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """A copy of device memory once all work submitted before this call was handled.

        Reads the whole buffer as its recorded dtype/shape, or ``nbytes`` raw bytes."""
        self._check_open()
        self.check_buffer(buf)
        if nbytes is None and offset == 0:
            nbytes, whole = buf.nbytes, True
        else:
            nbytes = buf.nbytes - offset if nbytes is None else nbytes
            whole = False
        if offset < 0 or nbytes < 0 or offset + nbytes > buf.nbytes:
            raise ArgumentError(f"read of {nbytes} bytes at offset {offset} is outside {buf!r}")
        target = self._seq
        with self._cond:
            self._cond.wait_for(lambda: self._handled >= target or self._closed)
        data = self._mem[buf.id][offset:offset + nbytes].copy()
        if whole and buf.nbytes % buf.dtype.itemsize == 0:
            return data.view(buf.dtype).reshape(buf.shape)
        return data

    # -- channel ---------------------------------------------------------------------------------
    def open_session(self, host_public: bytes, *, rotate_after: int, window: int = 0) -> tuple[int, bytes]:
        self._check_open()
        check_rotate_after(rotate_after)
        mine = KeyAgreement()
        session = next(self._session_ids)
        keys = mine.derive(host_public, session=session, host_public=bytes(host_public),
                           device_public=mine.public_bytes)
        self._sessions[session] = _Session(session, keys, rotate_after, window)
        return session, mine.public_bytes

    def close_session(self, session: int) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self._fail_session(s, ChannelClosedError(f"session {session} was closed"))

    def session_failure(self, session: int) -> BaseException | None:
        s = self._sessions.get(session)
        return None if s is None else s.failure

    # -- submission --------------------------------------------------------------------------------
    def _submit(self, op: Op) -> Op:
        self._check_open()
        stream = op.stream
        with self._submit_lock:
            self._seq += 1
            op.seq = self._seq
            op.prev, stream._last = stream._last, op
            stream._pending.append(op)
            if op.session is not None:
                op.session.pending.add(op)
            self._queue.put(op)
        if len(stream._pending) > 64 and stream._lock.acquire(blocking=False):  # drop finished ops
            try:
                pending, now = stream._pending, self.now()
                while len(pending) > 1 and pending[0].finished and pending[0].end <= now and pending[0].error is None:
                    pending.popleft()
            finally:
                stream._lock.release()
        return op

    def _session(self, session: int) -> _Session:
        s = self._sessions.get(session)
        if s is None:
            raise ChannelClosedError(f"no open session {session} on this device")
        return s

    def submit_messages(self, stream: Stream, session: int, msgs) -> Op:
        s = self._session(session)
        op = Op(self, "h2d message", stream, sum(len(m.payload) - TAG_BYTES for m in msgs), s, (msgs,))
        op.remaining = len(msgs)
        for msg in msgs:
            msg._owner = op
        return self._submit(op)

    def submit_sealed_read(self, stream, session, src, src_offset, region_id, offset, nbytes, out,
                           on_delivered) -> Op:
        s = self._session(session)
        return self._submit(Op(self, "d2h message", stream, nbytes, s,
                               (src.id, src_offset, region_id, offset, out), on_delivered))

    def submit_copy_in(self, stream, src, dst, dst_offset) -> Op:
        return self._submit(Op(self, "h2d copy", stream, len(src), None, (src, dst.id, dst_offset)))

    def submit_copy_out(self, stream, src, src_offset, dst) -> Op:
        return self._submit(Op(self, "d2h copy", stream, len(dst), None, (src.id, src_offset, dst)))

    def compute(self, us: float, *, stream: Stream | None = None) -> Op:
        stream = self.check_stream(stream)
        if not us >= 0:
            raise ArgumentError(f"compute time must be >= 0 microseconds, got {us}")
        return self._submit(Op(self, "compute", stream, 0, None, (us * 1e-6,)))

    # -- the copy engine ---------------------------------------------------------------------------
    def _run(self) -> None:
        handlers = {"h2d message": self._do_message, "d2h message": self._do_sealed_read,
                    "h2d copy": self._do_copy_in, "d2h copy": self._do_copy_out,
                    "compute": self._do_compute}
        while True:
            op = self._queue.get()
            if op is None:
                return
            self._running.wait()
            start = perf_counter()
            ready = op.prev.end if op.prev is not None else 0.0
            op.prev = None  # history is not kept alive through the chain
            try:
                if self.failure is not None:
                    raise _Failed
                handlers[op.kind](op, max(op.submit_t, ready))
            except _Failed:
                self._fail_device(op)
            except Exception as exc:  # a bug or a misbehaving adversary: fail the op, keep going
                error = DeviceError(f"emulated device failed {op.kind}: {exc!r}")
                if op.session is not None:
                    # the session's channel state is unknown now (a message may be half
                    # processed): fail it, rather than refuse its next message as forged
                    self._fail_session(op.session, error)
                if not op.finished:
                    self._finish(op, error)
            op.args = ()
            self._busy_s += perf_counter() - start
            with self._cond:
                self._handled = op.seq
                self._cond.notify_all()

    def _link(self, direction: int, ready: float, nbytes: int) -> float:
        """Book the link for ``nbytes`` no earlier than ``ready``; the arrival time."""
        bandwidth = self.link.h2d_bytes_per_s if direction == 0 else self.link.d2h_bytes_per_s
        start = max(ready, self._link_free[direction])
        self._link_free[direction] = start + nbytes / bandwidth
        return start + nbytes / bandwidth + self.link.latency_s

    def _finish(self, op: Op, error: BaseException | None = None) -> None:
        op.error = error
        op.finished = True
        if op.session is not None:
            op.session.pending.discard(op)

    def _through_link(self, msg) -> list:
        if self.adversary is None:
            return [msg]
        out = self.adversary.on_message(msg)
        if not isinstance(out, (list, tuple)):
            raise DeviceError(f"adversary.on_message must return a list of messages, got {type(out).__name__}")
        return list(out)

    def _do_message(self, op: Op, ready: float) -> None:
        (msgs,) = op.args
        session = op.session
        for msg in msgs:
            self._tick()
            op.end = self._link(Direction.H2D, ready, len(msg.payload))
            if session.failure is not None:
                self._finish(op, session.failure)
                return
            for delivered in self._through_link(msg):
                self._receive(session, delivered)

    def _receive(self, session: _Session, msg) -> None:
        """Authenticate, decrypt into staging, and only then commit to device memory."""
        if session.failure is not None:
            return
        try:
            commit = session.receiver.receive(msg, self._staging)
        except IntegrityError as exc:
            self._fail_session(session, exc)
            return
        error = None
        if commit is not None:
            mem = self._mem.get(commit.buffer)
            length = len(commit.plaintext)
            if mem is None or commit.offset + length > mem.size:
                error = DeviceError(f"h2d message {commit.index} names buffer {commit.buffer} "
                                    f"[{commit.offset}:+{length}], which is not allocated")
            else:
                copy_into(memoryview(mem)[commit.offset:commit.offset + length], commit.plaintext)
        owner = msg._owner
        if owner is not None and not owner.finished:
            owner.remaining -= 1
            if error is not None or owner.remaining <= 0:
                self._finish(owner, error)

    def _do_sealed_read(self, op: Op, ready: float) -> None:
        src_id, src_offset, region_id, offset, out = op.args
        self._tick()
        op.end = self._link(Direction.D2H, ready, len(out))
        session = op.session
        if session.failure is not None:
            self._finish(op, session.failure)
            return
        mem = self._mem.get(src_id)
        if mem is None:
            self._finish(op, DeviceError(f"d2h read from buffer {src_id}, which is not allocated"))
            return
        sealer = session.sealer
        msg = sealer.seal_next(Kind.DATA, region_id, offset,
                               memoryview(mem)[src_offset:src_offset + op.nbytes], out)
        msg._owner = op
        for delivered in self._through_link(msg):
            op.on_delivered(delivered)
        self._finish(op)

    def _do_copy_in(self, op: Op, ready: float) -> None:
        src, dst_id, dst_offset = op.args
        self._tick()
        op.end = self._link(Direction.H2D, ready, len(src))
        mem = self._mem.get(dst_id)
        if mem is None:
            self._finish(op, DeviceError(f"copy into buffer {dst_id}, which is not allocated"))
            return
        copy_into(memoryview(mem)[dst_offset:dst_offset + len(src)], src)
        self._finish(op)

    def _do_copy_out(self, op: Op, ready: float) -> None:
        src_id, src_offset, dst = op.args
        self._tick()
        op.end = self._link(Direction.D2H, ready, len(dst))
        mem = self._mem.get(src_id)
        if mem is None:
            self._finish(op, DeviceError(f"copy from buffer {src_id}, which is not allocated"))
            return
        copy_into(dst, memoryview(mem)[src_offset:src_offset + len(dst)])
        self._finish(op)

    def _do_compute(self, op: Op, ready: float) -> None:
        (seconds,) = op.args
        self._tick()
        start = max(ready, self._compute_free)
        op.end = self._compute_free = start + seconds
        self._finish(op)

    # -- faults ----------------------------------------------------------------------------------
    def inject_fault(self, after: int = 0, reason: str = "injected fault") -> None:
        """Testing hook: fail for good once the copy engine has handled ``after`` more
        units of work (one message, copy or compute each), the way an uncorrectable error
        (an Xid) ends a CUDA context. The operation in progress fails part-way (a
        multi-message transfer keeps the messages that landed), and it, everything queued
        and every later call but :meth:`close` raise :class:`~pipellm.DeviceError`.

        >>> import pipellm
        >>> with pipellm.open_device("emulated") as dev:
        ...     dev.inject_fault(after=0, reason="Xid 79")
        ...     op = dev.compute(1.0)
        ...     op.wait_done(5.0), type(op.error).__name__
        (True, 'DeviceError')
        """
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ArgumentError(f"after must be an int >= 0 (units of work before the fault), got {after!r}")
        self._check_open()
        self._fault = (after, str(reason))

    def _tick(self) -> None:
        """Count one unit of work against an injected fault (copy-engine thread)."""
        if self._fault is None:
            return
        left, reason = self._fault
        if left > 0:
            self._fault = (left - 1, reason)
            return
        self._fault = None
        self.failure = DeviceError(f"the emulated device failed: {reason}")
        raise _Failed

    def _fail_device(self, op: Op) -> None:
        """The device has failed: fail ``op`` and every session (their pending ops with them)."""
        self._finish(op, self.failure)
        for session in list(self._sessions.values()):
            self._fail_session(session, self.failure)

    def _fail_session(self, session: _Session, error: BaseException) -> None:
        """Fail closed: the session refuses everything from now on; pending ops fail."""
        if session.failure is None:
            session.failure = error
            session.opener.close(error)
            session.sealer.close(error)
        for op in list(session.pending):
            self._finish(op, error)
        with self._cond:
            self._cond.notify_all()

    # -- waiting ---------------------------------------------------------------------------------
    def now(self) -> float:
        with self._stall_lock:
            if self._stalling:
                return self._stall_since - self._stall_s  # frozen while stalled
            return perf_counter() - self._stall_s

    @contextmanager
    def paused(self):
        """Hold the copy engine: submitted work queues up (nothing completes) until the
        block ends. For tests, and for timing the host's own path without the
        emulator's thread competing for the CPU and the GIL."""
        self._running.clear()
        try:
            yield self
        finally:
            self._running.set()

    @contextmanager
    def clock_held(self):
        """The device clock stands still (and host workers are held at the gate) inside:
        for tools whose own work must not count as modelled time (the trace replayer's
        bookkeeping). Counted with the emulation stall."""
        self._stall(begin=True)
        try:
            yield
        finally:
            self._stall(begin=False)

    def _stall(self, begin: bool) -> None:
        """A host thread starts / stops waiting only because the emulator lags the model.
        While any does, the device clock stands still and the gate is shut, so host
        workers (which check it) make no progress the model would not allow."""
        with self._stall_lock:
            if begin:
                if self._stalling == 0:
                    self._stall_since = perf_counter()
                    self.gate.clear()
                self._stalling += 1
            else:
                self._stalling -= 1
                if self._stalling == 0:
                    self._stall_s += perf_counter() - self._stall_since
                    self.gate.set()

    def _wait_op(self, op: Op, timeout: float | None) -> bool:
        deadline = None if timeout is None else perf_counter() + timeout
        stalled = False
        try:
            while not op.finished and not self._closed:
                now = self.now()
                # op.end is 0 until the copy engine has handled the op: the emulator is behind
                running = op.end > 0 and now < op.end
                if running == stalled:  # in the model the op is still on the link: no stall
                    self._stall(begin=not running)
                    stalled = not running
                wait = op.end - now if running else 0.002
                if deadline is not None:
                    remaining = deadline - perf_counter()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                with self._cond:
                    if not op.finished:
                        self._cond.wait(wait)
        finally:
            if stalled:
                self._stall(begin=False)
        if op.end > self.now():
            sleep_until(self.now, op.end)
        return True

    def stats(self) -> dict:
        """Copy-engine CPU time and emulation stall (see the module docstring)."""
        return {"device_busy_s": self._busy_s, "emulation_stall_s": self._stall_s,
                "device_bytes_allocated": self._allocated}

    def info(self) -> dict:
        return {"kind": self.kind, "link_h2d_GBps": self.link.h2d_bytes_per_s / 1e9,
                "link_d2h_GBps": self.link.d2h_bytes_per_s / 1e9,
                "link_latency_us": self.link.latency_s * 1e6, "memory_bytes": self.memory_bytes,
                "adversary": type(self.adversary).__name__ if self.adversary else None}

    def close(self) -> None:
        if self._closed:
            return
        if self.forked_away:  # the copy engine thread lives in the parent only
            self._closed = True
            return
        with self._submit_lock:
            self._closed = True
            self._queue.put(None)
        self._running.set()
        self._thread.join(timeout=30)
        closed = ChannelClosedError("the emulated device was closed")
        for session in list(self._sessions.values()):
            self._fail_session(session, closed)
        self._sessions.clear()
        with self._cond:
            self._cond.notify_all()
        self._mem.clear()
