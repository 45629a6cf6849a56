"""Compiled parts of the datapath (Cython): bounce buffers, GIL-free copies, the
speculative queue's request path, the devices' op submission and the channel's messages."""

from .bounce import PAGE_BYTES, BouncePool, Slot
from .memcopy import copy_into

__all__ = ["PAGE_BYTES", "BouncePool", "Slot", "copy_into"]
