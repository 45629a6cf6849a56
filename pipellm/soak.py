"""A seeded soak of the pipellm mode (``pipellm soak``): long random runs of host writes,
transfers both ways, mispredictions and key rotations, checked byte for byte.

Each step is drawn from a seeded generator: mostly the next region of a layer loop (the
predictor's easy case), sometimes a pause in which the workers finish encrypting ahead, a
random region or span (a misprediction), a write to host memory the workers may already
have encrypted (it must never reach the device), or a device-to-host copy into a host region (the
library's own write, which must invalidate speculation too). Each transfer is checked
once it has landed against the host bytes at its call, and every ``check_every``
transfers all device copies are compared with a model of what the transfers had to
deliver: every byte that differs is *stale*. An :class:`~pipellm.testing.IVLedger`
watches every ciphertext written into shared memory across key rotations.

>>> report = soak(300, seed=1)
>>> report.ok, report.stale_bytes, report.iv_reuse
(True, 0, 0)
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass
from time import perf_counter

import numpy as np

from .errors import ArgumentError
from .hostmem import array
from .pipeline import Pipeline
from .testing import IVLedger

CHUNK = 1024
SIZES = (CHUNK, 3 * CHUNK + 17, 2 * CHUNK, 5 * CHUNK + 1, 700, 4 * CHUNK)  # protected regions
#: per step: a pause that lets the workers finish what they queued (compute between layers:
#: the next write then hits ciphertext that is ready), a host write, a device-to-host copy,
#: a mispredicted (random) transfer, a sub-span
P_PAUSE, P_WRITE, P_D2H, P_RANDOM, P_SPAN = 0.2, 0.08, 0.05, 0.1, 0.15


@dataclass
class SoakReport:
    """What a soak did and found; ``ok`` when nothing stale, wrong or reused was seen."""

    seed: int
    iv_order: str
    transfers_h2d: int
    transfers_d2h: int
    host_writes: int
    checks: int
    stale_bytes: int        # device bytes that differ from what the transfers had to deliver
    wrong_d2h_bytes: int    # host bytes a device-to-host copy got wrong
    ciphertexts: int        # messages the IV ledger saw written into shared memory
    iv_reuse: int           # (key, counter) pairs written with two different ciphertexts
    key_rotations: int
    hits: int
    misses: int
    skipped_messages: int
    rss_growth_bytes: int   # from the end of the warm-up (the first tenth) to the end; it
                            # includes the IV ledger's records (one per ciphertext)
    fd_growth: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.stale_bytes == 0 and self.wrong_d2h_bytes == 0 and self.iv_reuse == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _rss_bytes() -> int:
    gc.collect()  # garbage of earlier runs would otherwise be counted (or freed) here
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: not measured
        return 0


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class _Soak:
    def __init__(self, pipe: Pipeline, rng: np.random.Generator):
        self.pipe, self.rng = pipe, rng
        self.regions = [pipe.register(array(rng.integers(0, 256, n, dtype=np.uint8)), name=f"layer{i}")
                        for i, n in enumerate(SIZES)]
        self.regions.append(pipe.register(rng.integers(0, 256, 3 * CHUNK, dtype=np.uint8),
                                          name="explicit", tracking="explicit"))
        self.model = {r.name: np.zeros(r.nbytes, np.uint8) for r in self.regions}  # device copies
        self.landing: dict[str, list] = {}  # region -> device-to-host copies not yet checked
        self.h2d = self.d2h = self.writes = self.checks = 0
        self.stale = self.wrong_d2h = 0

    def step(self, i: int) -> None:
        rng, regions = self.rng, self.regions
        if rng.random() < P_PAUSE:
            self.pipe.wait_speculation()
        u = rng.random()
        if u < P_WRITE:
            self.write(regions[rng.integers(len(regions))])
        elif u < P_WRITE + P_D2H:
            self.to_host(regions[rng.integers(len(regions))], regions[rng.integers(len(SIZES))])
        r = regions[i % len(regions)] if rng.random() >= P_RANDOM else regions[rng.integers(len(regions))]
        offset, nbytes = 0, r.nbytes
        if rng.random() < P_SPAN:
            offset = int(rng.integers(r.nbytes))
            nbytes = int(rng.integers(1, r.nbytes - offset + 1))
        dbuf = self.pipe.to_device(r, offset, nbytes)
        # what had to be sent: the host bytes at the call (it waits for copies landing in r)
        sent = self.model[r.name][offset:offset + nbytes]
        sent[:] = r.array[offset:offset + nbytes]
        self.h2d += 1
        self.pipe.synchronize()  # every transfer is checked, before a later one can mend it
        self.stale += int(np.count_nonzero(self.pipe.device.read(dbuf, offset, nbytes) != sent))

    def write(self, r) -> None:
        self.settle(r)
        at, value = int(self.rng.integers(r.nbytes)), int(self.rng.integers(1, 256))
        if r.tracking == "explicit":
            with r.writing() as a:
                a[at] ^= value
        else:
            r.array[at] ^= value  # a plain numpy write: the page fault handler must see it
        self.writes += 1

    def to_host(self, src, dst) -> None:
        if src.device_buffer is None:
            return
        self.settle(dst)
        nbytes = int(self.rng.integers(1, min(src.nbytes, dst.nbytes) + 1))
        offset = int(self.rng.integers(dst.nbytes - nbytes + 1))
        transfer = self.pipe.to_host(src.device_buffer, dst, offset=offset, nbytes=nbytes)
        self.landing.setdefault(dst.name, []).append((transfer, offset, self.model[src.name][:nbytes].copy()))
        self.d2h += 1

    def settle(self, r) -> None:
        """Check the device-to-host copies into ``r`` before anything changes it again."""
        for transfer, offset, expected in self.landing.pop(r.name, ()):
            transfer.wait(self.pipe.timeout)
            self.wrong_d2h += int(np.count_nonzero(r.array[offset:offset + len(expected)] != expected))

    def check(self) -> None:
        self.pipe.synchronize()
        for r in self.regions:
            self.settle(r)
            if r.device_buffer is not None:
                self.stale += int(np.count_nonzero(self.pipe.device.read(r.device_buffer) != self.model[r.name]))
        self.checks += 1


def soak(transfers: int = 100_000, *, seed: int = 0, iv_order: str = "strict", workers: int | None = None,
         predictor: str = "layerwise", rotate_after: int = 257, check_every: int = 1000,
         progress=None) -> SoakReport:
    """Run ``transfers`` host-to-device transfers (plus the writes and device-to-host
    copies drawn between them) through a ``pipellm`` pipeline on the emulated device.
    ``rotate_after`` is small so that keys rotate often; ``progress(n)`` is called with
    the number of transfers done since its last call."""
    for name, value, low in (("transfers", transfers, 1), ("check_every", check_every, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ArgumentError(f"{name} must be an int >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    ledger = IVLedger()
    started = perf_counter()
    warm_rss = warm_fds = None
    with ledger.watch(), Pipeline(device="emulated", mode="pipellm", predictor=predictor, chunk_size=CHUNK,
                                  iv_order=iv_order, rotate_after=rotate_after, workers=workers,
                                  bounce_bytes=1 << 20, depth_bytes=256 << 10, depth_messages=64,
                                  min_speculative_bytes=2 * CHUNK, adaptive=False) as pipe:  # both paths, always
        run = _Soak(pipe, rng)
        warm_up = max(1, transfers // 10)
        for i in range(transfers):
            run.step(i)
            if (i + 1) % check_every == 0 or i + 1 == transfers:
                run.check()
                if progress is not None:
                    progress(check_every if (i + 1) % check_every == 0 else transfers % check_every)
            if i + 1 == warm_up:
                warm_rss, warm_fds = _rss_bytes(), _fds()
        rss, fds = _rss_bytes(), _fds()
        stats = pipe.stats()
    return SoakReport(
        seed=seed, iv_order=iv_order, transfers_h2d=run.h2d, transfers_d2h=run.d2h, host_writes=run.writes,
        checks=run.checks, stale_bytes=run.stale, wrong_d2h_bytes=run.wrong_d2h, ciphertexts=ledger.writes,
        iv_reuse=len(ledger.violations), key_rotations=stats["key_rotations"], hits=stats["hits"],
        misses=stats["misses"], skipped_messages=stats["skipped_messages"], rss_growth_bytes=rss - warm_rss,
        fd_growth=fds - warm_fds, seconds=perf_counter() - started)
