"""The cuda device's driver path (pipellm._ext.gpupath) on the fake driver: bytes delivered,
commits decided on the GPU as the channel's contract says, driver calls per message and
per group, slots reused too early caught, and the fake itself."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipellm.devices.fakedriver import FakeDriver, FakeDriverError
from pipellm.devices.gpupath import DriverPath
from pipellm.errors import ArgumentError, DeviceError
from pipellm.kernels import driverpath

AAD = 56  # the channel's header


def _seal(secret, plain, rng):
    iv, aad = rng.randbytes(12), rng.randbytes(AAD)
    return iv, aad, AESGCM(secret).encrypt(iv, plain, aad)


@pytest.fixture
def fake():
    fake = FakeDriver(seed=7)
    yield fake
    fake.close()


def _path(fake, **kw):
    kw.setdefault("staging_bytes", 1 << 16)
    return DriverPath.fake(fake, **kw)


def _one_key(fake, seed, **kw):
    """A seeded random source, a path, a key's secret and its device tables."""
    rng = random.Random(seed)
    path = _path(fake, **kw)
    secret = rng.randbytes(32)
    return rng, path, secret, path.key(secret)


_KEEP = []  # staged payloads: their host memory is read when the copy runs, later


def _stage_message(path, key, secret, plain, rng, dst, upto=None):
    iv, aad, sealed = _seal(secret, plain, rng)
    _KEEP.append(sealed)
    assert path.room(len(plain))
    position, _ = path.stage(key, iv, aad, sealed, len(plain))
    if dst is not None:
        path.commit(position, dst, position if upto is None else upto)
    return position


@pytest.mark.parametrize("seed", range(4))
def test_groups_deliver_every_byte(fake, seed):
    """Random sizes (0 to 20 KiB, staging 64 KiB: the ring wraps), several keys in a group,
    several groups in flight before their outcomes are read."""
    rng = random.Random(seed)
    path = _path(fake)
    secrets = [rng.randbytes(32) for _ in range(3)]
    expected, groups = [], []
    for _ in range(12):
        for _ in range(rng.randrange(1, 5)):
            size = rng.choice([0, 1, 15, 16, 17, 4096, rng.randrange(1, 20 << 10)])
            secret = rng.choice(secrets)
            key = path.key(secret)
            plain = rng.randbytes(size)
            dst = path.driver.alloc(size)
            if not path.room(size):
                groups.append(path.launch(session=0))
            _stage_message(path, key, secret, plain, rng, dst)
            expected.append((dst, plain))
        groups.append(path.launch(session=0))
        if rng.random() < 0.4:  # sometimes read outcomes late
            while groups:
                assert path.result(groups.pop(0)) == -1
    for group in groups:
        assert path.result(group) == -1
    fake.drain()
    for dst, plain in expected:
        assert bytes(fake.view(dst, len(plain))) == plain
    path.close()


def test_a_refused_message_commits_what_came_before_and_nothing_after(fake):
    rng, path, secret, key = _one_key(fake, 1)
    plains = [rng.randbytes(1000) for _ in range(3)]
    dsts = [path.driver.alloc(1000) for _ in range(5)]
    _stage_message(path, key, secret, plains[0], rng, dsts[0])
    iv, aad, sealed = _seal(secret, plains[1], rng)
    tampered = bytearray(sealed)
    tampered[5] ^= 1
    assert path.room(1000)
    bad, _ = path.stage(key, iv, aad, tampered, 1000)
    path.commit(bad, dsts[1], bad)
    _stage_message(path, key, secret, plains[2], rng, dsts[2])
    first = path.launch(session=3)
    # queued before the host can know of the refusal: must commit nothing
    _stage_message(path, key, secret, plains[0], rng, dsts[3])
    second = path.launch(session=3)
    # another session is not affected
    _stage_message(path, key, secret, plains[0], rng, dsts[4])
    other = path.launch(session=4)
    assert path.result(first) == 1
    assert path.result(second) == -1  # its own messages verified ...
    assert path.result(other) == -1
    fake.drain()
    assert bytes(fake.view(dsts[0], 1000)) == plains[0]
    for dst in dsts[1:4]:  # ... but the session's flag held its commit back
        assert not fake.view(dst, 1000).any()
    assert bytes(fake.view(dsts[4], 1000)) == plains[0]
    path.close()


def test_a_transfer_is_committed_all_or_nothing(fake):
    rng, path, secret, key = _one_key(fake, 2)
    dst = path.driver.alloc(3000)
    positions = []
    for i in range(3):
        iv, aad, sealed = _seal(secret, bytes([i + 1]) * 1000, rng)
        if i == 2:
            sealed = sealed[:-1] + bytes([sealed[-1] ^ 0x80])
        _KEEP.append(sealed)
        assert path.room(1000)
        positions.append(path.stage(key, iv, aad, sealed, 1000)[0])
    for i, position in enumerate(positions):  # each chunk commits only if the last verified
        path.commit(position, dst + 1000 * i, positions[-1])
    assert path.result(path.launch(session=0)) == 2
    fake.drain()
    assert not fake.view(dst, 3000).any()
    path.close()


def test_a_slot_reused_before_its_copy_ran_is_caught(fake):
    """The fake copies host bytes when the copy runs: rewriting a staged message's memory
    before its group's ``copied`` event passed delivers other bytes, which fail the tag."""
    rng, path, secret, key = _one_key(fake, 3)
    plain = rng.randbytes(2048)
    dst = path.driver.alloc(2048)
    iv, aad, sealed = _seal(secret, plain, rng)
    slot = bytearray(sealed)
    assert path.room(2048)
    position, _ = path.stage(key, iv, aad, slot, 2048)
    path.commit(position, dst, position)
    group = path.launch(session=0)
    slot[:] = bytes(len(slot))  # reused too early
    assert path.result(group) == 0
    assert not fake.view(dst, 2048).any()
    # waiting for ``copied`` first is what makes reuse safe
    slot[:] = sealed
    position, _ = path.stage(key, iv, aad, slot, 2048)
    path.commit(position, dst, position)
    group = path.launch(session=1)
    while not path.h2d.copied(group):
        pass
    slot[:] = bytes(len(slot))
    assert path.result(group) == -1
    fake.drain()
    assert bytes(fake.view(dst, 2048)) == plain
    path.close()


def test_driver_calls_per_message_and_per_group(fake):
    rng = random.Random(4)
    path = _path(fake, staging_bytes=1 << 20)
    secrets = [rng.randbytes(32) for _ in range(2)]
    keys = [path.key(s) for s in secrets]
    dst = path.driver.alloc(8 << 10)
    fake.drain()
    before = fake.calls.copy()
    path_before = dict(path.calls)
    groups, messages = [], 0
    for g in range(6):
        for _ in range(5):
            _stage_message(path, keys[0], secrets[0], rng.randbytes(8 << 10), rng, dst)
            messages += 1
        if g % 2:  # a second key in the group: one more run of three launches
            _stage_message(path, keys[1], secrets[1], rng.randbytes(8 << 10), rng, dst)
            messages += 1
        groups.append(path.launch(session=0))
    spent = fake.calls - before
    assert spent["copy_htod"] == messages + len(groups)  # one per message, the rows per group
    assert spent["launch"] == 6 * 5 + 3 * 3  # ghash, tag, ctr, commit, status; +3 per second key
    assert all(spent[name] == 0 for name in ("event_synchronize", "stream_synchronize"))
    calls = {k: path.calls[k] - path_before[k] for k in path.calls}
    assert calls == {"message": messages, "group": 6 * 9 + 3 * 3, "wait": 0}
    for group in groups:
        assert path.result(group) == -1
    path.close()


def test_bad_input_is_refused_and_changes_nothing(fake):
    rng, path, secret, key = _one_key(fake, 5)
    iv, aad, sealed = _seal(secret, b"x" * 64, rng)
    with pytest.raises(ArgumentError, match="empty group"):
        path.launch(session=0)
    with pytest.raises(ArgumentError, match="12-byte IV"):
        path.stage(key, iv[:8], aad, sealed, 64)
    with pytest.raises(ArgumentError, match="ciphertext and tag"):
        path.stage(key, iv, aad, sealed[:70], 64)
    assert path.h2d.staged == 0
    with pytest.raises(ArgumentError, match="does not fit"):
        path.room(1 << 20)
    with pytest.raises(ArgumentError, match="outside"):
        _stage_message(path, key, secret, b"y" * 64, rng, None)
        path.launch(session=64)
    with pytest.raises(ArgumentError, match="commit of message"):
        path.commit(0, 0x1234, 5)
    assert path.result(path.launch(session=0)) == -1
    path.close()
    path.close()  # idempotent


def test_the_fake_faults_as_a_gpu_would(fake):
    a = fake.mem_alloc(100)
    with pytest.raises(FakeDriverError, match="illegal address"):
        fake.view(a + 90, 20)
    stream, event = fake.stream_create(), fake.event_create()
    fake.event_record(event, stream)
    waiting = fake.stream_create()
    fake.stream_wait_event(waiting, event)
    fake.stream_synchronize(waiting)  # the record runs first: no deadlock
    other = fake.event_create()
    fake.stream_wait_event(stream, other)  # never recorded: nothing to wait for
    fake.stream_synchronize(stream)
    fake.event_record(other, waiting)
    fake.stream_wait_event(waiting, other)  # behind its own record on the same stream: runs
    fake.stream_synchronize(waiting)
    fake.mem_free(a)
    with pytest.raises(FakeDriverError, match="not allocated"):
        fake.mem_free(a)


def test_a_launch_grid_that_misses_work_is_refused(fake):
    path = DriverPath.fake(fake, staging_bytes=1 << 16)
    function = path.driver.load(b"fake", ["ctr_kernel"])[0]
    words = [0] * driverpath.param_words("ctr_kernel")
    with pytest.raises(FakeDriverError, match="malformed"):
        fake.launch(function, (1, 1, 1), (1, 1, 1), 0, path.h2d.kernel_stream, [7] * len(words))
    path.close()


def test_parameter_blocks_match_the_compiled_kernels(tmp_path, monkeypatch):
    """gpupath packs as many 8-byte words as each PTX entry point declares (compiled here
    for sm_90 without a GPU; the fake decodes the same layouts)."""
    pytest.importorskip("numba.cuda", reason="compiling the kernels to PTX needs numba-cuda (the test extra)")
    monkeypatch.setenv("PIPELLM_CACHE", str(tmp_path))
    compiled = driverpath.ptx((9, 0))
    for name in driverpath.NAMES:
        entry, code = compiled[name]
        assert name in entry
        assert driverpath.entry_params(code) == driverpath.param_words(name)
    assert list(tmp_path.iterdir()), "the PTX is cached on disk"
    assert driverpath.ptx((9, 0)) == compiled


def test_transfers_on_the_fake_never_import_numba():
    code = (
        "import os, random, sys\n"
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"
        "from pipellm.devices.fakedriver import FakeDriver\n"
        "from pipellm.devices.gpupath import DriverPath\n"
        "fake = FakeDriver(); path = DriverPath.fake(fake, staging_bytes=1 << 16)\n"
        "secret = os.urandom(32); key = path.key(secret); dst = path.driver.alloc(5000)\n"
        "iv, aad = os.urandom(12), os.urandom(56); plain = os.urandom(5000)\n"
        "sealed = AESGCM(secret).encrypt(iv, plain, aad)\n"
        "assert path.room(5000); p, _ = path.stage(key, iv, aad, sealed, 5000)\n"
        "path.commit(p, dst, p); assert path.result(path.launch(0)) == -1; fake.drain()\n"
        "assert bytes(fake.view(dst, 5000)) == plain\n"
        "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_one_fake_driver_per_process_while_it_is_in_use(fake):
    path = _path(fake)
    with pytest.raises(DeviceError, match="another fake driver is in use"):
        DriverPath.fake(FakeDriver())
    path.close()
    fake.close()
    DriverPath.fake(FakeDriver()).close()  # nothing of the first is left: a new one may take over


@pytest.mark.parametrize("seed", [0, 1])
def test_the_cuda_device_suites_run_on_the_fake_driver(seed):
    """The cuda device's end-to-end tests (every mode, odd sizes and offsets, tampering,
    losses, rotation) and the whole adversary suite, with the driver path on the fake
    driver: the C path, its packing and the GPU-side commit, with no GPU and no numba,
    under two of the fake's schedules."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PIPELLM_CUDA_DEVICE="fake", PIPELLM_TEST_DEVICE="cuda-fake", PIPELLM_FAKE_SEED=str(seed))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(here, "cudasim", "test_cuda_device_sim.py"),
                          os.path.join(here, "test_adversary.py")],
                         env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(here))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last and "error" not in last


def test_the_device_options_are_checked():
    import pipellm
    with pytest.raises(ArgumentError, match="path must be 'numba' or 'driver'"):
        pipellm.open_device("cuda", path="dma")
    with pytest.raises(ArgumentError, match="driver must be None"):
        pipellm.open_device("cuda", path="driver", driver="gpu0")


def _device(fake, **kw):
    import pipellm
    return pipellm.open_device("cuda", path="driver", driver=fake, **kw)


def test_groups_that_fill_up_stay_in_flight_until_the_settle(fake):
    """A 12-message transfer verified in groups of 2: the copy engine launches each group
    as it fills and goes on staging; the GPU is waited for only once everything of the
    transfer was staged (at the settle), and every byte lands."""
    import pipellm
    staged_at_waits, paths = [], []
    for name in ("event_synchronize", "stream_synchronize"):
        real = getattr(fake, name)

        def waiting(handle, real=real):
            staged_at_waits.append(paths[0].calls["message"] if paths else None)
            return real(handle)
        setattr(fake, name, waiting)
    with _device(fake, staging_bytes=1 << 20, group_messages=2) as dev:
        paths.append(dev._path)
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=1000, timeout=30) as pipe:
            data = np.arange(12 * 1000, dtype=np.uint8) | 1
            region = pipe.register(pipellm.array(data))
            target = dev.alloc(len(data))
            before, staged_at_waits[:] = dev._path.calls["message"], []
            pipe.to_device(region, dst=target)
            pipe.synchronize()
            assert dev._path.calls["message"] - before == 12
            assert dev._path.calls["group"] >= 6 * 9
            assert staged_at_waits and all(n == before + 12 for n in staged_at_waits)
            assert np.array_equal(dev.read(target), data)
        paths.clear()


def test_a_refusal_in_a_group_in_flight_keeps_everything_after_it_out(fake):
    import pipellm
    from pipellm.testing import Adversary

    class FlipSixth(Adversary):
        seen = 0

        def on_message(self, msg):
            if msg.direction == "h2d":
                self.seen += 1
                if self.seen == 6:
                    msg.payload[2] ^= 4
            return [msg]
    with _device(fake, staging_bytes=1 << 20, group_messages=2, adversary=FlipSixth()) as dev:
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=1000, timeout=30) as pipe:
            data = np.arange(12 * 1000, dtype=np.uint8) | 1
            target = dev.alloc(len(data))
            pipe.to_device(pipe.register(data), dst=target)
            with pytest.raises(pipellm.IntegrityError, match="h2d message 5 "):
                pipe.synchronize()
            got = dev.read(target)
            # groups [0, 1], [2, 3] and message 4 (what authenticated of the transfer in its
            # group) landed; message 5 was refused, and the GPU's flag kept every later group out
            assert np.array_equal(got[:5000], data[:5000]) and not got[5000:].any()


def test_more_groups_than_the_path_keeps_in_flight(fake):
    import pipellm
    from pipellm._ext.gpupath import MAX_IN_FLIGHT
    with _device(fake, staging_bytes=1 << 20, group_messages=1) as dev:
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=512, timeout=30) as pipe:
            n = 3 * MAX_IN_FLIGHT
            data = np.arange(n * 512, dtype=np.uint8) | 1
            region = pipe.register(pipellm.array(data))
            pipe.to_device(region)
            pipe.synchronize()
            assert np.array_equal(dev.read(region.device_buffer), data)
    with pytest.raises(ArgumentError, match="group_messages"):
        _device(fake, group_messages=0)


def test_compute_is_a_kernel_behind_the_commits_queued_before(fake):
    """compute(us) launches spin_kernel on the kernel stream after the layer's commits and
    waits for it: the op takes at least that long, and the weights are there."""
    import time as clock

    import pipellm
    with _device(fake, staging_bytes=1 << 20) as dev:
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=4096, timeout=30) as pipe:
            stream = pipe.stream()
            data = np.arange(10000, dtype=np.uint8)
            region = pipe.register(pipellm.array(data))
            launches = fake.launches["spin_kernel"]
            pipe.to_device(region, stream=stream)
            start = clock.perf_counter()
            pipe.compute(30000, stream=stream)  # 30 ms
            pipe.synchronize(stream)
            assert clock.perf_counter() - start >= 0.03
            assert fake.launches["spin_kernel"] == launches + 1
            assert np.array_equal(dev.read(region.device_buffer), data)


def test_the_offload_bench_runs_its_layers_on_the_driver_device(fake):
    """benchmarks/offload.py's run on the cuda device's driver path (here over the fake):
    every layer lands (it checks), compute is the GPU's spin kernel."""
    from pipellm.benchmarks import offload
    launches = fake.launches["spin_kernel"]
    with _device(fake, staging_bytes=1 << 20) as dev:
        for mode in ("plain", "cc"):
            r = offload._run(mode, layers=3, layer_bytes=64 << 10, passes=3, compute_us=200, chunk_size=16 << 10,
                             warmup=1, device=dev)
            assert r["time_s"] > 0
    assert fake.launches["spin_kernel"] == launches + 2 * 3 * 3
    with pytest.raises(ArgumentError, match="device must be one of"):
        offload.run(device="tpu")


def test_the_real_driver_says_why_it_is_unavailable(monkeypatch):
    """Without a GPU (or without the cydriver layer built) the real driver path refuses
    with DeviceUnavailableError and a reason, never an ImportError or a loader's error."""
    import sys

    from pipellm._ext.driver import Driver
    from pipellm.errors import DeviceUnavailableError
    try:
        Driver.real(0)
    except DeviceUnavailableError as exc:
        assert "cydriver layer" in str(exc) or "driver" in str(exc)
    else:
        pytest.skip("a CUDA driver is here")
    import pipellm._ext
    monkeypatch.setitem(sys.modules, "pipellm._ext.cudadriver", None)  # as where it was not built
    monkeypatch.delattr(pipellm._ext, "cudadriver", raising=False)
    with pytest.raises(DeviceUnavailableError, match="cydriver layer .* is not built here"):
        Driver.real(0)


def test_abandoning_a_group_gives_its_staging_back(fake):
    rng, path, secret, key = _one_key(fake, 8)
    dst = path.driver.alloc(1000)
    _stage_message(path, key, secret, rng.randbytes(1000), rng, dst)
    group = path.launch(session=0)  # in flight: the ring is not empty
    offsets = []
    for _ in range(2):
        iv, aad, sealed = _seal(secret, rng.randbytes(1000), rng)
        _KEEP.append(sealed)
        assert path.room(1000)
        offsets.append(path.stage(key, iv, aad, sealed, 1000)[1])
    path.h2d.abandon()
    assert path.h2d.staged == 0
    iv, aad, sealed = _seal(secret, rng.randbytes(1000), rng)
    _KEEP.append(sealed)
    assert path.room(1000)
    assert path.stage(key, iv, aad, sealed, 1000)[1] == offsets[0]
    assert path.result(group) == -1
    path.close()


def test_a_message_the_keys_powers_do_not_cover_is_refused_before_anything_is_queued(fake):
    rng, path, secret, key = _one_key(fake, 9)
    n = key.max_bytes() + 16
    iv, aad, sealed = _seal(secret, rng.randbytes(n), rng)
    copies = fake.calls["copy_htod"]
    assert path.room(n)
    with pytest.raises(DeviceError, match="powers grown first"):
        path.h2d.stage(key, iv, aad, sealed, n)
    assert path.h2d.staged == 0 and fake.calls["copy_htod"] == copies
    _KEEP.append(sealed)
    assert path.stage(key, iv, aad, sealed, n)[0] == 0  # DriverPath grows them first
    path.close()


def test_tables_of_keys_no_longer_kept_are_freed_once_nothing_can_read_them(fake):
    path = _path(fake)
    frees = fake.calls["mem_free"]
    for i in range(12):  # the path keeps 8 keys' tables; the older ones go once the path is idle
        path.key(bytes([i]) * 32)
    assert fake.calls["mem_free"] - frees >= 3 * 3  # round keys, H's table, powers of 3+ keys
    path.close()
    assert not fake.in_use()  # and close freed the rest
