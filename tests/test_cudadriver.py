"""The Cython layer over cuda-bindings' cydriver (pipellm._ext.cudadriver)."""

import numpy as np
import pytest

import pipellm

def _build_here():
    """The layer as setup.py builds it where cuda-bindings and the CUDA headers are at
    build time; the test extra brings both (numba-cuda[cu12]) but pip builds pipellm in
    an isolated environment without them, so the test compiles the layer itself."""
    import importlib.util
    import os
    import sys
    import sysconfig
    import tempfile

    pytest.importorskip("Cython", reason="compiling the cydriver layer needs Cython (the test extra has it)")
    from setuptools import Distribution

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("pipellm_setup_helpers", os.path.join(root, "setup.py"))
    if spec is None:
        pytest.skip("setup.py is not beside the tests (an installed copy): the layer cannot be built here")
    helpers = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        spec.loader.exec_module(helpers)  # (its setup() runs only as __main__)
        extensions = helpers.cuda_extension()
    finally:
        os.chdir(cwd)
    if not extensions:
        pytest.skip("the CUDA driver layer needs cuda-bindings' .pxd files and cuda.h (pip install -e '.[test]')")
    out = tempfile.mkdtemp(prefix="pipellm-cudadriver-")
    dist = Distribution({"ext_modules": extensions})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = out, os.path.join(out, "tmp")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cmd.ensure_finalized()
        cmd.run()
    finally:
        os.chdir(cwd)
    path = os.path.join(out, "pipellm", "_ext", "cudadriver" + sysconfig.get_config_var("EXT_SUFFIX"))
    module_spec = importlib.util.spec_from_file_location("pipellm._ext.cudadriver", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["pipellm._ext.cudadriver"] = module
    module_spec.loader.exec_module(module)
    return module


try:
    from pipellm._ext import cudadriver
except ImportError:
    cudadriver = _build_here()


def driver_reason():
    try:
        cudadriver.init()
        return None
    except pipellm.DeviceUnavailableError as exc:
        return str(exc)


REASON = driver_reason()


@pytest.mark.skipif(REASON is None, reason="a CUDA driver is present here")
@pytest.mark.parametrize("call", ["init", "device_count", "Stream", "Event", "register_host", "unregister_host",
                                  "use_primary_context", "table"])
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


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"needs a CUDA driver and GPU: {REASON}")
def test_the_driver_path_on_the_gpu_delivers_and_refuses():
    """pipellm._ext.gpupath on the real driver: the PTX kernels loaded with the parameter
    blocks packed in C; a group delivers, a refused message commits nothing after it."""
    import random

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from numba import cuda

    from pipellm.devices.gpupath import DriverPath
    cc = cuda.get_current_device().compute_capability
    path = DriverPath.real(0, cc=cc, staging_bytes=8 << 20)
    rng = random.Random(0)
    secret = rng.randbytes(32)
    key = path.key(secret)
    plains = [rng.randbytes(n) for n in (1, 4096, (1 << 20) + 7)]
    dsts = [path.driver.alloc(len(p)) for p in plains]
    keep = []
    for i, (plain, dst) in enumerate(zip(plains, dsts)):
        iv, aad = rng.randbytes(12), rng.randbytes(56)
        sealed = bytearray(AESGCM(secret).encrypt(iv, plain, aad))
        if i == 2:
            sealed[-1] ^= 1
        keep.append(sealed)
        assert path.room(len(plain))
        position, _ = path.stage(key, iv, aad, sealed, len(plain))
        path.commit(position, dst, position)
    assert path.result(path.launch(session=0)) == 2
    stream = path.h2d.kernel_stream
    for i, (plain, dst) in enumerate(zip(plains, dsts)):
        back = np.zeros(len(plain), np.uint8)
        path.driver.copy_dtoh(back, dst, stream)
        path.driver.synchronize(stream)
        assert (back.tobytes() == plain) if i < 2 else not back.any()
    path.close()
