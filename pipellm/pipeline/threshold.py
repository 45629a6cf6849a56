"""The speculation threshold from this machine's measured costs (``min_speculative_bytes="auto"``).

Encrypting a predicted transfer ahead saves its request the AES of its bytes, and costs
the pipeline a fixed amount per transfer: a worker task (taking it, sealing into its own
slot) and, at the request, a GO command sealed and sent beside the data. Below some
size that fixed cost is more than the AES it saves; such transfers only keep their place
in the channel's order and are encrypted when requested. The size is where the two
meet, from two measurements made once per process (~10 ms): the channel's cost per
message (a 64-byte message sealed through the library's own sealer: header, IV, the
AES call, the message) and its AES-GCM rate on 1 MiB messages over memory that is not
in cache::

    threshold = rate x (2 x per-message cost)

(one message's cost for the GO, one for the worker's task). On the 2-vCPU dev VM it
comes out at 96-160 KiB: vLLM's KV blocks (224 KiB per layer, K or V, for OPT-30B; 128
KiB for a 4096-wide model) are speculated, a few-KiB input copy is not.

>>> t = speculation_threshold()
>>> MIN_THRESHOLD <= t <= MAX_THRESHOLD and t % 4096 == 0
True
"""

from __future__ import annotations

import functools
import os
from time import perf_counter

import numpy as np

MIN_THRESHOLD = 16 << 10
MAX_THRESHOLD = 1 << 20


@functools.lru_cache(maxsize=None)
def message_costs() -> tuple[float, float]:
    """(AES-GCM bytes per second at 1 MiB over a 32 MiB footprint, seconds per 64-byte
    message through the library's sealer), each the best of several tries."""
    from ..channel import Direction, Kind, Sealer
    from ..channel.keys import SessionKeys

    sealer = Sealer(SessionKeys(os.urandom(32), 0), Direction.H2D, 1 << 30)  # a throwaway key
    big, n = 1 << 20, 32
    src = np.zeros(n * big, np.uint8)
    out = np.empty(big + 16, np.uint8)
    views = [memoryview(src)[i * big:(i + 1) * big] for i in range(n)]
    small_in, small_out = bytes(64), memoryview(bytearray(64 + 16))
    for v in views:  # every page touched once
        sealer.seal_next(Kind.DATA, 0, 0, v, memoryview(out))
    best_big = best_small = float("inf")
    for _ in range(3):
        start = perf_counter()
        for v in views:
            sealer.seal_next(Kind.DATA, 0, 0, v, memoryview(out))
        best_big = min(best_big, (perf_counter() - start) / n)
        start = perf_counter()
        for _ in range(100):
            sealer.seal_next(Kind.DATA, 0, 0, small_in, small_out)
        best_small = min(best_small, (perf_counter() - start) / 100)
    rate = big / max(best_big - best_small, 1e-9)
    return rate, best_small


@functools.lru_cache(maxsize=None)
def speculation_threshold() -> int:
    """Bytes below which a predicted transfer is not encrypted ahead (see the module
    docstring), in whole pages, within [MIN_THRESHOLD, MAX_THRESHOLD]."""
    rate, per_message = message_costs()
    nbytes = int(rate * 2 * per_message) // 4096 * 4096
    return max(MIN_THRESHOLD, min(MAX_THRESHOLD, nbytes))
