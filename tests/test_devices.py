"""Device selection, the cuda device's availability report, the emulated link model."""

import time

import numpy as np
import pytest

import pipellm
from pipellm.devices import cuda_unavailable_reason
from pipellm.devices.emulated import EmulatedDevice


def test_auto_falls_back_to_emulated_and_says_why_cuda_is_unavailable():
    reason = cuda_unavailable_reason()
    with pipellm.open_device("auto") as dev:
        assert isinstance(dev, EmulatedDevice)
    if reason is None:  # a GPU machine (benchmarks/gpu_check.sh): the cuda device opens
        with pipellm.open_device("cuda") as dev:
            assert dev.kind == "cuda"
        return
    assert isinstance(reason, str) and reason
    with pytest.raises(pipellm.DeviceUnavailableError, match="cannot open the cuda device: .+"):
        pipellm.open_device("cuda")


def test_a_device_instance_passes_through(device):
    assert pipellm.open_device(device) is device
    with pytest.raises(pipellm.ArgumentError, match="already open"):
        pipellm.open_device(device, link=pipellm.LinkModel())


def test_link_model_times_a_copy():
    link = pipellm.LinkModel(h2d_bytes_per_s=1e9, d2h_bytes_per_s=2e9, latency_s=1e-3)
    with pipellm.open_device("emulated", link=link) as dev:
        buf = dev.alloc(1_000_000)
        src = memoryview(np.ones(1_000_000, np.uint8))
        op_in = dev.submit_copy_in(dev.default_stream, src, buf, 0)
        op_in.wait(5)
        assert op_in.end - op_in.submit_t == pytest.approx(1e-3 + 1e-3, rel=0.05)
        out = np.zeros(1_000_000, np.uint8)
        op_out = dev.submit_copy_out(dev.default_stream, buf, 0, memoryview(out))
        op_out.wait(5)
        assert op_out.end - max(op_out.submit_t, op_in.end) == pytest.approx(0.5e-3 + 1e-3, rel=0.05)
        assert (out == 1).all()


def test_compute_follows_stream_order(device):
    a = device.compute(1000)
    b = device.compute(2000)
    b.wait(5)
    assert b.end - a.end == pytest.approx(2e-3, rel=1e-6)


def test_device_memory_cap():
    with pipellm.open_device("emulated", memory_bytes=1000) as dev:
        dev.alloc(600)
        with pytest.raises(pipellm.DeviceError, match="out of device memory"):
            dev.alloc(600)


def test_closed_device_refuses(device):
    device.close()
    device.close()
    with pytest.raises(pipellm.ChannelClosedError, match="closed"):
        device.alloc(10)
    with pytest.raises(pipellm.ChannelClosedError):
        pipellm.Pipeline(device=device, mode="cc")


def test_emulation_stall_is_accounted():
    """A slow link model: the copy engine's CPU work finishes first, so no stall."""
    link = pipellm.LinkModel(h2d_bytes_per_s=1e8, latency_s=0)
    with pipellm.open_device("emulated", link=link) as dev, pipellm.Pipeline(device=dev, mode="cc") as pipe:
        pipe.to_device(pipe.register(np.ones(1 << 20, np.uint8)))
        pipe.synchronize()
        stats = pipe.stats()
        assert stats["device_busy_s"] > 0
        assert stats["emulation_stall_s"] < 0.0105 * 0.5  # the modelled 10.5 ms dominated


def test_time_a_task_ran_while_the_clock_stood_still_is_held_as_long_on_the_clock():
    """frozen_s() counts the stall in progress; hold(s) waits s on the device clock."""
    with pipellm.open_device("emulated") as dev:
        before = dev.frozen_s()
        with dev.clock_held():
            t = dev.now()
            time.sleep(0.02)
            assert dev.now() == t
            assert dev.frozen_s() - before >= 0.02
        frozen = dev.frozen_s() - before
        start = dev.now()
        dev.hold(frozen)
        assert dev.now() - start >= frozen


def test_pipellm_workers_pay_back_the_frozen_time_of_their_tasks(monkeypatch):
    """A worker's task that ran during emulation stall got its time for free in the
    model: the worker waits as long on the device clock afterwards (here every task
    'sees' 0.5 ms of frozen clock; holds come in batches, their overshoot credited)."""
    reads, waited = [0], []

    def fake_frozen(self):
        reads[0] += 1  # read before and after each task (one worker): 0.5 ms per task
        return reads[0] * 0.0005

    real_hold = EmulatedDevice.hold

    def recording_hold(self, seconds):
        start = self.now()
        real_hold(self, seconds)
        waited.append(self.now() - start)

    monkeypatch.setattr(EmulatedDevice, "frozen_s", fake_frozen)
    monkeypatch.setattr(EmulatedDevice, "hold", recording_hold)
    with pipellm.Pipeline(device="emulated", mode="pipellm", chunk_size=4096, workers=1) as pipe:
        regions = [pipe.register(pipellm.empty(16384, np.uint8), name=f"r{i}") for i in range(4)]
        for _ in range(3):
            for r in regions:
                pipe.to_device(r)
            pipe.synchronize()
        pipe.wait_speculation(10)
    owed = reads[0] // 2 * 0.0005
    assert owed > 0.01 and waited
    assert owed - 2e-4 - 1e-9 <= sum(waited) <= owed + 0.01


@pytest.mark.parametrize("mode", ["cc", "pipellm"])
def test_a_pipeline_gives_its_bounce_pools_to_the_device_to_pin_and_takes_them_back(mode):
    """The cuda device registers bounce memory for DMA (pin_host); every pool a pipeline
    maps is offered once and withdrawn at close, while still mapped."""
    class Recording(EmulatedDevice):
        def __init__(self):
            super().__init__()
            self.pinned, self.log = {}, []

        def pin_host(self, address, nbytes):
            assert address and nbytes > 0 and address not in self.pinned
            self.pinned[address] = nbytes
            self.log.append("pin")

        def unpin_host(self, address):
            del self.pinned[address]
            self.log.append("unpin")

    with Recording() as dev:
        pipe = pipellm.Pipeline(device=dev, mode=mode)
        pools = [(pipe._engine.cc if mode == "pipellm" else pipe._engine).pool] + ([pipe._engine.spec_pool, pipe._engine.cmd_pool] if mode == "pipellm" else [])
        assert dev.pinned == {p.address: p.cap_bytes for p in pools}
        pipe.close()
        assert dev.pinned == {} and dev.log.count("unpin") == len(pools)


def test_every_device_says_what_it_can_do_through_the_interface():
    """The pipeline asks a device's capabilities through properties and methods every
    device has (no probing for attributes): a device with none of the copy engine's
    counters or limits answers with the base's defaults."""
    from pipellm.devices.base import Device

    for name in ("max_message_bytes", "stats", "clock_held", "info"):
        assert hasattr(Device, name), name
    with pipellm.open_device("emulated") as dev:  # (its clock_held: the test below)
        assert dev.max_message_bytes > 0 and "emulation_stall_s" in dev.stats()
    assert Device.max_message_bytes is None and Device.stats(None) == {}
    with Device.clock_held(None):
        pass


def test_the_device_clock_stands_still_while_any_stall_lasts():
    """The clock (devices/_clock.pyx) is its own object: it stops while any thread
    stalls (nested stalls count), shuts the gate meanwhile, and its frozen time is the
    sum of the stalls; running, it keeps step with perf_counter."""
    import time
    from time import perf_counter

    from pipellm.devices._clock import DeviceClock
    clock = DeviceClock()
    assert abs(clock.now() - perf_counter()) < 1e-3 and clock.frozen_s() == 0.0 and clock.gate.is_set()
    clock.stall(True)
    clock.stall(True)   # a second thread stalls too
    stopped = clock.now()
    time.sleep(0.02)
    assert clock.now() == stopped and not clock.gate.is_set()
    clock.stall(False)  # one still stalls: the clock stays stopped
    assert clock.now() == stopped and not clock.gate.is_set()
    clock.stall(False)
    assert clock.gate.is_set() and clock.frozen_s() >= 0.02
    before = clock.now()
    time.sleep(0.01)
    assert clock.now() - before >= 0.01 and abs(perf_counter() - clock.frozen_s() - clock.now()) < 1e-3
    with clock.held():
        assert not clock.gate.is_set()
    assert clock.gate.is_set()


def test_every_device_reads_time_from_its_own_clock(device):
    """now(), frozen_s() and the gate are the device's clock's; the emulated device's
    stalls are the clock's (counted in stats())."""
    assert device.gate is device.clock.gate
    with device.clock_held():
        frozen = device.now()
        assert device.now() == frozen and not device.gate.is_set()
    assert device.stats()["emulation_stall_s"] == pytest.approx(device.clock.frozen_s(), abs=1e-3)
