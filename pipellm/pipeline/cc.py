"""``mode="cc"``: confidential computing as the vanilla driver does it.

Host to device: on the calling thread, each chunk is encrypted into a bounce slot and
handed to the device at once, so earlier chunks are on the link while later ones are
being encrypted; the call returns when the last chunk is encrypted. Device to host: the
device seals each chunk into a bounce slot; the host authenticates and decrypts the
chunks when a caller needs them (``Transfer.wait``, ``synchronize``, reading the region,
or a bounce slot it must reuse). Chunks are claimed in channel order (each checked
against the receiver's own position and given its index), decrypted on whichever
threads are receiving at the time, several at once, and committed in channel order: a
transfer lands in its region only once all its chunks, and every chunk before them,
have authenticated.
"""

from __future__ import annotations

import threading
from collections import deque
from time import perf_counter

from .. import timeline
from .._ext import PAGE_BYTES, BouncePool, copy_into
from .._ext.locks import Lock
from ..channel import Direction, KeyAgreement, Kind, Opener, Sealer
from ..channel.protocol import ABANDON, FIRST, LAST, TAG_BYTES
from ..errors import ArgumentError, ChannelClosedError, DeviceError, IntegrityError, TransferTimeoutError
from ._request import Engine
from .transfer import Transfer


def slot_bytes_for(chunk_size: int) -> int:
    """A slot holds one message (chunk + tag), rounded up to whole pages."""
    return -(-(chunk_size + TAG_BYTES) // PAGE_BYTES) * PAGE_BYTES


def make_pool(what: str, nbytes: int, max_message: int, minimum: int = 2) -> BouncePool:
    """A bounce pool of ``nbytes`` that holds at least ``minimum`` of the largest messages."""
    need = minimum * slot_bytes_for(max_message - TAG_BYTES)
    if nbytes < need:
        raise ArgumentError(f"{what}={nbytes} holds fewer than {minimum} messages of {max_message} bytes "
                            f"(chunk_size + 16, in whole pages): give it at least {need}")
    return BouncePool(nbytes)


class _Landing:
    """A device-to-host transfer: its chunks are staged (in ``staging``, its own memory)
    as they authenticate and land in the region together, once the one that ends it has
    (a refused chunk leaves it untouched, and so does a transfer the host gave up
    part-way: ``abandoned``)."""

    __slots__ = ("region", "offset", "nbytes", "last", "abandoned", "staging")

    def __init__(self, region, offset, nbytes):
        self.region, self.offset, self.nbytes = region, offset, nbytes
        self.last = None
        self.abandoned = False
        self.staging: memoryview | None = None

    def ends_with(self, chunk: _Incoming) -> bool:
        # by position, not by ``last``: a chunk can be received while the chunks after it
        # are still being submitted, and the transfer must not land before they are
        return chunk.offset + chunk.nbytes == self.offset + self.nbytes


class _Incoming:
    """One device-to-host chunk the host expects; the fence of its bounce slot."""

    __slots__ = ("engine", "op", "region", "offset", "nbytes", "received", "error", "landing", "claim", "msg",
                 "outcome")

    def __init__(self, engine, region, offset, nbytes, landing):
        self.engine, self.region, self.offset, self.nbytes = engine, region, offset, nbytes
        self.landing = landing
        self.op = None
        self.received = False   # committed (or failed), in channel order
        self.error: BaseException | None = None
        self.claim = self.msg = None  # once claimed: the opener's claim and the message
        self.outcome = None     # once decrypted: True, or what it failed with

    def done(self) -> bool:
        return self.received

    def wait_done(self, timeout) -> bool:
        return self.engine.receive_until(self, timeout)

    def wait(self, timeout=None) -> None:
        """Block until received; raise what it failed with."""
        self.engine.wait_received(self, timeout)


class CCEngine(Engine):
    mode = "cc"

    def __init__(self, device, *, timeout: float | None, chunk_size: int, bounce_bytes: int,
                 rotate_after: int, window: int = 0):
        self.device, self.timeout, self.chunk_size = device, timeout, chunk_size
        mine = KeyAgreement()
        self.session, device_public = device.open_session(mine.public_bytes, rotate_after=rotate_after,
                                                          window=window)
        keys = mine.derive(device_public, session=self.session, host_public=mine.public_bytes,
                           device_public=device_public)
        self.sealer = Sealer(keys, Direction.H2D, rotate_after)
        self.opener = Opener(keys, Direction.D2H, rotate_after)
        self._device_session = device._session(self.session)  # the device's end (its failure)
        # everything failure() reads, each with a ``failure`` that is None while all is
        # well (_fail closes the sealer too): a request reads these in C and calls
        # failure() only when one is set
        self.failure_sources = (self.sealer, self.opener, device, self._device_session)
        self._pinned: list = []
        self.pool = self.pinned_pool("bounce_bytes", bounce_bytes, chunk_size + TAG_BYTES)
        self._staging_free: list[memoryview] = []  # see _take_staging
        self._h2d_lock = Lock()  # (taken in C by the speculative request path)
        self._d2h_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._committed = threading.Condition(self._recv_lock)  # a chunk was received
        self._commit_waiters = 0  # threads waiting on it (recv lock held to change)
        self._claimed: deque[_Incoming] = deque()  # claimed d2h chunks, received in this order
        # threads waiting to receive themselves: a background receiver (pipellm's workers)
        # hands over to them between chunks rather than make them wait for all it took on
        self._recv_waiters = 0
        self._recv_waiters_lock = threading.Lock()
        self._inbox: deque = deque()        # d2h messages as the link delivered them
        self._expected: deque[_Incoming] = deque()  # d2h chunks in the order they were sent
        self._failure: BaseException | None = None
        self.failure_reported = False  # has a caller seen the failure raised?
        self.order = 0  # the number of the current host-to-device request (see the protocol)
        self.window = window
        # the flags the next transfer's first message carries: ABANDON once a transfer
        # failed part-way (window order; strict order needs none), until one is sent
        self.abandon = 0

    # -- host to device --------------------------------------------------------------------
    def to_device(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        with self._h2d_lock:
            self.order += 1
            self.send_data(region, offset, nbytes, dst, dst_offset, stream)
            self.transfers_h2d += 1
            self.bytes_h2d += nbytes

    def send_data(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        """Encrypt on demand, chunk by chunk, each straight onto the link (h2d lock held)."""
        sealer, chunk, source, order = self.sealer, self.chunk_size, region.view, self.order
        for pos in range(0, nbytes, chunk):
            n = min(chunk, nbytes - pos)
            flags = (FIRST | self.abandon if pos == 0 else 0) | (LAST if pos + n == nbytes else 0)
            try:
                self.send_sealed(self.pool, n, stream, lambda out: sealer.seal_next(
                    Kind.DATA, dst.id, dst_offset + pos, source[offset + pos:offset + pos + n], out, order, flags))
            except BaseException:
                if pos:  # the device holds the first part, uncommitted: the next transfer discards it
                    self.abandon = ABANDON if self.window else 0
                raise
            if pos == 0:
                self.abandon = 0  # (said, by the message now on its way)

    def send_sealed(self, pool, nbytes: int, stream, seal):
        """Take a slot for one message of ``nbytes`` plaintext, ``seal(out)`` into it (the
        index is taken only once the slot is ours, so none is ever skipped), submit it,
        and give the slot back once the device has read it (at once on failure)."""
        slot = pool.acquire(nbytes + TAG_BYTES, self.timeout)
        try:
            msg = seal(slot.view(nbytes + TAG_BYTES))
            op = self.device.submit_messages(stream, self.session, (msg,))
        except BaseException:
            pool.release(slot)
            raise
        pool.retire(slot, op)
        return op

    # -- device to host ---------------------------------------------------------------------
    def to_host(self, src, src_offset, region, offset, nbytes, stream) -> Transfer:
        pool, chunk = self.pool, self.chunk_size
        chunks: list[_Incoming] = []
        landing = _Landing(region, offset, nbytes)
        with self._d2h_lock:
            for pos in range(0, nbytes, chunk):
                n = min(chunk, nbytes - pos)
                try:
                    slot = pool.acquire(n + TAG_BYTES, self.timeout)
                except BaseException:
                    landing.abandoned = True  # what was sent of it is received, never committed
                    raise
                incoming = _Incoming(self, region, offset + pos, n, landing)
                landing.last = incoming
                try:
                    incoming.op = self.device.submit_sealed_read(
                        stream, self.session, src, src_offset + pos, region.id, offset + pos, n,
                        slot.view(n + TAG_BYTES), self.delivered)
                except BaseException:
                    pool.release(slot)
                    landing.abandoned = True  # what was sent of it is received, never committed
                    raise
                self._expected.append(incoming)
                pool.retire(slot, incoming)
                chunks.append(incoming)
            region.incoming = chunks[-1]
            self.transfers_d2h += 1
            self.bytes_d2h += nbytes
        last = chunks[-1]

        def wait(timeout=None):
            self.wait_received(last, timeout, what=f"device-to-host transfer of {nbytes} bytes into {region.name!r}")
            for c in chunks:
                if c.error is not None:
                    self._report(c.error)

        def done() -> bool:  # polling receives what has arrived, without waiting
            return last.received or (last.op.done() and self.receive_until(last, 0))

        return Transfer(nbytes, wait, done)

    def delivered(self, msg) -> None:
        """The link delivered a device-to-host message into its bounce slot (device thread)."""
        self._inbox.append(msg)

    def wait_received(self, incoming: _Incoming, timeout, what: str = "device-to-host chunk") -> None:
        timeout = self.timeout if timeout is None else timeout
        if not self.receive_until(incoming, timeout):
            raise TransferTimeoutError(f"{what} did not complete within {timeout} s")
        if incoming.error is not None:
            self._report(incoming.error)

    def _report(self, error: BaseException):
        if error is self._failure:
            self.failure_reported = True
        raise error

    def receive_until(self, target: _Incoming, timeout) -> bool:
        """Authenticate, decrypt and commit device-to-host chunks in channel order until
        ``target`` is received (or failed). Chunks other threads have claimed are
        decrypted by them meanwhile; this thread claims the next ones up to ``target``.
        False if that took longer than ``timeout``."""
        if target.received:
            return True
        deadline = None
        with self._recv_waiters_lock:
            self._recv_waiters += 1
        try:
            with self._recv_lock:
                while not target.received:
                    if target.claim is None and target.outcome is None and self._expected:
                        chunk = self._claim_head(timeout)  # (the device's op: as long as one may take)
                        if chunk is None:
                            return False
                        self._decrypt_claimed(chunk)
                        continue
                    # every chunk up to the target is claimed: another thread is decrypting
                    start = perf_counter()
                    if deadline is None and timeout is not None:
                        deadline = start + timeout
                    self._commit_waiters += 1
                    try:
                        self._committed.wait(None if deadline is None else max(0.0, deadline - start))
                    finally:
                        self._commit_waiters -= 1
                    if timeline.recording:
                        timeline.span("wait-receive", start, perf_counter())
                    if not target.received and deadline is not None and perf_counter() >= deadline:
                        return False
            return True
        finally:
            with self._recv_waiters_lock:
                self._recv_waiters -= 1

    def _claim_head(self, timeout) -> _Incoming | None:
        """Claim the oldest expected chunk once the device has written it (recv lock
        held): its message checked and its index taken (or what it failed with set as
        its outcome). None on timeout."""
        head = self._expected[0]
        if not head.op.wait_done(timeout):
            return None
        self._expected.popleft()
        self._claimed.append(head)
        if self._failure is not None:
            head.outcome = self._failure
        elif head.op.error is not None:
            head.outcome = head.op.error
        elif not self._inbox:
            head.outcome = IntegrityError(
                f"d2h message {self.opener.next_index} never arrived in its bounce slot; the channel is closed")
        else:
            msg = self._inbox.popleft()
            try:
                claim = self.opener.claim(msg, head.nbytes)
                header = claim.header
                if (header.buffer, header.offset, header.length) != (head.region.id, head.offset, head.nbytes):
                    error = IntegrityError(f"d2h message {claim.index} is not the transfer the host asked for; "
                                           f"the channel is closed")
                    self.opener.close(error)
                    raise error
            except (IntegrityError, ChannelClosedError) as exc:
                head.outcome = exc
            else:
                head.claim, head.msg = claim, msg
                landing = head.landing
                if landing.staging is None:
                    landing.staging = self._take_staging(landing.nbytes)
        return head

    def _decrypt_claimed(self, chunk: _Incoming) -> None:
        """Decrypt a claimed chunk into its transfer's staging with the recv lock
        released (other threads claim and decrypt meanwhile), then commit what is ready."""
        if chunk.outcome is None:
            landing = chunk.landing
            at = chunk.offset - landing.offset
            self._recv_lock.release()
            try:
                self.opener.finish(chunk.claim, chunk.msg.payload, landing.staging[at:at + chunk.nbytes])
                outcome = True
            except BaseException as exc:  # a refusal (the opener closed), or the AES step broke
                outcome = exc
            finally:
                self._recv_lock.acquire()
            chunk.outcome, chunk.claim, chunk.msg = outcome, None, None
        self._commit()

    def _commit(self) -> None:
        """Receive the decrypted chunks at the front of the claim order (recv lock held):
        a transfer lands once the chunk that ends it authenticated and every chunk before
        it did; after a failure, every chunk fails with it."""
        claimed = self._claimed
        while claimed and claimed[0].outcome is not None:
            chunk = claimed.popleft()
            landing = chunk.landing
            ends = landing.ends_with(chunk)
            if chunk.outcome is not True and self._failure is None:
                self._fail(chunk.outcome)
            if self._failure is not None:
                chunk.error = self._failure
            elif ends and not landing.abandoned:
                with landing.region.library_write(landing.offset, landing.nbytes) as view:
                    copy_into(view, landing.staging[:landing.nbytes])
            if (ends or chunk is landing.last and landing.abandoned) and landing.staging is not None:
                self._staging_free.append(landing.staging)
                landing.staging = None
            chunk.received = True
        if self._commit_waiters:
            self._committed.notify_all()

    def _take_staging(self, nbytes: int) -> memoryview:
        """Private memory for one transfer's chunks until it lands: reused from transfers
        that landed (the smallest that fits), else new."""
        free = self._staging_free
        if free and len(free[-1]) >= nbytes:  # (the common case: the one just given back)
            return free.pop()
        fits = [m for m in free if len(m) >= nbytes]
        if fits:
            best = min(fits, key=len)
            free.remove(best)
            return best
        if len(free) > 8:  # keep a few
            free.pop(0)
        return memoryview(bytearray(nbytes))

    # -- lifetime ------------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            self.opener.close(error)
            self.sealer.close(error)

    def failure(self) -> BaseException | None:
        """The error that closed the channel, on either side, if any."""
        if self._failure is None and self.sealer.failure is not None:
            self._fail(self.sealer.failure)  # an on-demand encryption failed: its caller saw it raised
            self.failure_reported = True
        if self._failure is None and self.opener.failure is not None:
            self._fail(self.opener.failure)  # a decryption broke (maybe on a worker): report it
        if self._failure is None:
            device_failure = self.device.failure or self._device_session.failure
            if isinstance(device_failure, (IntegrityError, DeviceError)):
                self._fail(device_failure)
        return self._failure

    def drain(self, timeout) -> None:
        """Receive every expected device-to-host chunk."""
        while self._expected:
            try:
                last = self._expected[-1]
            except IndexError:
                break
            if not self.receive_until(last, timeout):
                raise TransferTimeoutError(f"device-to-host transfers did not complete within {timeout} s")

    def adopt(self, region) -> None:
        """A region was registered."""

    def forget(self, region) -> None:
        """The region is being unregistered."""

    def pinned_pool(self, what: str, nbytes: int, max_message: int, minimum: int = 2):
        """A bounce pool (see make_pool) the device may DMA from directly (pinned for it)."""
        pool = make_pool(what, nbytes, max_message, minimum)
        self.device.pin_host(pool.address, pool.cap_bytes)
        self._pinned.append(pool.address)
        return pool

    def close(self) -> None:
        for address in self._pinned:  # before the pools' memory is unmapped
            self.device.unpin_host(address)
        self._pinned.clear()
        self.device.close_session(self.session)
        error = ChannelClosedError("the pipeline was closed")
        self.sealer.close(error)
        self.opener.close(error)
        with self._recv_lock:
            for incoming in self._expected:
                incoming.error, incoming.received = incoming.error or error, True
            self._expected.clear()
            self._committed.notify_all()  # (whoever waits sees its chunk received)
        self.pool.close()

    def stats(self) -> dict:
        pool = self.pool
        return {"transfers_h2d": self.transfers_h2d, "transfers_d2h": self.transfers_d2h,
                "bytes_h2d": self.bytes_h2d, "bytes_d2h": self.bytes_d2h,
                "messages_h2d": self.sealer.messages, "messages_d2h": self.opener.messages,
                "encrypt_s": self.sealer.aes_s, "decrypt_s": self.opener.aes_s,
                "encrypt_bytes": self.sealer.bytes, "decrypt_bytes": self.opener.bytes,
                "key_rotations": self.sealer.rotations + self.opener.rotations,
                "bounce": {"cap_bytes": pool.cap_bytes, "in_use_bytes": pool.in_use,
                           "high_water_bytes": pool.high_water, "pinned": pool.pinned}}
