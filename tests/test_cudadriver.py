"""The Cython layer over cuda-bindings' cydriver (pipellm._ext.cudadriver)."""

import numpy as np
import pytest

import pipellm

cudadriver = pytest.importorskip(
    "pipellm._ext.cudadriver",
    reason="the CUDA driver layer is built only where cuda-bindings and the CUDA headers are present "
           "(pip install -e '.[cuda]' && pip install -e . --no-build-isolation; CI does)")


def driver_reason():
    try:
        cudadriver.init()
        return None
    except pipellm.DeviceUnavailableError as exc:
        return str(exc)


REASON = driver_reason()


@pytest.mark.skipif(REASON is None, reason="a CUDA driver is present here")
@pytest.mark.parametrize("call", ["init", "device_count", "Stream", "Event", "register_host", "unregister_host",
                                  "use_primary_context"])
def test_without_a_driver_every_call_says_why(call):
    args = {"register_host": (0, 4096), "unregister_host": (0,), "use_primary_context": (0,)}.get(call, ())
    with pytest.raises(pipellm.DeviceUnavailableError, match="the CUDA driver could not be loaded"):
        getattr(cudadriver, call)(*args)


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"needs a CUDA driver and GPU: {REASON}")
def test_async_copies_round_trip_through_device_memory_behind_an_event():
    from numba import cuda

    n = (1 << 20) + 37
    device = cuda.device_array(n, np.uint8)        # numba allocates in the primary context
    cudadriver.use_primary_context(0)
    src, back = pipellm.empty(n, np.uint8), pipellm.empty(n, np.uint8)
    src[:] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    for host in (src, back):
        cudadriver.register_host(host.ctypes.data, n)
    try:
        stream, event = cudadriver.Stream(), cudadriver.Event()
        pointer = device.__cuda_array_interface__["data"][0]
        cudadriver.copy_to_device(pointer, src, stream)
        cudadriver.copy_to_host(back, pointer, stream)
        event.record(stream)
        event.synchronize()
        assert event.query() and np.array_equal(back, src)
        stream.close()
        event.close()
        with pytest.raises(pipellm.ArgumentError, match="closed"):
            cudadriver.copy_to_device(pointer, src, stream)
    finally:
        for host in (src, back):
            cudadriver.unregister_host(host.ctypes.data)


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"needs a CUDA driver and GPU: {REASON}")
@pytest.mark.parametrize("mode", ["cc", "pipellm"])
def test_the_cuda_device_with_driver_copies_delivers_the_plaintext(mode):
    dev = pipellm.open_device("cuda", copies="driver")
    try:
        kw = {"min_speculative_bytes": 0} if mode == "pipellm" else {}
        with pipellm.Pipeline(device=dev, mode=mode, chunk_size=1 << 20, **kw) as pipe:
            regions = [pipe.register(pipellm.array(np.random.default_rng(i).integers(0, 256, (3 << 20) + 5,
                                                                                   dtype=np.uint8)))
                       for i in range(3)]
            for _ in range(3):
                for r in regions:
                    pipe.to_device(r)
            pipe.synchronize()
            for r in regions:
                assert np.array_equal(dev.read(r.device_buffer), r.array)
        assert dev.info()["copies"] == "driver"
    finally:
        dev.close()
