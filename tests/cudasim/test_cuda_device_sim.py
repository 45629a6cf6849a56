"""The cuda device end to end under Numba's CUDA simulator: the pipeline in every mode,
the kernels verifying and decrypting, the adversary refused. Small transfers: the
simulator runs every GPU thread as a Python thread.

With ``PIPELLM_CUDA_DEVICE=fake`` the same tests run the driver path
(``open_device("cuda", path="driver", driver="fake")``) on the fake driver, no GPU or
numba needed (tests/test_gpupath.py starts that run); ``=driver``: the driver path on a GPU."""

import os

import numpy as np
import pytest

PATH = os.environ.get("PIPELLM_CUDA_DEVICE", "numba")
if PATH != "fake":
    pytest.importorskip("numba", reason="numba-cuda is not installed (pip install 'pipellm[cuda]')")
    from numba import cuda as _cuda  # noqa: E402

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not _cuda.is_available():
        pytest.skip("needs a CUDA GPU, or the CUDA simulator in its own process (tests/test_kernels.py starts one)",
                    allow_module_level=True)
pytestmark = pytest.mark.gpu
NUMBA = PATH == "numba"
numba_only = pytest.mark.skipif(not NUMBA, reason="pokes the numba path's batch internals")

import pipellm  # noqa: E402
from pipellm import ChannelClosedError, IntegrityError  # noqa: E402
from pipellm.testing import Adversary  # noqa: E402


def open_cuda(**kw):
    if PATH == "fake":
        return pipellm.open_device("cuda", path="driver", driver="fake", **kw)
    if PATH == "driver":
        return pipellm.open_device("cuda", path="driver", **kw)
    return pipellm.open_device("cuda", **kw)

CHUNK = 256 + 13  # odd: chunks start at offsets the kernels can't use directly
N = 600


def make(dev, mode, **kw):
    extra = {}
    if mode.startswith("pipellm"):
        extra = {"min_speculative_bytes": 0, "iv_order": "window" if mode.endswith("window") else "strict"}
        mode = "pipellm"
    return pipellm.Pipeline(device=dev, mode=mode, chunk_size=CHUNK, bounce_bytes=64 << 10, timeout=60,
                            **extra, **kw)


@pytest.fixture(scope="module")
def dev():
    with open_cuda() as device:
        yield device


def test_the_device_opens_and_names_its_gpu(dev):
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    assert dev.kind == "cuda" and (dev.info()["name"] == "CUDA simulator") == (simulated and NUMBA)
    assert (dev.info()["name"] == "fake driver") == (PATH == "fake")
    buf = dev.alloc(40)
    assert not dev.read(buf).any()
    with pytest.raises(pipellm.ArgumentError, match="outside"):
        dev.read(buf, 30, 20)


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm", "pipellm-window"])
def test_transfers_land_and_come_back(dev, mode):
    rng = np.random.default_rng(3)
    with make(dev, mode) as pipe:
        regions = [pipe.register(pipellm.array(rng.integers(0, 256, N, dtype=np.uint8)), name=f"w{i}")
                   for i in range(3)]
        for _ in range(2):                       # pipellm learns the order and speculates
            for r in regions:
                pipe.to_device(r)
                if mode.startswith("pipellm"):
                    pipe.wait_speculation()
        pipe.to_device(regions[0], 17, 300)      # a span at an odd offset
        pipe.synchronize()
        for r in regions:
            assert np.array_equal(dev.read(r.device_buffer), r.array)
        back = pipe.register(np.zeros(N, np.uint8))
        pipe.to_host(regions[2].device_buffer, back, src_offset=5, offset=9, nbytes=500).wait(60)
        assert np.array_equal(back.array[9:509], regions[2].array[5:505]) and not back.array[:9].any()
        if mode.startswith("pipellm"):
            assert pipe.stats()["hits"] >= 1


class FlipFirst(Adversary):
    def __init__(self, direction):
        self.direction, self.armed = direction, False

    def on_message(self, msg):
        if self.armed and msg.direction == self.direction:
            self.armed = False
            msg.payload[0] ^= 1
        return [msg]


@pytest.mark.parametrize("mode", ["cc", "pipellm"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_a_flipped_bit_is_refused_and_nothing_lands(mode, direction):
    adv = FlipFirst(direction)
    with open_cuda(adversary=adv) as dev:
        pipe = make(dev, mode)
        data = pipellm.array(np.full(N, 1, np.uint8))
        region = pipe.register(data)
        dbuf = pipe.to_device(region)
        pipe.synchronize()
        host = pipe.register(np.full(N, 7, np.uint8))
        adv.armed = True
        with pytest.raises(IntegrityError, match=f"{direction} message"):
            if direction == "h2d":
                pipe.to_device(region, dst=dev.alloc(N))
                pipe.synchronize()
            else:
                pipe.to_host(dbuf, host).wait(60)
        if direction == "d2h":
            assert (host.array == 7).all()
        with pytest.raises(ChannelClosedError):
            pipe.to_device(region)
        pipe.close()
        with make(dev, mode) as fresh:            # a new session works
            dbuf = fresh.to_device(fresh.register(np.full(N, 5, np.uint8)))
            fresh.synchronize()
            assert (dev.read(dbuf) == 5).all()


def test_a_tampered_h2d_message_leaves_its_destination_unchanged():
    adv = FlipFirst("h2d")
    with open_cuda(adversary=adv) as dev:
        with make(dev, "cc") as pipe:
            target = dev.alloc(N)
            before = dev.read(target).copy()
            adv.armed = True
            pipe.to_device(pipe.register(np.full(N, 9, np.uint8)), dst=target)
            with pytest.raises(IntegrityError):
                pipe.synchronize()
            assert np.array_equal(dev.read(target), before)


@numba_only
def test_the_gpu_benchmark_runs(tmp_path):
    """benchmarks/gpu.py end to end at tiny sizes (the figures need a GPU; the code path doesn't)."""
    import json

    from pipellm.benchmarks import gpu
    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["bytes"] for r in result["kernels"]} == set(gpu.QUICK["kernel"])
    assert all(r["matches_cpu"] for r in result["kernels"]) and not result["errors"]
    modes = {(r["mode"], r["workers"]) for r in result["encrypted_h2d"]}
    assert modes == {("cc", 1), ("pipellm", 1), ("pipellm", 2)}


class TamperNth(Adversary):
    """Once armed, applies ``changes[n]`` to the n-th host-to-device message it sees."""

    def __init__(self, changes):
        self.changes, self.armed, self.seen = changes, False, 0

    def on_message(self, msg):
        if self.armed and msg.direction == "h2d":
            self.seen += 1
            change = self.changes.get(self.seen)
            if change is not None:
                change(msg)
        return [msg]


def test_a_refused_message_keeps_its_whole_transfer_out_of_the_batch():
    """One transfer of 5 messages is verified in one batch: the 3rd is tampered with, so
    nothing of the transfer lands (a transfer commits whole or not at all)."""
    def flip(msg):
        msg.payload[7] ^= 0x10

    adv = TamperNth({3: flip})
    with open_cuda(adversary=adv) as dev:
        pipe = make(dev, "cc")
        data = np.arange(5 * CHUNK, dtype=np.uint8)
        target = dev.alloc(5 * CHUNK)
        adv.armed = True
        pipe.to_device(pipe.register(data), dst=target)
        with pytest.raises(IntegrityError, match="h2d message 2 "):
            pipe.synchronize()
        assert not dev.read(target).any()
        pipe.close()


def test_a_transfer_longer_than_the_staging_lands_batch_by_batch():
    """The documented limit of the cuda device's per-transfer commit: a transfer whose
    messages do not fit one verification batch (its staging) is committed batch by
    batch; a refused message keeps out its own batch's part and everything after it."""
    def flip(msg):
        msg.payload[3] ^= 0x04

    adv = TamperNth({5: flip})
    with open_cuda(adversary=adv, staging_bytes=2 * CHUNK) as dev:
        pipe = make(dev, "cc")
        data = np.arange(5 * CHUNK, dtype=np.uint8) | 1
        target = dev.alloc(5 * CHUNK)
        adv.armed = True
        pipe.to_device(pipe.register(data), dst=target)
        with pytest.raises(IntegrityError, match="h2d message 4 "):
            pipe.synchronize()
        got = dev.read(target)  # every batch before the refused message's landed (its own part of it too)
        assert np.array_equal(got[:4 * CHUNK], data[:4 * CHUNK]) and not got[4 * CHUNK:].any()


@numba_only
@pytest.mark.parametrize("refused", [None, 3])
def test_a_transfers_chunks_are_committed_by_one_copy_cut_at_a_refused_one(refused):
    """Chunks back to back both in staging and in their destination (16-byte multiples)
    are committed by one device-to-device copy; a refused chunk leaves the transfer out."""
    def flip(msg):
        msg.payload[1] ^= 0x02

    adv = TamperNth({refused: flip} if refused else {})
    with open_cuda(adversary=adv) as dev:
        runs, copy_run = [], dev._kernels._copy_run
        dev._kernels._copy_run = lambda *run: runs.append(run[1:]) or copy_run(*run)
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=256, bounce_bytes=64 << 10, timeout=60) as pipe:
            data = np.arange(5 * 256, dtype=np.uint8) | 1
            target = dev.alloc(len(data))
            adv.armed = True
            pipe.to_device(pipe.register(data), dst=target)
            if refused:
                with pytest.raises(IntegrityError, match="h2d message 2 "):
                    pipe.synchronize()
            else:
                pipe.synchronize()
        landed = 0 if refused else len(data)
        assert runs == ([(0, 0, landed)] if landed else [])  # (destination offset, staging offset, bytes)
        got = dev.read(target)
        assert np.array_equal(got[:landed], data[:landed]) and not got[landed:].any()


def test_transfers_queued_back_to_back_are_verified_with_one_wait():
    """Four one-message transfers queued while the copy engine is held are verified as
    one batch (one wait for the GPU, not four). The 3rd is tampered with: the first two
    land and succeed, nothing of the 3rd and 4th lands."""
    def flip(msg):
        msg.payload[3] ^= 0x40

    adv = TamperNth({3: flip})
    with open_cuda(adversary=adv) as dev:
        batches = []
        if NUMBA:
            settle = dev._kernels.settle
            dev._kernels.settle = lambda: batches.append(len(dev._kernels._staged)) or settle()
        else:
            launch = dev._path.launch
            dev._path.launch = lambda slot: batches.append(dev._path.h2d.staged) or launch(slot)
        pipe = make(dev, "cc")
        targets = [dev.alloc(CHUNK) for _ in range(4)]
        adv.armed = True
        with dev.paused():
            for i, target in enumerate(targets):
                pipe.to_device(pipe.register(np.full(CHUNK, i + 1, np.uint8)), dst=target)
        with pytest.raises(IntegrityError, match="h2d message 2 "):
            pipe.synchronize()
        assert [b for b in batches if b] == [4]
        got = [dev.read(t) for t in targets]
        assert (got[0] == 1).all() and (got[1] == 2).all() and not got[2].any() and not got[3].any()
        pipe.close()


def test_a_transfer_refused_part_way_leaves_nothing_staged_for_the_next_session():
    """A speculative hit (GO + 3 chunks): the 1st chunk's ciphertext is tampered with (its
    tag check is due when the batch settles) and the 2nd chunk's header names another
    session (refused on arrival). The transfer's batch must be settled or dropped with
    it: left staged, it would be verified with the next session's batch, failing that
    innocent session."""
    def bad_tag(msg):  # the 1st chunk
        msg.payload[0] ^= 1

    def other_session(msg):  # the 2nd chunk's header
        msg.aad[8] ^= 1

    adv = TamperNth({2: bad_tag, 3: other_session})
    with open_cuda(adversary=adv) as dev:
        pipe = make(dev, "pipellm-strict")
        regions = [pipe.register(pipellm.array(np.full(3 * CHUNK, i + 1, np.uint8)), name=f"r{i}") for i in range(2)]
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
                pipe.wait_speculation()
        pipe.synchronize()
        before = pipe.stats()["hits"]
        adv.armed = True
        pipe.to_device(regions[0])
        with pytest.raises(IntegrityError):
            pipe.synchronize()
        assert pipe.stats()["hits"] == before + 1 and adv.seen >= 3  # it was a hit: GO + chunks
        adv.armed = False
        with make(dev, "cc") as other:  # a new session after the failed one: unaffected
            dbuf = other.to_device(other.register(np.full(N, 5, np.uint8)))
            other.synchronize()
            assert (dev.read(dbuf) == 5).all()
        if NUMBA:
            assert dev._kernels._staged == [] and dev._kernels._commits == []
        else:
            assert dev._path.h2d.staged == 0
        pipe.close()


def test_keys_rotating_inside_one_batch():
    """A key per 3 messages: one transfer's batch spans several keys (one launch each)."""
    with open_cuda() as dev:
        with make(dev, "cc", rotate_after=3) as pipe:
            data = np.random.default_rng(9).integers(0, 256, 11 * CHUNK + 5, dtype=np.uint8)
            region = pipe.register(data)
            for _ in range(2):
                pipe.to_device(region)
            pipe.synchronize()
            assert np.array_equal(dev.read(region.device_buffer), data)
            assert pipe.stats()["key_rotations"] >= 7


@numba_only
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="the simulator's refusal")
def test_no_torch_tensor_views_simulator_memory():
    dev = open_cuda()
    try:
        buf = dev.alloc(64)
        with pytest.raises(pipellm.DeviceError, match="simulator's memory is host memory"):
            dev.as_tensor(buf)
    finally:
        dev.close()


@numba_only
def test_driver_copies_are_refused_clearly_on_the_simulator():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("on a GPU the driver copies are measured by benchmarks/gpu.py")
    with pytest.raises(pipellm.ArgumentError, match="needs a real GPU"):
        pipellm.open_device("cuda", copies="driver")
    with pytest.raises(pipellm.ArgumentError, match="copies must be 'numba' or 'driver'"):
        pipellm.open_device("cuda", copies="dma")


class DropOne(Adversary):
    """Once armed, drops the n-th host-to-device message it sees (of ``session`` if given)."""

    def __init__(self, n, session=None):
        self.n, self.session, self.armed, self.seen, self.dropped = n, session, False, 0, None

    def on_message(self, msg):
        from pipellm.channel.protocol import unpack_header
        header = unpack_header(bytes(msg.aad))
        if not self.armed or msg.direction != "h2d" or (self.session is not None and header.session != self.session):
            return [msg]
        self.seen += 1
        if self.seen == self.n:
            self.dropped = header.counter
            return []
        return [msg]


@pytest.mark.parametrize("mode", ["cc", "pipellm-window"])
def test_a_dropped_last_message_fails_the_pipeline_at_synchronize(mode):
    adv = DropOne(3)
    with open_cuda(adversary=adv) as dev:
        pipe = make(dev, mode)
        data = np.arange(3 * CHUNK, dtype=np.uint8) | 1
        target = dev.alloc(3 * CHUNK)
        region = pipe.register(data)
        adv.armed = True
        pipe.to_device(region, dst=target)
        with pytest.raises(IntegrityError, match="never arrived"):
            pipe.synchronize()
        assert adv.dropped is not None
        with pytest.raises(ChannelClosedError):
            pipe.to_device(region, dst=target)
        pipe.close()


def test_a_message_another_pipeline_lost_neither_reaches_nor_holds_up_this_one():
    adv = DropOne(1)
    with open_cuda(adversary=adv) as dev:
        lossy, intact = make(dev, "cc"), make(dev, "cc")
        a = lossy.register(np.full(CHUNK, 1, np.uint8))
        b = intact.register(np.full(CHUNK, 2, np.uint8))
        adv.session, adv.armed = lossy._engine.session, True
        lossy.to_device(a)
        intact.to_device(b)
        intact.synchronize()
        assert (dev.read(b.device_buffer) == 2).all()
        with pytest.raises(IntegrityError, match="never arrived"):
            lossy.synchronize()
        intact.close()
        lossy.close()
