"""Write tracking: page protection and the SIGSEGV handler, the explicit API, host memory."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pipellm
from pipellm._ext import writeguard as wg
from conftest import make_pipe


def guarded(nbytes=3 * 4096 + 100):
    array = pipellm.empty(nbytes, np.uint8)
    start = array.__array_interface__["data"][0]
    return array, wg.acquire_entry(start, array.nbytes, True)


def test_empty_is_page_aligned_zeroed_and_library_owned():
    a = pipellm.empty((3, 5), dtype=np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and not a.any()
    assert a.__array_interface__["data"][0] % wg.PAGE_SIZE == 0
    b = pipellm.array([[1, 2], [3, 4]], dtype=np.int16)
    assert b.tolist() == [[1, 2], [3, 4]] and b.dtype == np.int16
    with pytest.raises(pipellm.ArgumentError, match="at least one byte"):
        pipellm.empty(0)


def test_a_write_to_a_protected_region_is_caught_and_proceeds():
    array, entry = guarded()
    token = wg.protect(entry)
    assert token & 1 and wg.state(entry) == token
    faults = wg.fault_count()
    array[5] = 7                                   # faults once, is recorded, lands
    assert array[5] == 7 and wg.state(entry) != token
    assert wg.fault_count() == faults + 1
    array[6] = 8                                   # unprotected now: no more faults
    assert wg.fault_count() == faults + 1
    wg.release_entry(entry)


def test_writes_from_other_threads_are_caught():
    array, entry = guarded()
    token = wg.protect(entry)
    t = threading.Thread(target=lambda: array.__setitem__(slice(8192, 8200), 3))
    t.start()
    t.join()
    assert (array[8192:8200] == 3).all() and wg.state(entry) != token
    wg.release_entry(entry)


def test_kernel_writes_get_efault_unless_marked():
    array, entry = guarded()
    wg.protect(entry)
    r, w = os.pipe()
    os.write(w, b"abc")
    with pytest.raises(OSError) as info:
        os.readv(r, [memoryview(array)[:3]])
    assert info.value.errno == 14  # EFAULT: the kernel does not fault, it refuses
    before = wg.state(entry)
    wg.mark_written(entry)
    assert os.readv(r, [memoryview(array)[:3]]) == 3 and bytes(array[:3]) == b"abc"
    assert wg.state(entry) != before
    wg.release_entry(entry)


def test_region_writing_and_mark_dirty_change_the_token():
    with make_pipe("pipellm") as pipe:
        protected = pipe.register(pipellm.empty(10_000, np.uint8))
        explicit = pipe.register(np.zeros(10_000, np.uint8), tracking="explicit")
        untracked = pipe.register(np.zeros(10_000, np.uint8))
        assert (protected.tracking, explicit.tracking, untracked.tracking) == ("protect", "explicit", "none")
        assert untracked.token() is None and not untracked.unchanged_since(None)
        for region in (protected, explicit):
            token = region.token()
            assert region.unchanged_since(token)
            with region.writing() as arr:
                arr[:4] = 1
            assert not region.unchanged_since(token)
            token = region.token()
            region.mark_dirty()
            assert not region.unchanged_since(token)
        token = protected.token()
        protected.array[0] = 9    # a plain numpy write, caught by the fault handler
        assert not protected.unchanged_since(token)


def test_protect_needs_library_memory():
    with make_pipe("pipellm") as pipe:
        with pytest.raises(pipellm.ArgumentError, match="library-owned memory"):
            pipe.register(np.zeros(100, np.uint8), tracking="protect")
        with pytest.raises(pipellm.ArgumentError, match="tracking must be one of"):
            pipe.register(np.zeros(100, np.uint8), tracking="sometimes")


def test_unregister_makes_pages_writable_again():
    with make_pipe("pipellm") as pipe:
        region = pipe.register(pipellm.empty(10_000, np.uint8))
        r, w = os.pipe()
        os.write(w, b"xyz")
        pipe.unregister(region)
        assert os.readv(r, [memoryview(region._array)[:3]]) == 3  # no EFAULT: unprotected


def test_real_segfaults_still_crash_with_faulthandler():
    """Our handler passes faults that are not ours to the previous handler."""
    code = textwrap.dedent("""
        import faulthandler, ctypes, numpy as np
        faulthandler.enable()
        from pipellm._ext import writeguard as wg
        import pipellm
        a = pipellm.empty(4096, np.uint8)
        e = wg.acquire_entry(a.__array_interface__["data"][0], a.nbytes, True)
        wg.protect(e); a[0] = 1                      # ours: handled
        print("handled", flush=True)
        faulthandler.enable()                         # replaces our handler...
        wg.protect(e); a[0] = 2                      # ...which protect() puts back
        print("handled again", flush=True)
        ctypes.string_at(16)                          # not ours: a real crash
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["handled", "handled again"]
    assert out.returncode != 0 and "Segmentation fault" in out.stderr


def test_regions_sharing_a_page_see_each_others_writes():
    """Two protected regions carved from one buffer share a page: unprotecting one for a
    write must invalidate the other, whose bytes on that page are now writable too."""
    buf = pipellm.empty(16384, np.uint8)
    base = buf.__array_interface__["data"][0]
    a = wg.acquire_entry(base, 6000, True)
    b = wg.acquire_entry(base + 6000, 16384 - 6000, True)
    ta, tb = wg.protect(a), wg.protect(b)
    buf[10] = 1                       # faults in a's range: pages 0-1 become writable
    assert wg.state(a) != ta and wg.state(b) != tb
    tb = wg.protect(b)
    wg.mark_written(a)                # an explicit report on a: b shares page 1 with it
    assert wg.state(b) != tb
    wg.release_entry(a)
    wg.release_entry(b)


def test_a_dropped_region_gives_its_guard_entry_back():
    import gc
    from pipellm.pipeline.region import Region

    gc.collect()  # regions earlier tests left in cycles give their entries back first
    class Owner:  # (a region holds its pipeline weakly: any object that allows it)
        pass

    array = pipellm.empty(4096, np.uint8)
    owner = Owner()
    region = Region(owner, 1, "r", array, "protect")
    index = region.guard
    del region
    gc.collect()
    again = wg.acquire_entry(array.__array_interface__["data"][0], 4096, True)
    assert again == index             # the entry came back to the free list
    wg.release_entry(again)


def _rss_shmem_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_freed_library_memory_goes_back_to_the_system():
    import gc
    gc.collect()
    before = _rss_shmem_kib()
    for _ in range(6):  # 6 x 64 MiB, one at a time: the arena file must not keep them
        a = pipellm.empty(64 << 20, np.uint8)
        a[::4096] = 1
        del a
        gc.collect()
    assert _rss_shmem_kib() - before < 64 << 10


def test_a_library_write_reaches_every_registration_of_the_bytes():
    memory = pipellm.empty(3 * 4096, np.uint8)
    start = memory.__array_interface__["data"][0]
    whole = wg.acquire_entry(start, memory.nbytes, True)
    part = wg.acquire_entry(start + 5000, 100, False)
    apart = wg.acquire_entry(start + 9000, 100, False)
    try:
        tokens = {e: wg.token(e, "protect" if e == whole else "explicit") for e in (whole, part, apart)}
        wg.written(start + 5050, 10, skip=part)             # the region written keeps its own log
        assert not wg.unchanged(whole, tokens[whole])
        assert wg.unchanged(part, tokens[part])
        assert wg.unchanged(apart, tokens[apart])          # other bytes of the same page
        wg.mark_written(apart)                              # a report: every region over the bytes
        assert not wg.unchanged(apart, tokens[apart])
    finally:
        for e in (whole, part, apart):
            wg.release_entry(e)
