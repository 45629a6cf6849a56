"""Bounce buffers (pipellm._ext): page-aligned bounded slots, fences, zero-copy views."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from pipellm import ArgumentError, ChannelClosedError, TransferTimeoutError
from pipellm._ext import PAGE_BYTES, BouncePool, copy_into


class Fence:
    def __init__(self):
        self.event = threading.Event()

    def done(self):
        return self.event.is_set()

    def wait_done(self, timeout):
        return self.event.wait(timeout)


def test_slots_are_whole_pages_and_the_pool_never_exceeds_its_cap():
    pool = BouncePool(3 * PAGE_BYTES + 1)
    assert pool.cap_bytes == 4 * PAGE_BYTES
    a = pool.acquire(PAGE_BYTES + 1)
    assert a.capacity == 2 * PAGE_BYTES
    b, c = pool.acquire(1), pool.acquire(PAGE_BYTES)
    assert pool.high_water == pool.cap_bytes == pool.in_use
    with pytest.raises(TransferTimeoutError, match="no 1-byte bounce slot came free"):
        pool.acquire(1, timeout=0.05)
    for s in (a, b, c):
        pool.release(s)
    assert pool.in_use == 0 and pool.free_bytes == pool.cap_bytes
    with pytest.raises(ArgumentError, match="does not fit"):
        pool.acquire(5 * PAGE_BYTES)
    pool.close()


def test_freed_neighbours_merge_back_into_one_extent():
    pool = BouncePool(8 * PAGE_BYTES)
    slots = [pool.acquire(PAGE_BYTES) for _ in range(8)]
    assert pool.try_acquire(1) is None
    for s in slots[2:6]:   # free the middle, in an order that needs merging both ways
        pool.release(s)
    big = pool.try_acquire(4 * PAGE_BYTES)
    assert big is not None and big.first == 2
    assert pool.try_acquire_many([PAGE_BYTES]) is None          # nothing else is free
    pool.release(big)
    assert pool.try_acquire_many([PAGE_BYTES, 3 * PAGE_BYTES]) is not None
    assert pool.try_acquire_many([PAGE_BYTES]) is None          # all or nothing: none taken above limit


def test_views_are_zero_copy_and_page_aligned():
    import numpy as np
    pool = BouncePool(4 * PAGE_BYTES)
    pool.acquire(10)
    slot = pool.acquire(100)
    view = slot.view(100)
    view[:5] = b"hello"
    assert bytes(slot.view(5)) == b"hello"  # another view sees the same memory
    addr = np.frombuffer(slot.view(8), dtype=np.uint8).ctypes.data
    assert addr % PAGE_BYTES == 0
    del view
    pool.release(slot)
    pool.close()


def test_a_retired_slot_is_reused_only_after_its_fence():
    pool = BouncePool(PAGE_BYTES)
    slot = pool.acquire(100)
    fence = Fence()
    pool.retire(slot, fence)
    with pytest.raises(TransferTimeoutError):
        pool.acquire(100, timeout=0.05)
    threading.Timer(0.05, fence.event.set).start()
    again = pool.acquire(100, timeout=5)
    assert fence.done() and again.first == slot.first
    pool.release(again)


def test_a_fence_that_is_not_finished_is_not_asked_whether_it_is_done():
    class Counted(Fence):
        finished = False
        asked = 0

        def done(self):
            self.asked += 1
            return self.finished

    pool = BouncePool(PAGE_BYTES)
    fence = Counted()
    pool.retire(pool.acquire(100), fence)
    assert pool.try_acquire(1) is None and fence.asked == 0  # the cheap test said "in flight"
    fence.finished = True
    assert pool.try_acquire(1) is not None and fence.asked == 1


def test_slot_misuse_is_refused():
    pool = BouncePool(2 * PAGE_BYTES)
    slot = pool.acquire(PAGE_BYTES)
    with pytest.raises(ArgumentError, match="holds 0..4096"):
        slot.view(PAGE_BYTES + 1)
    pool.release(slot)
    with pytest.raises(ArgumentError, match="already given back"):
        pool.release(slot)
    with pytest.raises(ArgumentError, match="given back"):
        slot.view(1)
    other = BouncePool(PAGE_BYTES)
    with pytest.raises(ArgumentError, match="another pool"):
        pool.release(other.acquire(1))
    with pytest.raises(TypeError):
        type(slot)()
    with pytest.raises(ArgumentError, match="at least one byte"):
        pool.acquire(0)
    pool.close()
    with pytest.raises(ChannelClosedError):
        pool.acquire(1)


def test_bad_pool_sizes():
    with pytest.raises(ArgumentError):
        BouncePool(0)


def test_views_keep_memory_alive_after_close():
    pool = BouncePool(PAGE_BYTES)
    view = pool.acquire(4).view(4)
    pool.close()
    view[:] = b"safe"  # still mapped: unmapping waits for the last view
    assert bytes(view) == b"safe"


def test_copy_into():
    dst = bytearray(8)
    assert copy_into(dst, b"abc") == 3
    assert dst[:3] == b"abc"
    with pytest.raises(ValueError, match="holds 2 bytes"):
        copy_into(bytearray(2), b"abc")
    with pytest.raises(BufferError):
        copy_into(b"readonly", b"x")


def test_refused_mlock_warns_once_and_goes_on_unpinned():
    """RLIMIT_MEMLOCK too small (and no CAP_IPC_LOCK): one PinningWarning, pools work."""
    code = textwrap.dedent("""
        import os, resource, warnings
        from pipellm._ext import BouncePool
        from pipellm import PinningWarning
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)   # drop root: mlock then obeys the limit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pools = [BouncePool(2 << 20) for _ in range(3)]
        s = pools[0].acquire(4); s.view(4)[:] = b"ok!!"
        print(sum(issubclass(w.category, PinningWarning) for w in caught), [p.pinned for p in pools],
              "RLIMIT_MEMLOCK" in str(caught[0].message), bytes(s.view(4)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd="/", env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "[False,", "False,", "False]", "True", "b'ok!!'"]


def test_views_in_garbage_cycles_are_collected_safely():
    """A view of a slot (or of bytes within one) caught in a reference cycle with its slot:
    the collector may clear the slot before it releases the view, and the release must
    still find the pool (it crashed the interpreter when the span's fields were cleared
    first). The pool's memory stays mapped while any view is alive, and unmaps after."""
    import gc
    pool = BouncePool(8 * PAGE_BYTES)
    for i in range(200):
        slot = pool.acquire(PAGE_BYTES)
        box = [slot.view(100 + i), slot, slot.view(PAGE_BYTES)]
        box.append(box)
        pool.release(slot)  # (the views keep the memory mapped, not the slot)
        del slot, box
        if i % 20 == 0:
            gc.collect()
    gc.collect()
    pool.close()  # every view was released: close() unmaps at once
    with pytest.raises(ChannelClosedError):
        pool.acquire(PAGE_BYTES)
