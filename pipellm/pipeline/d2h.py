"""Device to host over a secure channel: what the cc and pipellm engines receive with.

The device seals each chunk into a bounce slot; the host authenticates and decrypts the
chunks when a caller needs them (``Transfer.wait``, ``synchronize``, reading the region,
or a bounce slot it must reuse), or, in pipellm mode, a worker does in the background.
Chunks are claimed in channel order (each checked against the receiver's own position
and given its index), decrypted on whichever threads are receiving at the time, several
at once, and committed in channel order: a transfer lands in its region only once all
its chunks, and every chunk before them, have authenticated.
"""

from __future__ import annotations

import threading
from collections import deque
from time import perf_counter

from .. import timeline
from .._ext import copy_into
from ..channel.protocol import TAG_BYTES
from ..errors import ChannelClosedError, IntegrityError, TransferTimeoutError
from .transfer import Transfer


class _Landing:
    """A device-to-host transfer: its chunks are staged (in ``staging``, its own memory)
    as they authenticate and land in the region together, once the one that ends it has
    (a refused chunk leaves it untouched, and so does a transfer the host gave up
    part-way: ``abandoned``)."""

    __slots__ = ("region", "offset", "nbytes", "last", "abandoned", "staging", "pending")

    def __init__(self, region, offset, nbytes, before=None):
        self.region, self.offset, self.nbytes = region, offset, nbytes
        self.last = None
        self.abandoned = False
        self.staging: memoryview | None = None
        # (lo, hi): the region's bytes this transfer, and those still pending into the
        # region when it was issued (``before``: the region's last incoming chunk), may
        # yet write. Chunks land in channel order, so the last one's span covers all.
        lo, hi = offset, offset + nbytes
        if before is not None and not before.done():
            other = getattr(before, "landing", None)
            if other is not None and other.region is region:
                lo, hi = min(lo, other.pending[0]), max(hi, other.pending[1])
            else:  # (a copy into an overlapping registration: its range is not ours)
                lo, hi = 0, region.nbytes
        self.pending = (lo, hi)

    def ends_with(self, chunk: _Incoming) -> bool:
        # by position, not by ``last``: a chunk can be received while the chunks after it
        # are still being submitted, and the transfer must not land before they are
        return chunk.offset + chunk.nbytes == self.offset + self.nbytes


class _Incoming:
    """One device-to-host chunk the host expects; the fence of its bounce slot."""

    __slots__ = ("receiver", "op", "region", "offset", "nbytes", "received", "error", "landing", "claim", "msg",
                 "outcome")

    def __init__(self, receiver, region, offset, nbytes, landing):
        self.receiver, self.region, self.offset, self.nbytes = receiver, region, offset, nbytes
        self.landing = landing
        self.op = None
        self.received = False   # committed (or failed), in channel order
        self.error: BaseException | None = None
        self.claim = self.msg = None  # once claimed: the opener's claim and the message
        self.outcome = None     # once decrypted: True, or what it failed with

    def done(self) -> bool:
        return self.received

    def wait_done(self, timeout) -> bool:
        return self.receiver.receive_until(self, timeout)

    def wait(self, timeout=None) -> None:
        """Block until received; raise what it failed with."""
        self.receiver.wait_received(self, timeout)


class Receiver:
    """Device-to-host transfers over ``channel`` (a ``SecureChannel``) in chunks of
    ``chunk_size``, their bounce slots from ``pool``. ``on_delivered(msg)``, if set, is
    told of each message the link delivers (on the device's thread)."""

    def __init__(self, channel, pool, *, chunk_size: int, timeout: float | None):
        self.channel, self.pool = channel, pool
        self.chunk_size, self.timeout = chunk_size, timeout
        self.on_delivered = None
        self._submit_lock = threading.Lock()  # one transfer's chunks submitted at a time
        self.lock = threading.Lock()          # claims and commits, in channel order
        self._committed = threading.Condition(self.lock)  # a chunk was received
        self._commit_waiters = 0  # threads waiting on it (lock held to change)
        self._claimed: deque[_Incoming] = deque()  # claimed chunks, received in this order
        # threads waiting to receive themselves: a background receiver (pipellm's workers)
        # hands over to them between chunks rather than make them wait for all it took on
        self.waiters = 0
        self._waiters_lock = threading.Lock()
        self.inbox: deque = deque()        # messages as the link delivered them
        self.expected: deque[_Incoming] = deque()  # chunks in the order they were sent
        self._staging_free: list[memoryview] = []  # see _take_staging

    def to_host(self, src, src_offset, region, offset, nbytes, stream) -> Transfer:
        """Have the device seal ``src[src_offset:src_offset+nbytes]`` for
        ``region[offset:offset+nbytes]``, chunk by chunk; the transfer to wait on."""
        pool, chunk, device, session = self.pool, self.chunk_size, self.channel.device, self.channel.session
        chunks: list[_Incoming] = []
        with self._submit_lock:
            landing = _Landing(region, offset, nbytes, region.incoming)
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
                    incoming.op = device.submit_sealed_read(stream, session, src, src_offset + pos, region.id,
                                                            offset + pos, n, slot.view(n + TAG_BYTES),
                                                            self.delivered)
                except BaseException:
                    pool.release(slot)
                    landing.abandoned = True  # what was sent of it is received, never committed
                    raise
                self.expected.append(incoming)
                pool.retire(slot, incoming)
                chunks.append(incoming)
            region.incoming = chunks[-1]
        last = chunks[-1]

        def wait(timeout=None):
            self.wait_received(last, timeout, what=f"device-to-host transfer of {nbytes} bytes into {region.name!r}")
            for c in chunks:
                if c.error is not None:
                    self.channel.raise_error(c.error)

        def done() -> bool:  # polling receives what has arrived, without waiting
            return last.received or (last.op.done() and self.receive_until(last, 0))

        return Transfer(nbytes, wait, done)

    def delivered(self, msg) -> None:
        """The link delivered a message into its bounce slot (device thread)."""
        self.inbox.append(msg)
        if self.on_delivered is not None:
            self.on_delivered(msg)

    def wait_received(self, incoming: _Incoming, timeout, what: str = "device-to-host chunk") -> None:
        timeout = self.timeout if timeout is None else timeout
        if not self.receive_until(incoming, timeout):
            raise TransferTimeoutError(f"{what} did not complete within {timeout} s")
        if incoming.error is not None:
            self.channel.raise_error(incoming.error)

    def receive_until(self, target: _Incoming, timeout) -> bool:
        """Authenticate, decrypt and commit chunks in channel order until ``target`` is
        received (or failed). Chunks other threads have claimed are decrypted by them
        meanwhile; this thread claims the next ones up to ``target``. False if that took
        longer than ``timeout``."""
        if target.received:
            return True
        deadline = None
        with self._waiters_lock:
            self.waiters += 1
        try:
            with self.lock:
                while not target.received:
                    if target.claim is None and target.outcome is None and self.expected:
                        chunk = self.claim_head(timeout)  # (the device's op: as long as one may take)
                        if chunk is None:
                            return False
                        self.decrypt_claimed(chunk)
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
            with self._waiters_lock:
                self.waiters -= 1

    def claim_head(self, timeout) -> _Incoming | None:
        """Claim the oldest expected chunk once the device has written it (lock held):
        its message checked and its index taken (or what it failed with set as its
        outcome). None on timeout."""
        head = self.expected[0]
        if not head.op.wait_done(timeout):
            return None
        self.expected.popleft()
        self._claimed.append(head)
        opener, closed_by = self.channel.opener, self.channel.error
        if closed_by is not None:
            head.outcome = closed_by
        elif head.op.error is not None:
            head.outcome = head.op.error
        elif not self.inbox:
            head.outcome = IntegrityError(
                f"d2h message {opener.next_index} never arrived in its bounce slot; the channel is closed")
        else:
            msg = self.inbox.popleft()
            try:
                claim = opener.claim(msg, head.nbytes)
                header = claim.header
                if (header.buffer, header.offset, header.length) != (head.region.id, head.offset, head.nbytes):
                    error = IntegrityError(f"d2h message {claim.index} is not the transfer the host asked for; "
                                           f"the channel is closed")
                    opener.close(error)
                    raise error
            except (IntegrityError, ChannelClosedError) as exc:
                head.outcome = exc
            else:
                head.claim, head.msg = claim, msg
                landing = head.landing
                if landing.staging is None:
                    landing.staging = self._take_staging(landing.nbytes)
        return head

    def decrypt_claimed(self, chunk: _Incoming) -> None:
        """Decrypt a claimed chunk into its transfer's staging with the lock released
        (other threads claim and decrypt meanwhile), then commit what is ready."""
        if chunk.outcome is None:
            landing = chunk.landing
            at = chunk.offset - landing.offset
            self.lock.release()
            try:
                self.channel.opener.finish(chunk.claim, chunk.msg.payload, landing.staging[at:at + chunk.nbytes])
                outcome = True
            except BaseException as exc:  # a refusal (the opener closed), or the AES step broke
                outcome = exc
            finally:
                self.lock.acquire()
            chunk.outcome, chunk.claim, chunk.msg = outcome, None, None
        self._commit()

    def _commit(self) -> None:
        """Receive the decrypted chunks at the front of the claim order (lock held): a
        transfer lands once the chunk that ends it authenticated and every chunk before
        it did; after a failure, every chunk fails with it."""
        claimed, channel = self._claimed, self.channel
        while claimed and claimed[0].outcome is not None:
            chunk = claimed.popleft()
            landing = chunk.landing
            ends = landing.ends_with(chunk)
            if chunk.outcome is not True and channel.error is None:
                channel.fail(chunk.outcome)
            if channel.error is not None:
                chunk.error = channel.error
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

    def drain(self, timeout) -> None:
        """Receive every expected chunk."""
        while self.expected:
            try:
                last = self.expected[-1]
            except IndexError:
                break
            if not self.receive_until(last, timeout):
                raise TransferTimeoutError(f"device-to-host transfers did not complete within {timeout} s")

    def close(self, error: BaseException) -> None:
        """Every chunk still expected fails with ``error`` (whoever waits sees it received)."""
        with self.lock:
            for incoming in self.expected:
                incoming.error, incoming.received = incoming.error or error, True
            self.expected.clear()
            self._committed.notify_all()
