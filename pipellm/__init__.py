"""pipellm: fast confidential host<->GPU transfers for LLM serving.

>>> import numpy as np, pipellm
>>> with pipellm.Pipeline(device="emulated", mode="cc") as pipe:
...     w = pipe.register(np.ones(4096, dtype=np.float32), name="w")
...     dbuf = pipe.to_device(w)
...     pipe.synchronize()
...     float(pipe.device.read(dbuf).sum())
4096.0
"""

from .devices import Device, DeviceBuffer, LinkModel, Stream, open_device
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ChannelClosedError,
    DeviceError,
    DeviceUnavailableError,
    ForkedError,
    IntegrityError,
    KeyExhaustedError,
    NotFittedError,
    PinningWarning,
    DepthWarning,
    PredictorWarning,
    PipellmError,
    TraceError,
    TransferTimeoutError,
    UnknownRegionError,
    UnknownSessionError,
    UsageError,
)
from .hostmem import array, empty, zeros
from .pipeline import Pipeline, Region, Transfer

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "ArgumentTypeError", "ChannelClosedError", "Device", "DeviceBuffer",
    "DeviceError", "DeviceUnavailableError", "ForkedError", "IntegrityError", "KeyExhaustedError", "LinkModel",
    "NotFittedError", "DepthWarning", "Pipeline", "PinningWarning", "PredictorWarning", "PipellmError", "Region", "Stream", "TraceError", "Transfer",
    "TransferTimeoutError", "UnknownRegionError", "UnknownSessionError", "UsageError", "array", "empty", "open_device", "zeros", "__version__",
]
