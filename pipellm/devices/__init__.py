"""Devices: where ciphertext goes. ``emulated`` (embedded, the default without a GPU) and
``cuda`` (a real NVIDIA GPU)."""

from __future__ import annotations

from ..errors import ArgumentError, ArgumentTypeError, DeviceUnavailableError
from .base import Device, DeviceBuffer, Op, Stream
from .emulated import EmulatedDevice, LinkModel
from .cuda import CudaDevice, driver_layer as cuda_driver_layer, unavailable_reason as cuda_unavailable_reason

KINDS = ("auto", "emulated", "cuda")


def open_device(kind: str | Device = "auto", **options) -> Device:
    """Open a device by kind.

    ``"emulated"``: the embedded confidential-GPU model (options: ``adversary``,
    ``link``, ``memory_bytes``). ``"cuda"``: an NVIDIA GPU, or Numba's CUDA simulator
    (options: ``device_id``, ``adversary``, ``staging_bytes``, ``copies="numba"|"driver"``:
    staging copies through numba or the Cython cydriver layer; ``path="driver"``: the
    driver path in C instead (``pipellm.devices.cuda_driver``), with ``driver="fake"``
    on the fake driver, no GPU needed). ``"auto"``: the emulated
    device for now (the cuda device is chosen by name until it has been measured on a
    GPU). A :class:`Device` instance is returned as is.

    >>> dev = open_device("emulated"); dev.kind
    'emulated'
    >>> dev.close()
    """
    if isinstance(kind, Device):
        if options:
            raise ArgumentError("options can't be applied to an already open device")
        return kind
    if not isinstance(kind, str):
        raise ArgumentTypeError(f"device must be a name or a Device, got {type(kind).__name__}")
    if kind == "emulated":
        return EmulatedDevice(**options)
    if kind == "cuda":
        path = options.pop("path", "numba")
        if path == "driver":
            return _driver_device(options)
        if path != "numba":
            raise ArgumentError(f"path must be 'numba' or 'driver', got {path!r}")
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"cannot open the cuda device: {reason}")
        return CudaDevice(**options)
    if kind == "auto":
        return EmulatedDevice(**options)
    raise ArgumentError(f"unknown device {kind!r}; expected one of {', '.join(KINDS)}")


def _driver_device(options: dict) -> Device:
    from .cuda_driver import DriverCudaDevice
    if options.get("driver") is None:  # the real driver: numba-cuda (at open) and the cydriver layer
        reason = cuda_unavailable_reason()
        if reason is None and cuda_driver_layer() != "built":
            reason = f"the cydriver layer is {cuda_driver_layer()}"
        if reason is not None:
            raise DeviceUnavailableError(f"cannot open the cuda device: {reason}")
    return DriverCudaDevice(**options)


__all__ = ["KINDS", "CudaDevice", "Device", "DeviceBuffer", "EmulatedDevice", "LinkModel", "Op", "Stream",
           "cuda_unavailable_reason", "open_device"]
