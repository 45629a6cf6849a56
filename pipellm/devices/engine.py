"""The device side of the channel, shared by the emulated and cuda devices: a copy engine.

One thread takes submitted work in order: host-to-device messages (authenticated,
decrypted, committed to device memory only after their tag verified, through the
session's :class:`~pipellm.channel.Receiver`), device-to-host reads (sealed for the host
and put into a bounce slot), plain copies and compute. Between the host and the copy
engine sits the untrusted *link*, where tests attach a :class:`pipellm.testing.Adversary`.

A device subclass says where memory lives and how bytes move: ``_write`` (commit),
``_span`` (device bytes to seal), ``_copy_in`` / ``_copy_out``, ``_compute``, and the
opener / sealer classes that do the AES (the channel's CPU code, or the GPU kernels). The
emulated device adds its link and time model through ``_book``.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from contextlib import contextmanager
from time import perf_counter, thread_time

import numpy as np

from ..channel import H2D_KINDS, Direction, KeyAgreement, Kind, Opener, Receiver, Sealer
from ..channel.protocol import TAG_BYTES, check_rotate_after, unpack_header
from ..errors import ArgumentError, ChannelClosedError, DeviceError, IntegrityError
from .. import timeline
from .._ext import writeguard
from ._submission import SessionBase, Submitter
from .base import Device, DeviceBuffer, Op, Stream


def _index_of(msg, rotate_after: int) -> int:
    header = unpack_header(msg.aad)
    return -1 if header is None else header.epoch * rotate_after + header.counter


def written(dst) -> None:
    """The device writes host memory ``dst`` (a plain device-to-host copy): every
    registration over those bytes, in any pipeline, drops what it encrypted of them."""
    view = np.frombuffer(dst, dtype=np.uint8)
    if view.size:
        writeguard.written(view.ctypes.data, view.size)


#: ops a batching device may leave waiting for one settle (their messages staged, unverified)
_DEFERRED_MAX = 256


#: how long pausing waits for the copy engine to finish what it is doing and stop
_PARK_WAIT_S = 5.0
_PARK = object()  # the copy engine's task: stop where it is until the pause ends (see paused)


class _Failed(Exception):
    """Raised inside the copy engine once the device has failed (see inject_fault)."""


class Session(SessionBase):
    """The device's end of one host's channel (``pending`` and ``failure``: C fields)."""

    def __init__(self, id: int, keys, rotate_after: int, window: int, opener=Opener, sealer=Sealer):
        super().__init__()
        self.id = id
        self.opener = opener(keys, Direction.H2D, rotate_after, window=window, kinds=H2D_KINDS)
        self.receiver = Receiver(self.opener)
        self.sealer = sealer(keys, Direction.D2H, rotate_after)


class CopyEngineDevice(Submitter, Device):
    """A device whose copy engine is a thread of this process (see the module docstring)."""

    opener_class = Opener
    sealer_class = Sealer

    def __init__(self, *, adversary=None, staging_bytes: int = 64 << 20):
        if adversary is not None and not callable(getattr(adversary, "on_message", None)):
            raise ArgumentError("adversary must have an on_message(msg) method (see pipellm.testing.Adversary)")
        Submitter.__init__(self)  # (its queue, numbering and sessions: the submission path's, in C)
        self.adversary = adversary
        self._deferred: list[tuple[Op, int]] = []  # (op, messages staged through its last): see _settle
        self._open_batch: Session | None = None    # whose staged messages wait for more of theirs
        self._mem: dict[int, object] = {}  # buffer id -> its memory (an array of the device's kind)
        self._allocated = 0
        self._session_ids = itertools.count(1)
        self.max_message_bytes = staging_bytes
        self._running = threading.Event()
        self._running.set()
        self._parked = threading.Event()
        self._cond = threading.Condition(threading.Lock())
        self._handled = 0
        self._busy_s = 0.0
        # the copy engine's work, by what it costs: AES bytes (h2d opened, d2h sealed),
        # copied bytes (plain copies and commits of verified plaintext), ops handled
        self.work = {"aes_bytes": 0, "copy_bytes": 0, "ops": 0}
        self._fault: tuple[int, str] | None = None  # (units of work left, reason): inject_fault
        self._undelivered: dict[Op, tuple] = {}  # h2d ops handled with messages not yet received
        Device.__init__(self)
        # the thread holds the device weakly between ops: a device dropped without close()
        # is collected, and its finalizer stops the thread (and says so: ResourceWarning)
        self._thread = threading.Thread(target=_copy_engine, args=(weakref.ref(self), self._queue, self._running,
                                                                   self._parked),
                                        name=f"pipellm-{self.kind}-copy-engine", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _abandoned, self.kind, self._queue)

    # -- what a device adds ----------------------------------------------------------------------
    def _fetch(self, buffer_id: int, offset: int, nbytes: int) -> np.ndarray:
        """A host copy of device bytes (for :meth:`read`)."""
        raise NotImplementedError

    def _staging(self, session: Session, nbytes: int):
        """Where the opener decrypts a message of ``session`` of ``nbytes`` before its
        commit (device-private). It stays put until :meth:`_staging_done`: a transfer's
        messages are committed together, once the last one authenticated."""
        raise NotImplementedError

    def _staging_done(self, session: Session, release: bool = False) -> None:
        """The session has no transfer open: its staging can be reused from the start
        (``release``: the session failed or closed, its staging is given back)."""

    def _fits(self, buffer_id: int, offset: int, nbytes: int) -> bool:
        """The buffer is allocated and holds ``[offset, offset + nbytes)``."""
        mem = self._mem.get(buffer_id)
        return mem is not None and offset + nbytes <= mem.size

    def _write(self, buffer_id: int, offset: int, plaintext) -> str | None:
        """Commit verified plaintext to device memory; a reason where it can't."""
        raise NotImplementedError

    def _span(self, buffer_id: int, offset: int, nbytes: int):
        """Device bytes to seal for the host, or None where the buffer is not allocated."""
        raise NotImplementedError

    def _copy_in(self, src, buffer_id: int, offset: int) -> bool:
        raise NotImplementedError

    def _copy_out(self, buffer_id: int, offset: int, dst) -> bool:
        raise NotImplementedError

    def _compute(self, op: Op, seconds: float, ready: float) -> None:
        raise NotImplementedError

    def _book(self, op: Op, direction: int, ready: float, nbytes: int) -> None:
        """Time model hook: the emulated device books its modelled link here."""

    def _make_room(self, session: Session, nbytes: int) -> None:
        """A message of ``nbytes`` is about to be received: a device that verifies in
        batches settles first if its batch has no room (the cuda device)."""

    def _abandon(self) -> None:
        """The op being handled failed part-way (copy-engine thread): a device that
        verifies in batches drops what it staged of it, once nothing reads it any more."""

    def _staged(self) -> int:
        """Messages a batching device has staged and not yet verified."""
        return 0

    def _in_flight(self) -> int:
        """Groups of messages a batching device launched whose outcome it has not read
        (their ops finish at the next settle)."""
        return 0

    def _verify_staged(self) -> tuple[int, int] | None:
        """Verify and commit, in order, what a batching device staged: None, or the
        position in the batch and the channel index of the first refused message (those
        before it are committed; position -1: a group launched earlier was refused, so none
        of these is). Devices that commit each message as it is received have nothing here."""
        return None

    def _settle(self, session: Session) -> None:
        """Verify and commit what is staged, then finish the ops that were waiting on it:
        those whose messages all came before a refused one succeed, a refusal fails the
        session (and with it the rest)."""
        deferred, self._deferred, self._open_batch = self._deferred, [], None
        refused = self._verify_staged()
        for owner, staged in deferred:
            if not owner.finished and (refused is None or staged <= refused[0]):
                self._finish(owner)
        if refused is not None:
            self._fail_session(session, IntegrityError(
                f"h2d message {refused[1]} (session {session.id}) failed authentication; the channel is closed"))

    def _settle_before(self, following: Op | None) -> None:
        """A batch left open (see _do_message) is settled before ``following`` unless that
        is more of the same session's messages: a read, a copy, compute, another session
        or the end must see its commits."""
        session = self._open_batch
        if session is None or (following is not None and following.kind == "h2d message"
                               and following.session is session):
            return
        try:
            self._settle(session)
        except Exception as exc:  # a bug or a failing device: fail what waited, keep going
            self._fail_batch(session, DeviceError(f"{self.kind} device failed verifying a batch: {exc!r}"))

    def _fail_batch(self, session: Session, error: BaseException) -> None:
        """The session's channel state is unknown (a message may be half processed): fail
        it with what waited for its batch, and drop what the device staged."""
        self._fail_session(session, error)
        self._deferred.clear()
        self._open_batch = None
        self._abandon()

    # -- channel ---------------------------------------------------------------------------------
    def open_session(self, host_public: bytes, *, rotate_after: int, window: int = 0) -> tuple[int, bytes]:
        self._check_open()
        check_rotate_after(rotate_after)
        mine = KeyAgreement()
        session = next(self._session_ids)
        keys = mine.derive(host_public, session=session, host_public=bytes(host_public),
                           device_public=mine.public_bytes)
        self._sessions[session] = Session(session, keys, rotate_after, window, self.opener_class, self.sealer_class)
        return session, mine.public_bytes

    def close_session(self, session: int) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self._fail_session(s, ChannelClosedError(f"session {session} was closed"))

    # -- submission --------------------------------------------------------------------------------
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

    def read(self, buf: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> np.ndarray:
        """A copy of device memory once all work submitted before this call was handled.

        Reads the whole buffer as its recorded dtype/shape, or ``nbytes`` raw bytes."""
        self._check_open()
        self.check_buffer(buf)
        whole = nbytes is None and offset == 0
        nbytes = buf.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or nbytes < 0 or offset + nbytes > buf.nbytes:
            raise ArgumentError(f"read of {nbytes} bytes at offset {offset} is outside {buf!r}")
        self._handled_all_submitted()
        data = self._fetch(buf.id, offset, nbytes)
        if whole and buf.nbytes % buf.dtype.itemsize == 0:
            return data.view(buf.dtype).reshape(buf.shape)
        return data

    def _handled_all_submitted(self) -> None:
        """Block until the copy engine has handled everything submitted before the call."""
        target = self._seq
        with self._cond:
            self._cond.wait_for(lambda: self._handled >= target or self._closed)

    # -- the copy engine ---------------------------------------------------------------------------
    def _handle(self, op: Op) -> None:
        """Do one op (the copy engine's thread, see _copy_engine)."""
        self._settle_before(op)
        start = perf_counter()
        traced = timeline.recording
        if traced:
            cpu = thread_time()
        ready = op.prev.end if op.prev is not None else 0.0
        op.prev = None  # history is not kept alive through the chain
        try:
            if self.failure is not None:
                raise _Failed
            getattr(self, _HANDLERS[op.kind])(op, max(op.submit_t, ready))
        except _Failed:
            self._fail_device(op)
        except Exception as exc:  # a bug or a misbehaving adversary: fail the op, keep going
            error = DeviceError(f"{self.kind} device failed {op.kind}: {exc!r}")
            if op.session is not None:
                # fail the session, rather than refuse its next message as forged
                self._fail_batch(op.session, error)
            if not op.finished:
                self._finish(op, error)
        op.args = ()
        end = perf_counter()
        self._busy_s += end - start
        self.work["ops"] += 1
        if traced:
            timeline.span("device:" + op.kind, start, end, thread_time() - cpu)
        with self._cond:
            self._handled = op.seq
            self._cond.notify_all()

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
            self._book(op, Direction.H2D, ready, len(msg.payload))
            if session.failure is not None:
                # what a batching device staged of it before the refused message: verified
                # and committed in order, as a device committing each message has done
                self._settle(session)
                self._finish(op, session.failure)
                return
            self._make_room(session, len(msg.payload))
            for delivered in self._through_link(msg):
                self._receive(session, delivered)
        if op.remaining > 0 and not op.finished:
            self._undelivered[op] = msgs  # lost or held on the link: see _do_audit
        if not (self._staged() or self._deferred or self._in_flight()):
            return
        if self._queue.empty() or len(self._deferred) >= _DEFERRED_MAX:
            self._settle(session)  # nothing follows right now (or the op's last message was lost)
        else:
            self._open_batch = session  # more work is queued: verify with it (see _settle_before)

    def _receive(self, session: Session, msg) -> None:
        """Authenticate, decrypt into staging, and only once the whole transfer has
        authenticated commit it to device memory (all of it, or nothing: a destination
        that can't take one of its messages fails it before any is written)."""
        if session.failure is not None:
            return
        try:
            commits = session.receiver.receive(msg, self._staging(session, max(0, len(msg.payload) - TAG_BYTES)))
        except IntegrityError as exc:
            self._fail_session(session, exc)
            return
        error = None
        for commit in commits:
            if not self._fits(commit.buffer, commit.offset, len(commit.plaintext)):
                error = DeviceError(f"h2d message {commit.index} names buffer {commit.buffer} "
                                    f"[{commit.offset}:+{len(commit.plaintext)}], which is not allocated")
                break
        else:
            for commit in commits:
                self._write(commit.buffer, commit.offset, commit.plaintext)
                self.work["copy_bytes"] += len(commit.plaintext)
        self.work["aes_bytes"] += max(0, len(msg.payload) - TAG_BYTES)
        if session.receiver.receiving is None:
            self._staging_done(session)
        owner = msg._owner
        if owner is not None and not owner.finished:
            owner.remaining -= 1
            if error is None and owner.remaining <= 0 and self._staged():
                self._deferred.append((owner, self._staged()))  # done at the next settle
            elif error is not None or owner.remaining <= 0:
                self._settle(session)  # done only once everything of it is verified and committed
                if not owner.finished:  # (a refusal in the settling failed it already)
                    self._finish(owner, error)

    def _do_sealed_read(self, op: Op, ready: float) -> None:
        src_id, src_offset, region_id, offset, out = op.args
        self._tick()
        self._book(op, Direction.D2H, ready, len(out))
        session = op.session
        if self._undelivered:  # the read must not overtake a host-to-device message still missing
            self._fail_if_lost(session, "a device-to-host read after it")
        if session.failure is not None:
            self._finish(op, session.failure)
            return
        span = self._span(src_id, src_offset, op.nbytes)
        if span is None:
            self._finish(op, DeviceError(f"d2h read from buffer {src_id}, which is not allocated"))
            return
        msg = session.sealer.seal_next(Kind.DATA, region_id, offset, span, out)
        self.work["aes_bytes"] += op.nbytes
        msg._owner = op
        for delivered in self._through_link(msg):
            op.on_delivered(delivered)
        self._finish(op)

    def _do_audit(self, op: Op, ready: float) -> None:
        """The host synchronizes (``audit``): everything it submitted before has been
        handled, so a message of its session still missing was lost on the link (or is
        held there past the point the host relies on it): fail the session, naming it,
        rather than leave the host waiting for it. (A transfer still open without a lost
        message is one the host abandoned part-way: the next one discards it.)"""
        self._fail_if_lost(op.session, "the host synchronized")
        op.end = ready  # (no device time of its own: the stream's next op starts where it would have)
        self._finish(op)

    def _fail_if_lost(self, session: Session, before: str) -> None:
        """Fail ``session`` if a message of it handed to the link earlier never arrived
        (an honest link delivers each message as the copy engine handles it)."""
        for sent, msgs in list(self._undelivered.items()):
            if sent.finished:
                del self._undelivered[sent]
            elif sent.session is session and session.failure is None:
                opener = session.opener
                lost = next((i for i in (_index_of(m, opener.rotate_after) for m in msgs)
                             if not opener.accepted(i)), None)
                where = f"message {lost}" if lost is not None else "a message"
                self._fail_session(session, IntegrityError(
                    f"h2d {where} (session {session.id}) never arrived: it was sent before {before} "
                    f"and lost or held back on the link; the channel is closed"))

    def audit(self, stream: Stream, session: int) -> Op:
        """Queue the check :meth:`_do_audit` makes behind everything submitted so far."""
        return self._submit(Op(self, "audit", stream, 0, self._session(session)))

    def _do_copy_in(self, op: Op, ready: float) -> None:
        src, dst_id, dst_offset = op.args
        self._tick()
        self._book(op, Direction.H2D, ready, len(src))
        if not self._copy_in(src, dst_id, dst_offset):
            self._finish(op, DeviceError(f"copy into buffer {dst_id}, which is not allocated"))
            return
        self.work["copy_bytes"] += len(src)
        self._finish(op)

    def _do_copy_out(self, op: Op, ready: float) -> None:
        src_id, src_offset, dst = op.args
        self._tick()
        self._book(op, Direction.D2H, ready, len(dst))
        written(dst)  # before and after: speculation over those host bytes is dropped
        if not self._copy_out(src_id, src_offset, dst):
            self._finish(op, DeviceError(f"copy from buffer {src_id}, which is not allocated"))
            return
        self.work["copy_bytes"] += len(dst)
        written(dst)
        self._finish(op)

    def _do_compute(self, op: Op, ready: float) -> None:
        (seconds,) = op.args
        self._tick()
        self._compute(op, seconds, ready)
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
        self.failure = DeviceError(f"the {self.kind} device failed: {reason}")
        raise _Failed

    def _fail_device(self, op: Op) -> None:
        """The device has failed: fail ``op`` and every session (their pending ops with them)."""
        self._finish(op, self.failure)
        for session in list(self._sessions.values()):
            self._fail_session(session, self.failure)

    def _fail_session(self, session: Session, error: BaseException) -> None:
        """Fail closed: the session refuses everything from now on; pending ops fail."""
        if session.failure is None:
            session.failure = error
            session.opener.close(error)
            session.sealer.close(error)
            session.receiver.discard()  # what it staged of an open transfer never lands
            self._staging_done(session, release=True)
        for op in list(session.pending):
            self._finish(op, error)
        with self._cond:
            self._cond.notify_all()

    # -- waiting ---------------------------------------------------------------------------------
    @contextmanager
    def paused(self):
        """Hold the copy engine: submitted work queues up (nothing completes) until the
        block ends. For tests, and for timing the host's own path without the copy
        engine's thread competing for the CPU and the GIL: it stops before the block
        starts (once done with what it is doing), so submissions do not wake it."""
        self._running.clear()
        self._parked.clear()
        if not (self._closed or self.forked_away):
            self._put(_PARK)
            self._parked.wait(_PARK_WAIT_S)
        try:
            yield self
        finally:
            self._running.set()

    def _wait_op(self, op: Op, timeout: float | None) -> bool:
        deadline = None if timeout is None else perf_counter() + timeout
        with self._cond:
            while not op.finished and not self._closed:
                remaining = None if deadline is None else deadline - perf_counter()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        if self._closed:
            return
        if self.forked_away:  # the copy engine thread lives in the parent only
            self._closed = True
            return
        self._finalizer.detach()
        with self._submit_lock:
            self._closed = True
            self._queue.put(None)
        self._running.set()
        self._thread.join(timeout=30)
        closed = ChannelClosedError(f"the {self.kind} device was closed")
        for session in list(self._sessions.values()):
            self._fail_session(session, closed)
        self._sessions.clear()
        with self._cond:
            self._cond.notify_all()
        self._release_all()

    def _release(self, buf: DeviceBuffer) -> None:
        if self._mem.pop(buf.id, None) is not None:
            self._allocated -= buf.nbytes

    def _release_all(self) -> None:
        """Free every allocation (the device is closed)."""
        self._mem.clear()


#: the copy engine's method for each kind of op
_HANDLERS = {"h2d message": "_do_message", "d2h message": "_do_sealed_read", "h2d copy": "_do_copy_in",
             "d2h copy": "_do_copy_out", "compute": "_do_compute", "audit": "_do_audit"}


def _copy_engine(device_ref, ops, running: threading.Event, parked: threading.Event) -> None:
    """The copy engine's thread: takes ops in submission order and has the device do
    each. It holds the device only while it does one (a weak reference otherwise), so a
    device nobody holds is collected; ``None`` (close, or the finalizer) ends it."""
    while True:
        op = ops.get()
        if op is None:
            device = device_ref()
            if device is not None:
                device._settle_before(None)
            return
        if op is _PARK:
            parked.set()
            running.wait()
            continue
        running.wait()
        device = device_ref()
        if device is None:  # (an op holds its device: not while one is queued)
            return
        device._handle(op)
        del device, op


def _abandoned(kind: str, ops) -> None:
    """A copy-engine device was collected without close(): stop its thread."""
    warnings.warn(f"the {kind} device was never closed (close it, or open it with 'with')", ResourceWarning,
                  stacklevel=2)
    ops.put(None)


__all__ = ["CopyEngineDevice", "DeviceBuffer", "Session"]
