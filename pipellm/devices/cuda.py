"""The ``cuda`` device: a real NVIDIA GPU through cuda-python.

Not built yet (see the CUDA device issue); :func:`unavailable_reason` says why it cannot
be opened here, so ``open_device("auto")`` falls back to the emulated device and
``open_device("cuda")`` fails with a clear message.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why the cuda device cannot be opened here (None would mean it can)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return "cuda-bindings is not installed (pip install cuda-bindings)"
    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # no libcuda.so: DynamicLibNotFoundError and friends
        return f"the NVIDIA driver library could not be loaded ({type(exc).__name__}: {exc})"
    if int(err) != 0:
        return f"cuInit failed with {getattr(err, 'name', err)} (no usable NVIDIA driver or GPU)"
    err, count = driver.cuDeviceGetCount()
    if int(err) != 0 or count == 0:
        return "the NVIDIA driver reports no GPU"
    return "pipellm's cuda device is not implemented in this version (only 'emulated' is)"
