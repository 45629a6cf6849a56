"""pipellm mode: a transfer encrypted on demand (a miss) is sealed in pieces by idle
workers beside the requesting thread (pipellm/pipeline/ondemand.py)."""

import os
import time

import numpy as np
import pytest

import pipellm
from pipellm import IntegrityError
from pipellm.channel.protocol import FIRST, LAST, Kind, unpack_header
from pipellm.pipeline.ondemand import MIN_PIECE, pieces
from pipellm.testing import Adversary, IVLedger
from conftest import make_pipe, random_bytes

MiB = 1 << 20


def helped_pipe(device="emulated", **kw):
    # nothing is speculated (a huge threshold): every request is a miss, sealed on demand
    # with the help of every idle worker (on two cores "auto" allows none)
    kw.setdefault("workers", 3)
    kw.setdefault("on_demand_helpers", 3)
    return make_pipe("pipellm", device=device, chunk_size=4 * MiB, bounce_bytes=32 * MiB,
                     min_speculative_bytes=1 << 40, **kw)


def settle(pipe):
    """Let every worker go idle and block (a miss is shared only with idle workers; one
    between its nap and blocking counts as neither for a moment)."""
    deadline = time.monotonic() + 5
    while pipe._engine.board.idle < len(pipe._engine.workers) and time.monotonic() < deadline:
        time.sleep(0.005)


def test_pieces_cover_the_transfer_in_order():
    for nbytes in (2 * MIN_PIECE, 2 * MiB + 123, 9 * MiB):
        for helpers in (1, 3, 15):
            parts = pieces(nbytes, 4 * MiB, helpers)
            assert parts[0][0] == 0 and sum(n for _, n in parts) == nbytes
            assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))
            assert all(n <= 4 * MiB for _, n in parts) and len(parts) >= min(helpers + 1, nbytes // MIN_PIECE)


class Record(Adversary):
    def __init__(self):
        self.headers = []

    def on_message(self, msg):
        if msg.direction == "h2d":
            self.headers.append(unpack_header(msg.aad))
        return [msg]


def test_a_miss_is_sealed_in_pieces_beside_idle_workers_and_lands_whole():
    spy = Record()
    ledger = IVLedger()
    dev = pipellm.open_device("emulated", adversary=spy)
    with ledger.watch(), helped_pipe(device=dev) as pipe:
        data = random_bytes(3 * MiB + 5, seed=1)
        region = pipe.register(pipellm.array(data), name="w")
        for _ in range(4):
            settle(pipe)
            buf = pipe.to_device(region)
            pipe.synchronize()
            assert np.array_equal(dev.read(buf), data)
    dev.close()
    ledger.check()  # no IV twice
    # each transfer in pieces (3 workers idle: 4 hands), in order, FIRST on the first and
    # LAST on the last; which thread sealed which piece is the scheduler's business
    data_msgs = [h for h in spy.headers if h.kind == Kind.DATA]
    assert len(data_msgs) == 4 * len(pieces(3 * MiB + 5, 4 * MiB, 3)) == 16
    for k in range(4):
        transfer = data_msgs[4 * k:4 * k + 4]
        assert [bool(h.flags & FIRST) for h in transfer] == [True, False, False, False]
        assert [bool(h.flags & LAST) for h in transfer] == [False, False, False, True]
        assert [h.offset for h in transfer] == sorted(h.offset for h in transfer)


class TamperSecond(Adversary):
    def __init__(self):
        self.armed, self.seen = False, 0

    def on_message(self, msg):
        if self.armed and msg.direction == "h2d" and unpack_header(msg.aad).kind == Kind.DATA:
            self.seen += 1
            if self.seen == 2:
                msg.payload[0] ^= 1
        return [msg]


def test_a_tampered_piece_refuses_the_whole_transfer():
    bad = TamperSecond()
    dev = pipellm.open_device("emulated", adversary=bad)
    try:
        with helped_pipe(device=dev) as pipe:
            region = pipe.register(pipellm.array(random_bytes(2 * MiB, seed=2)), name="w")
            buf = pipe._device_copy(region)
            settle(pipe)
            bad.armed = True
            with pytest.raises(IntegrityError):
                pipe.to_device(region)
                pipe.synchronize()
            assert not dev.read(buf).any()  # nothing of it landed
            with pytest.raises((IntegrityError, pipellm.ChannelClosedError)):  # the channel stays closed
                pipe.to_device(region)
    finally:
        dev.close()


def test_no_worker_helps_beyond_the_cores_it_would_need():
    spy = Record()
    dev = pipellm.open_device("emulated", adversary=spy)
    try:
        with helped_pipe(device=dev, on_demand_helpers=0) as pipe:   # "auto" on a 2-core host
            assert pipe.stats()["on_demand_helpers"] == 0
            region = pipe.register(pipellm.array(random_bytes(3 * MiB + 5, seed=1)), name="w")
            for _ in range(2):
                settle(pipe)
                pipe.to_device(region)
                pipe.synchronize()
            assert pipe.stats()["helped_pieces"] == 0
    finally:
        dev.close()
    # sealed as cc does: one message per chunk, all on the requesting thread
    assert len([h for h in spy.headers if h.kind == Kind.DATA]) == 2


@pytest.mark.parametrize("bad", [-1, "many", 1.5])
def test_bad_on_demand_helpers_are_refused(bad):
    with pytest.raises((pipellm.ArgumentError, TypeError), match="on_demand_helpers"):
        pipellm.Pipeline(device="emulated", on_demand_helpers=bad)


def test_auto_helpers_leave_the_requesting_thread_and_the_copy_engine_their_cores():
    from pipellm.pipeline.ondemand import spare_cores
    with make_pipe("pipellm") as pipe:
        assert pipe.stats()["on_demand_helpers"] == spare_cores() == max(0, len(os.sched_getaffinity(0)) - 2)
