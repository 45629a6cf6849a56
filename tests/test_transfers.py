"""Round trips in every mode: sizes, offsets, chunking, streams, threads, stats."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipellm
from conftest import TIMEOUT, make_pipe, random_bytes

MODES = ["plain", "cc"]


@pytest.fixture(scope="module", params=MODES)
def pipe(request):
    p = make_pipe(request.param, chunk_size=4096 + 13, bounce_bytes=64 << 10)
    yield p
    p.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_spans_round_trip(pipe, data):
    size = data.draw(st.integers(1, 50_000), label="region bytes")
    offset = data.draw(st.integers(0, size - 1), label="offset")
    nbytes = data.draw(st.integers(1, size - offset), label="nbytes")
    host = random_bytes(size, seed=size)
    region = pipe.register(host)
    dbuf = pipe.to_device(region, offset, nbytes)
    back = np.zeros(size, np.uint8)
    back_region = pipe.register(back)
    host_offset = data.draw(st.integers(0, size - nbytes), label="host offset")
    pipe.to_host(dbuf, back_region, src_offset=offset, offset=host_offset, nbytes=nbytes).wait()
    expected = np.zeros(size, np.uint8)
    expected[offset:offset + nbytes] = host[offset:offset + nbytes]
    assert np.array_equal(pipe.device.read(dbuf), expected)  # only the span was written
    assert np.array_equal(back[host_offset:host_offset + nbytes], host[offset:offset + nbytes])
    assert not back[:host_offset].any() and not back[host_offset + nbytes:].any()
    pipe.unregister(region)
    pipe.unregister(back_region)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, 15, 16, 17, 4095, (1 << 20) + 7, 64 << 20])
def test_sizes_round_trip_default_chunks(mode, size):
    with pipellm.Pipeline(device="emulated", mode=mode, timeout=60) as pipe:
        host = random_bytes(size, seed=size)
        region = pipe.register(host)
        dbuf = pipe.to_device(region)
        back = np.empty_like(host)
        pipe.to_host(dbuf, pipe.register(back)).wait()
        assert np.array_equal(back, host)
        stats = pipe.stats()
        expected_messages = 1 if mode == "plain" else -(-size // pipe.chunk_size)
        assert stats["messages_h2d"] == stats["messages_d2h"] == expected_messages
        assert stats["bytes_h2d"] == stats["bytes_d2h"] == size


@pytest.mark.parametrize("mode", MODES + ["pipellm"])
@pytest.mark.parametrize("nbytes", [100, 3 << 20])  # below / above min_speculative_bytes
def test_polling_done_completes_a_device_to_host_transfer(mode, nbytes):
    """``Transfer.done()`` alone (no wait) sees a device-to-host transfer complete: small
    messages are not decrypted in the background, so polling receives them."""
    import time

    with make_pipe(mode, chunk_size=1 << 20, bounce_bytes=8 << 20) as pipe:
        src = pipe.register(random_bytes(nbytes))
        dbuf = pipe.to_device(src)
        sink = pipe.register(np.zeros(nbytes, np.uint8))
        transfer = pipe.to_host(dbuf, sink)
        deadline = time.monotonic() + TIMEOUT
        while not transfer.done():
            assert time.monotonic() < deadline, "done() never became true"
            time.sleep(0.001)
        assert np.array_equal(sink.array, src.array)


def test_dtype_and_shape_survive(device):
    with make_pipe(device=device) as pipe:
        w = np.arange(12, dtype=np.float16).reshape(3, 4)
        dbuf = pipe.to_device(pipe.register(w, name="w"))
        got = device.read(dbuf)
        assert got.dtype == np.float16 and got.shape == (3, 4) and np.array_equal(got, w)


def test_explicit_destination_and_offset(device):
    with make_pipe(device=device) as pipe:
        region = pipe.register(random_bytes(10_000))
        dst = device.alloc(20_000)
        assert pipe.to_device(region, 100, 5000, dst=dst, dst_offset=777) is dst
        got = device.read(dst)
        assert np.array_equal(got[777:5777], region.array[100:5100])
        assert not got[:777].any() and not got[5777:].any()


def test_cc_captures_plaintext_at_request_time(device):
    with make_pipe("cc", device=device) as pipe:
        host = np.full(50_000, 1, np.uint8)
        dbuf = pipe.to_device(pipe.register(host))
        host[:] = 2  # written after to_device returned: must not reach the device
        pipe.synchronize()
        assert (device.read(dbuf) == 1).all()


@pytest.mark.parametrize("mode", MODES)
def test_threads_transfer_concurrently(mode):
    with make_pipe(mode, bounce_bytes=256 << 10) as pipe:
        errors = []

        def worker(k):
            try:
                for i in range(20):
                    host = random_bytes(3000 + 100 * i + k, seed=1000 * k + i)
                    region = pipe.register(host)
                    stream = pipe.stream()
                    dbuf = pipe.to_device(region, stream=stream)
                    back = np.zeros_like(host)
                    pipe.to_host(dbuf, pipe.register(back), stream=stream).wait(TIMEOUT)
                    assert np.array_equal(back, host)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        pipe.synchronize()
        assert pipe.stats()["transfers_h2d"] == pipe.stats()["transfers_d2h"] == 80


@pytest.mark.parametrize("mode", MODES)
def test_stream_order_and_overlap_in_the_model(mode):
    link = pipellm.LinkModel(h2d_bytes_per_s=1e9, d2h_bytes_per_s=1e9, latency_s=0)
    with pipellm.open_device("emulated", link=link) as dev, make_pipe(mode, device=dev, chunk_size=1 << 20,
                                                                       bounce_bytes=8 << 20) as pipe:
        s1, s2 = pipe.stream(), pipe.stream()
        long_compute = dev.compute(200_000, stream=s1)             # 0.2 s on s1
        region = pipe.register(random_bytes(1 << 20))
        pipe.to_device(region, stream=s2)                          # ~1 ms on the link, on s2
        transfer = s2._last
        queued_behind = dev.compute(0, stream=s1)
        transfer.wait(TIMEOUT)
        assert transfer.end < long_compute.end                     # s2 did not wait for s1
        assert transfer.end - long_compute.submit_t >= (1 << 20) / 1e9 * 0.99  # the link took its time
        queued_behind.wait(TIMEOUT)
        assert queued_behind.end >= long_compute.end               # same stream: in order


def test_chunks_go_on_the_link_while_later_ones_are_encrypted():
    """cc: with 2 bounce slots an 8-chunk copy can only finish if early chunks left first;
    in the model, chunk ends are spaced by the link time of one chunk."""
    from pipellm.testing import Adversary

    class Record(Adversary):
        def __init__(self):
            self.ops = []

        def on_message(self, msg):
            self.ops.append(msg._owner)
            return [msg]

    spy = Record()
    link = pipellm.LinkModel(h2d_bytes_per_s=2e9, latency_s=0)
    with pipellm.open_device("emulated", link=link, adversary=spy) as dev, \
            make_pipe("cc", device=dev, chunk_size=1 << 20, bounce_bytes=2 * ((1 << 20) + 4096)) as pipe:
        assert pipe.stats()["bounce"]["cap_bytes"] == 2 * ((1 << 20) + 4096)  # room for 2 chunks
        host = random_bytes(8 << 20)
        dbuf = pipe.to_device(pipe.register(host))
        pipe.synchronize()
        assert np.array_equal(dev.read(dbuf), host)
        ends = [op.end for op in spy.ops]
        assert len(ends) == 8
        assert (np.diff(ends) >= (1 << 20) / 2e9 * 0.99).all()


def test_unregister_frees_the_device_copy(device):
    with make_pipe(device=device) as pipe:
        region = pipe.register(random_bytes(1000), name="x")
        dbuf = pipe.to_device(region)
        assert pipe.region("x") is region
        pipe.unregister(region)
        assert dbuf.freed
        with pytest.raises(pipellm.UnknownRegionError, match="unregistered"):
            pipe.to_device(region)
        with pytest.raises(pipellm.UnknownRegionError, match="no region named 'x'"):
            pipe.region("x")


def test_close_is_idempotent_and_use_after_close_fails():
    pipe = make_pipe()
    region = pipe.register(random_bytes(100))
    pipe.to_device(region)
    pipe.close()
    pipe.close()
    assert pipe.closed and pipe.device.closed  # the pipeline opened it, so it closed it
    with pytest.raises(pipellm.ChannelClosedError, match="pipeline is closed"):
        pipe.to_device(region)


def test_pipeline_leaves_a_shared_device_open(device):
    with make_pipe(device=device) as pipe:
        pipe.to_device(pipe.register(random_bytes(10)))
    assert not device.closed
    with make_pipe(device=device) as pipe:  # a new session on the same device
        dbuf = pipe.to_device(pipe.register(np.full(10, 3, np.uint8)))
        pipe.synchronize()
        assert (device.read(dbuf) == 3).all()


def test_a_device_inherited_by_a_forked_child_refuses_to_wait():
    """A stream's lock may be held by a parent thread that does not exist in the child:
    synchronize() there raises ForkedError rather than wait on it."""
    import os
    with pipellm.open_device("emulated") as dev:
        dev.synchronize()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    dev.synchronize(timeout=1)
                except pipellm.ForkedError:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        dev.synchronize()  # the parent's goes on


def test_fork_with_a_live_pipeline():
    """Serving stacks fork workers: in the child the parent's pipeline refuses clearly (its
    threads are not there) and a new one works; the parent goes on unharmed."""
    import os
    with make_pipe("pipellm") as pipe:
        region = pipe.register(pipellm.array(random_bytes(10_000)), name="w")
        pipe.to_device(region)
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code, never return into pytest
            code = 1
            try:
                try:
                    pipe.to_device(region)
                except pipellm.ForkedError as exc:  # (a ChannelClosedError, precisely)
                    if "before os.fork()" in str(exc) and isinstance(exc, pipellm.ChannelClosedError):
                        code = 2
                pipe.close()  # must not hang
                with make_pipe("cc") as fresh:
                    dbuf = fresh.to_device(fresh.register(np.full(100, 7, np.uint8)))
                    fresh.synchronize()
                    if code == 2 and (fresh.device.read(dbuf) == 7).all():
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pipe.to_device(region)
        pipe.synchronize()
        assert np.array_equal(pipe.device.read(region.device_buffer), region.array)
