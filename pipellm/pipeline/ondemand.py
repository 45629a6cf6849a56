"""pipellm mode: a transfer encrypted on demand (a miss) with the idle workers' help.

cc encrypts a transfer on the requesting thread, one chunk after another. A miss in
pipellm mode has workers that may be idle (nothing predicted, or all of it encrypted
already): the transfer is cut into *pieces* (one message each, at least
:data:`MIN_PIECE` bytes), each idle worker seals one beside the requesting thread, which
seals the first and takes any no worker has started, and the pieces go to the device in
index order, as one submission. The indices are reserved as one run once every piece has
its bounce slot, so none is ever skipped; a piece that fails to seal closes the channel
(its IV may be in shared memory), as on cc's path.

On a host with many cores a miss then costs its bytes' AES divided among the workers (a
first pass the predictor has not learned yet, an MoE layer's unpredicted experts). A
helper needs a core of its own: the requesting thread seals too, and the device's copy
engine thread receives the pieces meanwhile, so by default (:func:`spare_cores`) at most
the cores this process may run on less those two help, none on two cores (where the one
worker helping made misses 8-10% slower than cc's on the replayed traces).
"""

from __future__ import annotations

import os
from time import perf_counter

from .. import timeline
from ..channel import Kind
from ..errors import TransferTimeoutError
from ..channel.protocol import ABANDON, FIRST, LAST, TAG_BYTES
from ._speculation import ENCRYPTING, FAILED, PENDING, READY

#: the least piece: each message has a fixed cost of the library's own work on each
#: side, which a piece must be large enough to dwarf with its AES
MIN_PIECE = 256 << 10


class Piece:
    """One message of a transfer sealed on demand, by a worker or the requesting thread."""

    __slots__ = ("ticket", "buffer", "offset", "source", "out", "order", "flags", "state", "msg", "error", "helped")

    def __init__(self, ticket, buffer: int, offset: int, source, out, order: int, flags: int):
        self.ticket, self.buffer, self.offset, self.source, self.out = ticket, buffer, offset, source, out
        self.order, self.flags = order, flags
        self.state, self.msg, self.error = PENDING, None, None
        self.helped = False  # sealed by a worker


def spare_cores() -> int:
    """The cores this process may run on (its affinity) less two: the requesting
    thread's and the device's copy engine thread's (``Pipeline(on_demand_helpers="auto")``).

    >>> spare_cores() == max(0, len(os.sched_getaffinity(0)) - 2)
    True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        cores = os.cpu_count() or 1
    return max(0, cores - 2)


def pieces(nbytes: int, chunk_size: int, helpers: int) -> list[tuple[int, int]]:
    """(offset, length) of each piece of an ``nbytes`` transfer sealed by ``helpers``
    workers beside the requesting thread: as many as there are hands, at least
    :data:`MIN_PIECE` each, at most ``chunk_size``, in whole 4 KiB pages but the last.

    >>> pieces(2 << 20, 4 << 20, 3)
    [(0, 524288), (524288, 524288), (1048576, 524288), (1572864, 524288)]
    >>> pieces(300 << 10, 4 << 20, 7)
    [(0, 307200)]
    """
    hands = max(1, min(helpers + 1, nbytes // MIN_PIECE))
    size = -(-nbytes // hands)
    size = min(chunk_size, -(-size // 4096) * 4096)
    return [(pos, min(size, nbytes - pos)) for pos in range(0, nbytes, size)]


def seal(engine, piece: Piece) -> None:
    """Seal ``piece`` (its state is ENCRYPTING, set by whoever took it) and publish the result."""
    state = FAILED
    try:
        piece.msg = engine.channel.sealer.seal_into(piece.ticket, Kind.DATA, piece.buffer, piece.offset, piece.source,
                                            piece.out, order=piece.order, flags=piece.flags)
        state = READY
    except BaseException as exc:  # the sealer has closed the channel; the request raises it
        piece.error = exc
    with engine._lock:
        piece.state = state
        engine._notify()


def send(engine, region, offset: int, nbytes: int, dst, dst_offset: int, stream, helpers: int) -> None:
    """Encrypt ``region[offset:offset+nbytes]`` for ``dst`` with ``helpers`` idle workers'
    help and send it (h2d lock held). Batches of pieces fit half the bounce pool, so a
    batch never waits for slots only its own submission would free."""
    parts = pieces(nbytes, engine.chunk_size, helpers)
    sender = engine.sender
    pool, source, order = sender.pool, region.view, sender.order
    batch_bytes = max(parts[0][1], pool.cap_bytes // 2)
    first = 0
    while first < len(parts):
        last, total = first, 0
        while last < len(parts) and (last == first or total + parts[last][1] <= batch_bytes):
            total += parts[last][1]
            last += 1
        batch = parts[first:last]
        slots = []
        try:
            for _, n in batch:
                slots.append(pool.acquire(n + TAG_BYTES, engine.timeout))
        except BaseException:
            for slot in slots:
                pool.release(slot)
            if first:  # the device holds the first part, uncommitted: the next transfer discards it
                sender.abandon = ABANDON if sender.window else 0
            raise
        tickets = sender.sealer.reserve_run(len(batch))
        work = []
        for (pos, n), ticket, slot in zip(batch, tickets, slots):
            flags = (FIRST | sender.abandon if pos == 0 else 0) | (LAST if pos + n == nbytes else 0)
            work.append(Piece(ticket, dst.id, dst_offset + pos, source[offset + pos:offset + pos + n],
                              slot.view(n + TAG_BYTES), order, flags))
        with engine._cond:
            engine.board.tasks.extendleft(reversed(work[1:]))  # ahead of speculation: a request waits
            engine.board.wake(len(work) - 1)
        for piece in work:  # the first, and any no worker has started
            with engine._cond:
                mine = piece.state == PENDING
                if mine:
                    piece.state = ENCRYPTING
            if mine:
                seal(engine, piece)
        waited = perf_counter()
        with engine._cond:
            done = engine._wait_for(lambda: all(p.state in (READY, FAILED) for p in work), engine.timeout)
        if timeline.recording:
            timeline.span("wait-worker", waited, perf_counter())
        failed = next((p.error for p in work if p.state == FAILED), None)
        if failed is not None or not done:
            for piece, slot in zip(work, slots):
                if piece.state != ENCRYPTING:  # a worker still sealing into its slot keeps it
                    pool.release(slot)
            raise failed or TransferTimeoutError(f"a worker did not finish sealing a piece within {engine.timeout} s")
        try:
            op = engine.device.submit_messages(stream, engine.session, [p.msg for p in work])
        except BaseException:
            for slot in slots:
                pool.release(slot)
            raise
        for slot in slots:
            pool.retire(slot, op)
        if first == 0:
            sender.abandon = 0  # (said, by the message now on its way)
        engine.counts["helped_pieces"] += sum(1 for p in work if p.helped)
        first = last
