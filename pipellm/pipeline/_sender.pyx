# cython: language_level=3
"""Host to device over a secure channel, as the vanilla driver does it (cc): what the cc
engine sends with, and the pipellm engine with whatever it did not encrypt ahead.

On the calling thread each chunk is encrypted into a bounce slot and handed to the
device at once, so earlier chunks are on the link while later ones are being encrypted.
The sender owns the channel's request order: its ``lock`` lets one request at a time
into the host-to-device channel and ``order`` numbers them (the pipellm engine's
request path takes and bumps both in C).
"""

from pipellm.channel import Kind
from pipellm.channel.protocol import ABANDON, FIRST, LAST, TAG_BYTES


cdef class Sender:
    """``Sender(channel, pool, chunk_size=..., timeout=...)``: messages of at most
    ``chunk_size`` bytes sealed by ``channel``'s sealer into slots of ``pool``."""

    def __init__(self, channel, pool, *, Py_ssize_t chunk_size, timeout):
        self.channel, self.sealer, self.device = channel, channel.sealer, channel.device
        self.session, self.window = channel.session, channel.window
        self.pool, self.chunk_size, self.timeout = pool, chunk_size, timeout
        self.lock = Lock()
        self.order = 0
        # ABANDON once a transfer failed part-way (window order; strict order needs none),
        # until the next transfer's first message says it
        self.abandon = 0

    def send_data(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset, stream) -> None:
        """Encrypt ``region[offset:offset+nbytes]`` for ``dst`` on demand, chunk by
        chunk, each straight onto the link (lock held)."""
        cdef Py_ssize_t pos, n, chunk = self.chunk_size
        sealer, source, order = self.sealer, region.view, self.order
        for pos in range(0, nbytes, chunk):
            n = min(chunk, nbytes - pos)
            flags = (FIRST | self.abandon if pos == 0 else 0) | (LAST if pos + n == nbytes else 0)
            data = source[offset + pos:offset + pos + n]
            try:
                self.send_sealed(self.pool, n, stream, lambda out: sealer.seal_next(
                    Kind.DATA, dst.id, dst_offset + pos, data, out, order, flags))
            except BaseException:
                if pos:  # the device holds the first part, uncommitted: the next transfer discards it
                    self.abandon = ABANDON if self.window else 0
                raise
            if pos == 0:
                self.abandon = 0  # (said, by the message now on its way)

    def send_sealed(self, pool, Py_ssize_t nbytes, stream, seal):
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
