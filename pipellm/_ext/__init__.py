"""Compiled parts of the datapath (Cython): bounce buffers and GIL-free copies."""

from .bounce import PAGE_BYTES, BouncePool, Slot
from .memcopy import copy_into

__all__ = ["PAGE_BYTES", "BouncePool", "Slot", "copy_into"]
