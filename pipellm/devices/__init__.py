"""Devices: where ciphertext goes. ``emulated`` (embedded, the default without a GPU) and
``cuda`` (a real NVIDIA GPU)."""

from __future__ import annotations

from ..errors import ArgumentError, ArgumentTypeError, DeviceUnavailableError
from .base import Device, DeviceBuffer, Op, Stream
from .emulated import EmulatedDevice, LinkModel
from .cuda import CudaDevice, unavailable_reason as cuda_unavailable_reason

KINDS = ("auto", "emulated", "cuda")


def open_device(kind: str | Device = "auto", **options) -> Device:
    """Open a device by kind.

    ``"emulated"``: the embedded confidential-GPU model (options: ``adversary``,
    ``link``, ``memory_bytes``). ``"cuda"``: an NVIDIA GPU, or Numba's CUDA simulator
    (options: ``device_id``, ``adversary``, ``staging_bytes``, ``copies="numba"|"driver"``:
    staging copies through numba or the Cython cydriver layer). ``"auto"``: the emulated
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
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"cannot open the cuda device: {reason}")
        return CudaDevice(**options)
    if kind == "auto":
        return EmulatedDevice(**options)
    raise ArgumentError(f"unknown device {kind!r}; expected one of {', '.join(KINDS)}")


__all__ = ["KINDS", "CudaDevice", "Device", "DeviceBuffer", "EmulatedDevice", "LinkModel", "Op", "Stream",
           "cuda_unavailable_reason", "open_device"]
