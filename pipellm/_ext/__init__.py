"""The datapath's low-level mechanisms (Cython): bounce buffers and their fences, GIL-free
copies, the mutex taken in C, the write guard, the CUDA driver layer and the cuda device's
hot path over it. Nothing here imports the parts above it (channel, devices, pipeline,
predictors); their own C code lives beside them (``channel/_message.pyx``,
``devices/_submission.pyx``, ``pipeline/_request.pyx``, ``_region.pyx``,
``_speculation.pyx``)."""

from .bounce import PAGE_BYTES, BouncePool, Slot
from .memcopy import copy_into

__all__ = ["PAGE_BYTES", "BouncePool", "Slot", "copy_into"]
