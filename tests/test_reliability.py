"""Load, interruption and shutdown under traffic: no hang, correct data, clear errors."""

import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest

import pipellm
from conftest import TIMEOUT, make_pipe

THREADS, TRANSFERS = 8, 1000


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
def test_eight_threads_times_a_thousand_transfers(mode):
    """8 application threads x 1,000 transfers of mixed sizes, both directions; every wait
    has a timeout; every byte checked; the counters add up."""
    sizes = [1, 100, 4096, 5000, 65536, 300_000]
    with make_pipe(mode, chunk_size=64 << 10, bounce_bytes=4 << 20, depth_bytes=4 << 20,
                   timeout=30) as pipe:
        errors, counts = [], [0, 0, 0, 0]
        lock = threading.Lock()

        def work(k):
            try:
                rng = np.random.default_rng(k)
                stream = pipe.stream()
                regions = [pipe.register(pipellm.array(rng.integers(0, 256, n, dtype=np.uint8)), name=f"t{k}.{n}")
                           for n in sizes]
                back = {n: pipe.register(np.zeros(n, np.uint8), name=f"t{k}.back{n}") for n in sizes}
                h2d = d2h = nh = nd = 0
                for i in range(TRANSFERS):
                    r = regions[i % len(sizes)] if rng.random() < 0.8 else regions[rng.integers(len(sizes))]
                    if i % 10 == 9:
                        r.array[0] ^= 1                              # a write now and then
                    dbuf = pipe.to_device(r, stream=stream)
                    h2d, nh = h2d + 1, nh + r.nbytes
                    if i % 4 == 0:
                        pipe.to_host(dbuf, back[r.nbytes], stream=stream).wait(TIMEOUT)
                        d2h, nd = d2h + 1, nd + r.nbytes
                        assert np.array_equal(back[r.nbytes].array, r.array)
                with lock:
                    for j, v in enumerate((h2d, d2h, nh, nd)):
                        counts[j] += v
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "deadlock: a thread never finished"
        assert not errors, errors[:3]
        pipe.synchronize()
        s = pipe.stats()
        assert (s["transfers_h2d"], s["transfers_d2h"]) == (THREADS * TRANSFERS, counts[1]) == (counts[0], counts[1])
        assert (s["bytes_h2d"], s["bytes_d2h"]) == (counts[2], counts[3])
        if mode == "pipellm":
            assert s["hits"] + s["misses"] == s["transfers_h2d"]


def test_keyboard_interrupt_during_a_blocking_wait_leaves_the_pipeline_usable():
    with make_pipe("cc", timeout=10) as pipe:
        region = pipe.register(np.full(4096, 3, np.uint8))
        main = threading.get_ident()
        with pipe.device.paused():
            dbuf = pipe.to_device(region)
            threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                pipe.synchronize()       # waits on the held copy engine until interrupted
            assert time.monotonic() - start < 5
        pipe.synchronize()
        assert (pipe.device.read(dbuf) == 3).all()
        pipe.to_device(region)
        pipe.synchronize()


@pytest.mark.parametrize("mode", ["cc", "pipellm"])
def test_close_during_traffic(mode):
    """close() while other threads are transferring: they stop with a clear error, nothing
    hangs, and the resources go back."""
    pipe = make_pipe(mode, timeout=10)
    regions = [pipe.register(pipellm.array(np.full(20_000, i, np.uint8)), name=f"r{i}") for i in range(4)]
    stop, outcomes = threading.Event(), []

    def traffic():
        try:
            while not stop.is_set():
                for r in regions:
                    pipe.to_device(r)
        except pipellm.ChannelClosedError as exc:
            outcomes.append(exc)
        except BaseException as exc:  # noqa: BLE001
            outcomes.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    pipe.close()
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(e, pipellm.PipellmError) for e in outcomes), outcomes
    assert pipe.closed and pipe.device.closed
    if mode == "pipellm":
        assert not any(t.is_alive() for t in pipe._engine.workers.threads)


def test_open_file_descriptors_stay_flat():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    for _ in range(3):  # warm up lazily opened things
        with make_pipe("pipellm") as pipe:
            pipe.to_device(pipe.register(pipellm.empty(4096, np.uint8)))
    before = fds()
    for _ in range(20):
        with make_pipe("pipellm") as pipe:
            r = pipe.register(pipellm.empty(4096, np.uint8))
            for _ in range(10):
                pipe.to_device(r)
    assert fds() <= before


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
def test_a_device_error_mid_transfer(mode, direction):
    """The device fails for good in the middle of a multi-chunk transfer (an Xid): the
    caller gets a DeviceError naming it, every later call a clear error, nothing hangs,
    host memory is untouched, close() releases everything, a new device works."""
    chunks = 8
    dev = pipellm.open_device("emulated")
    pipe = make_pipe(mode, device=dev, chunk_size=4096)
    data = [np.random.default_rng(i).integers(0, 256, chunks * 4096, dtype=np.uint8) for i in range(3)]
    regions = [pipe.register(pipellm.array(d.copy()), name=f"w{i}") for i, d in enumerate(data)]
    sink = pipe.register(np.zeros(chunks * 4096, np.uint8), name="sink")
    for _ in range(2):  # the pipellm predictor learns the order and speculates
        for r in regions:
            pipe.to_device(r)
            pipe.wait_speculation()
    pipe.synchronize()

    # 3 units of work, then the fault, in the middle of the next 8-chunk transfer (or,
    # for d2h, of the second read: every read is one unit)
    dev.inject_fault(after=3 if direction == "h2d" else 1, reason="Xid 79: fallen off the bus")
    with pytest.raises(pipellm.DeviceError, match="Xid 79"):
        for _ in range(4):
            for r in regions:
                if direction == "h2d":
                    pipe.to_device(r)
                else:
                    pipe.to_host(r.device_buffer, sink).wait(TIMEOUT)
            pipe.synchronize()
    assert dev.failure is not None
    for call in (lambda: pipe.to_device(regions[0]), pipe.synchronize,
                 lambda: pipe.to_host(regions[0].device_buffer, sink)):
        with pytest.raises(pipellm.PipellmError, match="Xid 79"):
            call()
    with pytest.raises(pipellm.DeviceError, match="refuses all work"):
        dev.alloc(16)
    for r, d in zip(regions, data):
        assert np.array_equal(r.array, d)  # the host side lost nothing
    pipe.close()  # the failure was reported: close does not raise it again
    assert pipe.closed
    if mode == "pipellm":
        assert not any(t.is_alive() for t in pipe._engine.workers.threads)
    dev.close()

    with make_pipe(mode) as fresh:  # a new device and session recover
        r = fresh.register(pipellm.array(data[0].copy()))
        fresh.to_device(r)
        fresh.synchronize()
        assert np.array_equal(fresh.device.read(r.device_buffer), data[0])


class InjectedCipherFailure(Exception):
    pass


@pytest.mark.parametrize("nth", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("where", ["encrypt", "decrypt"])
@pytest.mark.parametrize("mode", ["cc", "pipellm"])
def test_an_encryption_or_decryption_that_fails(mode, where, nth, monkeypatch):
    """The n-th AES-GCM call (host or device side, either direction) raises instead of
    finishing. A worker's speculative encryption falls back to on demand; any other
    failure spends an IV the channel can't pass, so that call fails with the error and
    every later one with ChannelClosedError naming it. Never IntegrityError (that would
    blame an attacker), never wrong data, no hang; a new session works."""
    import pipellm.channel.endpoint as endpoint
    name = "seal_into" if where == "encrypt" else "open_into"
    real, calls = getattr(endpoint, name), [0]

    def flaky(*args):
        calls[0] += 1
        if calls[0] == nth:
            raise InjectedCipherFailure(f"{where} call {nth}")
        return real(*args)

    monkeypatch.setattr(endpoint, name, flaky)
    with pipellm.open_device("emulated") as dev:
        extra = {} if mode == "cc" else {"min_speculative_bytes": 0}
        pipe = make_pipe(mode, device=dev, timeout=TIMEOUT, **extra)
        regions = [pipe.register(pipellm.array(np.full(3000, i, np.uint8))) for i in range(3)]
        sink = pipe.register(np.zeros(3000, np.uint8))
        outcomes = []
        for step in range(12):
            r, value = regions[step % 3], step % 3
            try:
                pipe.to_device(r)
                if step % 4 == 3:
                    pipe.to_host(r.device_buffer, sink).wait(TIMEOUT)
                    assert (sink.array == value).all()
                pipe.synchronize()
                assert (dev.read(r.device_buffer) == value).all()
                outcomes.append("ok")
            except (InjectedCipherFailure, pipellm.DeviceError, pipellm.ChannelClosedError) as error:
                outcomes.append(type(error).__name__)
        assert calls[0] >= nth, "the failure was never injected"
        if "ok" in outcomes and outcomes == ["ok"] * len(outcomes):
            assert mode == "pipellm" and pipe.stats()["worker_errors"] == 1, "a failure went unnoticed"
        else:
            first = next(i for i, o in enumerate(outcomes) if o != "ok")
            assert outcomes[first] in ("InjectedCipherFailure", "DeviceError"), outcomes
            assert set(outcomes[first + 1:]) <= {"ChannelClosedError"}, outcomes
            with pytest.raises(pipellm.ChannelClosedError, match=f"{where} call {nth}"):
                pipe.to_device(regions[0])
        pipe.close()
        monkeypatch.setattr(endpoint, name, real)
        with make_pipe(mode, device=dev) as fresh:
            dbuf = fresh.to_device(fresh.register(np.full(3000, 7, np.uint8)))
            fresh.synchronize()
            assert (dev.read(dbuf) == 7).all()


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_bounce_memory_exhausted_in_cc_mode(direction):
    """Every bounce slot is in flight and the device is stalled: the request fails with a
    clear timeout naming the bounce buffer, takes no IV it can't use (the next transfers
    authenticate), and once the device moves everything lands in order."""
    chunk = 4096
    with make_pipe(chunk_size=chunk, bounce_bytes=2 * (chunk + 4096), timeout=0.3) as pipe:
        data = np.arange(5 * chunk, dtype=np.uint8)
        region = pipe.register(data.copy())
        dbuf = pipe.to_device(region)
        pipe.synchronize()
        sink = pipe.register(np.zeros(5 * chunk, np.uint8))
        with pipe.device.paused():
            with pytest.raises(pipellm.TransferTimeoutError, match="bounce slot came free"):
                if direction == "h2d":
                    pipe.to_device(region)            # 5 chunks, 2 slots, nothing completes
                else:
                    pipe.to_host(dbuf, sink)
        pipe.synchronize()
        region.array[:] = data[::-1]
        pipe.to_device(region)
        pipe.synchronize()
        assert np.array_equal(pipe.device.read(dbuf), data[::-1])
        pipe.to_host(dbuf, sink).wait(TIMEOUT)
        assert np.array_equal(sink.array, data[::-1])
        assert pipe.stats()["bounce"]["high_water_bytes"] <= pipe.stats()["bounce"]["cap_bytes"]


@pytest.mark.parametrize("mode,source", [
    ("plain", "device"), ("cc", "device"), ("cc", "device session"), ("cc", "sealer"), ("cc", "opener"),
    ("pipellm", "device"), ("pipellm", "device session"), ("pipellm", "sealer"), ("pipellm", "opener")])
def test_a_failure_of_any_part_of_the_channel_stops_the_next_request(mode, source):
    """A request checks in C that nothing failed (the engine's ``failure_sources``, and
    ``failure()`` only when one of them is set): whichever part failed, the next request
    in either direction raises, naming the cause, and changes nothing on the device."""
    error = (pipellm.DeviceError if source == "device" else pipellm.IntegrityError)(f"the {source} failed")
    with make_pipe(mode) as pipe:
        region = pipe.register(pipellm.array(np.full(5000, 1, np.uint8)))
        pipe.to_device(region)
        pipe.synchronize()
        engine, device = pipe._engine, pipe.device
        if source == "device":
            device.failure = error
        elif source == "device session":
            device._fail_session(engine.channel.device_end, error)
        else:
            getattr(engine.channel, source).close(error)
        region.array[:] = 2
        for request in (lambda: pipe.to_device(region), lambda: pipe.to_host(region.device_buffer, region)):
            with pytest.raises((pipellm.DeviceError, pipellm.IntegrityError, pipellm.ChannelClosedError)) as caught:
                request()
            assert caught.value is error or caught.value.__cause__ is error, caught.value
        device.failure = None  # (to read it back)
        assert (device.read(region.device_buffer) == 1).all()
        assert (region.array == 2).all()


def test_a_plan_that_meets_a_closed_channel_leaves_the_worker_alive():
    """A worker planning when the sealer has just closed (another thread's failure) gets
    ChannelClosedError from the ticket reservation: the plan ends there, the worker
    lives on (close() still finds it to stop), and the next request raises the cause."""
    with make_pipe("pipellm", workers=1, min_speculative_bytes=0) as pipe:
        regions = [pipe.register(pipellm.array(np.full(5000, i, np.uint8))) for i in range(3)]
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
        pipe.synchronize()
        pipe.wait_speculation(TIMEOUT)
        engine = pipe._engine
        with engine._lock:  # the predictor's transfers are no longer queued: a plan admits them
            while engine._items:
                engine._drop(engine._items[0])
        error = pipellm.IntegrityError("the sealer failed")
        engine.channel.sealer.close(error)
        engine._plan_later()
        deadline = time.monotonic() + TIMEOUT  # (wait_speculation() raises: the pipeline failed)
        while (engine._replenish_pending or engine.workers.active) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not engine._replenish_pending and not engine.workers.active, "no worker ran the plan"
        assert all(t.is_alive() for t in engine.workers.threads)
        assert len(engine._items) == 0
        with pytest.raises(pipellm.ChannelClosedError) as caught:
            pipe.to_device(regions[0])
        assert caught.value.__cause__ is error


def test_a_pipeline_dropped_without_close_is_released_with_a_warning():
    """A pipeline is collectable once dropped (its regions and its engine's workers hold
    no strong reference to it): its finalizer warns (ResourceWarning) and releases its
    workers, its session and the device it opened; its regions are unregistered."""
    import gc
    import weakref as weakref_

    def dropped():
        pipe = pipellm.Pipeline(device="emulated", mode="pipellm")
        region = pipe.register(pipellm.array(np.zeros(1 << 20, np.uint8)))
        pipe.to_device(region)
        return weakref_.ref(pipe), region, pipe._engine.workers.threads, pipe.device

    with pytest.warns(ResourceWarning, match="never closed"):
        ref, region, workers, device = dropped()
        gc.collect()
    assert ref() is None and region.owner is None and not region.registered
    for t in workers:
        t.join(10)
    assert not any(t.is_alive() for t in workers) and device.closed


def test_a_closed_pipeline_is_not_released_again():
    """close() detaches the finalizer: collecting a closed pipeline warns of nothing."""
    import gc
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = pipellm.Pipeline(device="emulated", mode="cc")
        pipe.close()
        del pipe
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]


def test_a_device_dropped_without_close_is_collected_and_its_thread_ends():
    """The copy engine's thread holds its device only while doing an op: a device opened
    directly and dropped unclosed is collected, with a warning, and the thread ends; a
    closed one warns of nothing."""
    import gc
    import weakref as weakref_

    def dropped():
        device = pipellm.open_device("emulated")
        device.alloc(1 << 16)
        device.compute(10.0).wait()  # (an op handled: the thread has held the device)
        return weakref_.ref(device), device._thread

    with pytest.warns(ResourceWarning, match="emulated device was never closed"):
        ref, thread = dropped()
        gc.collect()
    thread.join(10)
    assert ref() is None and not thread.is_alive()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        device = pipellm.open_device("emulated")
        device.close()
        del device
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)]
