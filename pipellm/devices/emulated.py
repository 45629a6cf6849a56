"""The embedded ``emulated`` device: an H100 in confidential-computing mode, in-process.

It has protected memory (only its copy engine writes it), a copy engine that really
authenticates and decrypts every host-to-device message (and encrypts device-to-host
ones) with the channel's own code, a modelled PCIe link and modelled compute, and an
explicit untrusted link where tests attach a :class:`pipellm.testing.Adversary`.

How time works. Every op gets a *modelled* end time computed from the link model
(bandwidth, per-copy latency, one link per direction), the compute engine and stream
order. The copy engine's real work (AES-GCM, memcpy) runs on one device thread; an op is
done once that work is finished *and* its modelled end has passed.

On an H100 the copy engine works at line rate in hardware, so when a host thread has to
wait for the emulator's CPU work beyond the model (the op's modelled end has passed, or
the copy engine has not even reached the op), that is *emulation stall*: the device
clock (:meth:`EmulatedDevice.now`, on which all modelled times are given) stands still
for it, and the device's ``gate`` event is shut, so host worker threads that check the
gate (the pipellm mode's do, between chunks) do not get work done in time that does not
exist in the model. Wall time minus stall is then the *modelled time* of the host's
work, which benchmarks report next to wall time. A task a worker is in the middle of
when a stall begins finishes during it; the worker then waits as long on the device
clock (:meth:`EmulatedDevice.hold`), so its progress in modelled time is its real work
(without that, a worker-bound pipeline got its in-stall work for free: 0.7x of one
worker's bound on a 2-vCPU VM, faster than the worker can encrypt).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from .. import timeline
from .._ext import copy_into
from ..errors import ArgumentError, DeviceError
from .base import DeviceBuffer, Op
from .engine import CopyEngineDevice


@dataclass(frozen=True)
class LinkModel:
    """The modelled host<->device link: one link per direction (PCIe is full duplex).

    Defaults are those of PCIe Gen5 x16 on an H100 without CC: ~50 GB/s achieved per
    direction (64 GB/s raw; NVIDIA's nvbandwidth reports ~53 GB/s for copy-engine copies)
    and a few microseconds per copy.
    """

    h2d_bytes_per_s: float = 50e9
    d2h_bytes_per_s: float = 50e9
    latency_s: float = 2e-6

    def __post_init__(self):
        for name in ("h2d_bytes_per_s", "d2h_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ArgumentError(f"LinkModel.{name} must be positive, got {getattr(self, name)}")
        if not self.latency_s >= 0:
            raise ArgumentError(f"LinkModel.latency_s must be >= 0, got {self.latency_s}")


def sleep_until(clock, t: float) -> None:
    """Sleep until clock() >= t: coarse sleeps, then yield-spin the last 0.3 ms."""
    while (remaining := t - clock()) > 5e-4:
        time.sleep(remaining - 3e-4)
    while clock() < t:
        time.sleep(0)


class _Staging:
    """One session's device-private staging: each message of its open transfer in a place
    of its own until the transfer commits; blocks are added as a transfer needs them and
    kept for the next (so it grows to the session's largest transfer, once)."""

    def __init__(self, block: int):
        self._block_bytes = block
        self._blocks: list[memoryview] = []
        self._block = 0  # the block being filled
        self._at = 0     # the next free byte in it

    def take(self, nbytes: int) -> memoryview:
        while self._block < len(self._blocks):
            block = self._blocks[self._block]
            if self._at + nbytes <= len(block):
                self._at += nbytes
                return block[self._at - nbytes:self._at]
            self._block, self._at = self._block + 1, 0
        self._blocks.append(memoryview(bytearray(max(nbytes, self._block_bytes))))
        self._at = nbytes
        return self._blocks[-1][:nbytes]

    def reset(self) -> None:
        self._block, self._at = 0, 0


class EmulatedDevice(CopyEngineDevice):
    """An emulated confidential GPU. Use ``pipellm.open_device("emulated", ...)``.

    >>> import pipellm
    >>> with pipellm.open_device("emulated") as dev:
    ...     buf = dev.alloc(16)
    ...     dev.read(buf).tolist()[:4]
    [0, 0, 0, 0]
    """

    kind = "emulated"

    def __init__(self, *, adversary=None, link: LinkModel | None = None,
                 memory_bytes: int = 80 << 30, staging_bytes: int = 64 << 20):
        if link is not None and not isinstance(link, LinkModel):
            raise ArgumentError(f"link must be a LinkModel, got {type(link).__name__}")
        self.link = link or LinkModel()
        self.memory_bytes = int(memory_bytes)
        # each session's open transfer is staged apart (one session's transfer left open
        # never holds another's memory): blocks of up to 8 MiB, grown to its largest
        self._stagings: dict[int, _Staging] = {}
        self._staging_block = min(staging_bytes, 8 << 20)
        self._link_free = [0.0, 0.0]  # per Direction
        self._compute_free = 0.0
        super().__init__(adversary=adversary, staging_bytes=staging_bytes)

    # -- memory ---------------------------------------------------------------------------------
    def _allocate(self, buf: DeviceBuffer) -> None:
        if self._allocated + buf.nbytes > self.memory_bytes:
            raise DeviceError(f"out of device memory: {buf.nbytes} bytes asked, "
                              f"{self.memory_bytes - self._allocated} of {self.memory_bytes} free")
        self._mem[buf.id] = np.zeros(buf.nbytes, np.uint8)
        self._allocated += buf.nbytes

    def _fetch(self, buffer_id: int, offset: int, nbytes: int) -> np.ndarray:
        return self._mem[buffer_id][offset:offset + nbytes].copy()

    def memory(self, buf: DeviceBuffer) -> np.ndarray:
        """``buf``'s device memory itself, as raw bytes, read-only (no copy, no wait): what
        a kernel on this device would read. Host code that stands in for the device's
        kernels (the integrations run PyTorch modules on it) computes on the bytes the
        copy engine verified and decrypted; only the copy engine writes them. Wait for
        the transfers into it first (``Pipeline.synchronize``).

        >>> import pipellm
        >>> with pipellm.open_device("emulated") as dev:
        ...     mem = dev.memory(dev.alloc(8))
        ...     mem.nbytes, mem.flags.writeable
        (8, False)
        """
        self._check_open()
        self.check_buffer(buf)
        view = self._mem[buf.id].view()
        view.flags.writeable = False
        return view

    # -- the copy engine's hooks -------------------------------------------------------------------
    def _staging(self, session, nbytes: int):
        staging = self._stagings.get(session.id)
        if staging is None:
            staging = self._stagings[session.id] = _Staging(self._staging_block)
        return staging.take(nbytes)

    def _staging_done(self, session, release: bool = False) -> None:
        staging = self._stagings.pop(session.id, None) if release else self._stagings.get(session.id)
        if staging is not None:
            staging.reset()

    def _write(self, buffer_id: int, offset: int, plaintext) -> str | None:
        if not self._fits(buffer_id, offset, len(plaintext)):
            return "which is not allocated"
        mem = self._mem[buffer_id]
        copy_into(memoryview(mem)[offset:offset + len(plaintext)], plaintext)
        return None

    def _span(self, buffer_id: int, offset: int, nbytes: int):
        mem = self._mem.get(buffer_id)
        return None if mem is None else memoryview(mem)[offset:offset + nbytes]

    def _copy_in(self, src, buffer_id: int, offset: int) -> bool:
        mem = self._mem.get(buffer_id)
        if mem is None:
            return False
        copy_into(memoryview(mem)[offset:offset + len(src)], src)
        return True

    def _copy_out(self, buffer_id: int, offset: int, dst) -> bool:
        mem = self._mem.get(buffer_id)
        if mem is None:
            return False
        copy_into(dst, memoryview(mem)[offset:offset + len(dst)])
        return True

    def _compute(self, op: Op, seconds: float, ready: float) -> None:
        start = max(ready, self._compute_free)
        op.end = self._compute_free = start + seconds
        if timeline.recording:
            timeline.model_span("compute", start, op.end)

    def _book(self, op: Op, direction: int, ready: float, nbytes: int) -> None:
        """Book the link for ``nbytes`` no earlier than ``ready``: the op's modelled end."""
        bandwidth = self.link.h2d_bytes_per_s if direction == 0 else self.link.d2h_bytes_per_s
        start = max(ready, self._link_free[direction])
        self._link_free[direction] = start + nbytes / bandwidth
        op.end = start + nbytes / bandwidth + self.link.latency_s
        if timeline.recording:
            timeline.model_span("link-d2h" if direction else "link-h2d", start, op.end)

    # -- waiting ---------------------------------------------------------------------------------
    def hold(self, seconds: float) -> None:
        # bounded in real time too: a clock held still for long (a paused copy engine
        # with a host thread waiting on it) must not hold a worker, or close(), with it
        target, deadline = self.now() + seconds, perf_counter() + seconds + 0.1
        while not self._closed and (remaining := target - self.now()) > 0 and perf_counter() < deadline:
            time.sleep(min(remaining, 2e-3))

    @contextmanager
    def clock_held(self):
        """The device clock stands still (and host workers are held at the gate) inside:
        for tools whose own work must not count as modelled time (the trace replayer's
        bookkeeping). Counted with the emulation stall."""
        with self.clock.held():
            yield

    def _wait_op(self, op: Op, timeout: float | None) -> bool:
        if not timeline.recording:
            return self._wait(op, timeout)
        start, cpu = perf_counter(), time.thread_time()
        try:
            return self._wait(op, timeout)
        finally:
            timeline.span("wait-device", start, perf_counter(), time.thread_time() - cpu)

    def _wait(self, op: Op, timeout: float | None) -> bool:
        deadline = None if timeout is None else perf_counter() + timeout
        stalled = False
        try:
            while not op.finished and not self._closed:
                now = self.now()
                # op.end is 0 until the copy engine has handled the op: the emulator is behind
                running = op.end > 0 and now < op.end
                if running == stalled:  # in the model the op is still on the link: no stall
                    self.clock.stall(not running)
                    stalled = not running
                wait = op.end - now if running else 0.002
                if deadline is not None:
                    remaining = deadline - perf_counter()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                with self._cond:
                    if not op.finished:
                        self._cond.wait(wait)
        finally:
            if stalled:
                self.clock.stall(False)
        if op.end > self.now():
            sleep_until(self.now, op.end)
        return True

    def stats(self) -> dict:
        """Copy-engine CPU time and emulation stall (see the module docstring)."""
        return {"device_busy_s": self._busy_s, "emulation_stall_s": self.clock.frozen_s(),
                "device_bytes_allocated": self._allocated,
                **{"device_" + k: v for k, v in self.work.items()}}

    def info(self) -> dict:
        return {"kind": self.kind, "link_h2d_GBps": self.link.h2d_bytes_per_s / 1e9,
                "link_d2h_GBps": self.link.d2h_bytes_per_s / 1e9,
                "link_latency_us": self.link.latency_s * 1e6, "memory_bytes": self.memory_bytes,
                "adversary": type(self.adversary).__name__ if self.adversary else None}

