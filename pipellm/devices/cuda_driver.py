"""The ``cuda`` device on the driver path: ``open_device("cuda", path="driver")``.

The same copy engine as every device (``devices/engine.py``: ordering, GO/SPEC/SKIP,
fail closed); what moves bytes is :class:`~pipellm.devices.gpupath.DriverPath`, C over a
table of driver calls: one call per host-to-device message, a fixed few per group of
messages verified, decrypted and committed on the GPU (the commit decided there), one
wait per group when the copy engine settles it. Device-to-host reads are sealed by the
GPU on the same stream. With ``driver="fake"`` (or a
:class:`~pipellm.devices.fakedriver.FakeDriver`) the whole device runs without a GPU and
without numba: that is how CI tests the path.

A group that fills up is launched and left in flight; the copy engine waits for the GPU
only when it settles (it runs out of work, a read or another session follows), where
the ops of every group launched since finish. ``compute`` is a GPU kernel spinning on the
GPU's timer behind the commits queued before it; the copy engine waits for it (so work
queued after a compute op does not overlap it yet).

    >>> import numpy as np, pipellm
    >>> dev = pipellm.open_device("cuda", path="driver", driver="fake", staging_bytes=1 << 20)
    >>> with pipellm.Pipeline(device=dev, mode="cc", chunk_size=4096) as pipe:
    ...     region = pipe.register(pipellm.array(np.arange(10000, dtype=np.uint8)))
    ...     _ = pipe.to_device(region)
    ...     pipe.synchronize()
    ...     bool((dev.read(region.device_buffer) == region.array).all())
    True
    >>> dev.close()
"""

from __future__ import annotations

import threading
import warnings
from functools import partial

import numpy as np

from ..channel import Kind, Opener, Sealer
from ..channel.cipher import open_into as cpu_open_into
from ..errors import ArgumentError, DeviceError, PinningWarning
from .._ext.gpupath import MAX_IN_FLIGHT
from .base import DeviceBuffer, Op
from .engine import CopyEngineDevice

_GPU_KINDS = (Kind.DATA, Kind.SPEC)  # payloads the GPU opens; commands open on the CPU
_SESSIONS = 64                       # sessions open at once (a refusal flag each on the GPU)


class _Mem:
    """A device allocation: its address and size."""

    __slots__ = ("address", "size")

    def __init__(self, address: int, size: int):
        self.address, self.size = address, size


class _Span:
    """A staged message's plaintext (its position in the group and staging offset), or
    device bytes to seal (``address``): what the receiver and sealer pass around."""

    __slots__ = ("offset", "nbytes", "position", "address")

    def __init__(self, offset: int, nbytes: int, position: int = -1, address: int = 0):
        self.offset, self.nbytes, self.position, self.address = offset, nbytes, position, address

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, part: slice) -> "_Span":
        start, stop, step = part.indices(self.nbytes)
        if step != 1 or (start and self.position >= 0):
            raise ArgumentError("a staged message's plaintext is taken whole")
        return _Span(self.offset + start, max(0, stop - start), self.position, self.address + start)


class _PathOpener(Opener):
    """An opener whose DATA and SPEC payloads the GPU verifies and decrypts in groups."""

    def __init__(self, *args, device: "DriverCudaDevice", **kw):
        super().__init__(*args, **kw)
        self._device = device
        self.slot = -1  # its session's refusal flag on the GPU (set when the session opens)

    def _decrypt(self, key, iv, index, kind, payload, aad, plain):
        if kind in _GPU_KINDS:  # verified when the group settles: nothing is committed before
            return self._device._stage(self, key, iv, index, payload, aad, len(plain))
        host = memoryview(bytearray(len(plain)))  # a command: its body is read on the host
        return host if cpu_open_into(key.aead, iv, payload, aad, host) else None


class _PathSealer(Sealer):
    """A sealer whose plaintext is device memory, sealed by the GPU."""

    def __init__(self, *args, device: "DriverCudaDevice", **kw):
        super().__init__(*args, **kw)
        self._device = device

    def _encrypt(self, key, iv, kind, plaintext, aad, out):
        path = self._device._path
        path.seal(path.key(key.secret, key.key_id), iv, aad, plaintext.address, len(plaintext), out)


class DriverCudaDevice(CopyEngineDevice):
    """An NVIDIA GPU (or the fake driver) as pipellm's device, on the driver path."""

    kind = "cuda"

    def __init__(self, *, device_id: int = 0, adversary=None, staging_bytes: int = 64 << 20, driver=None,
                 seed: int = 0, group_messages: int = 1024):
        """``driver``: None (the CUDA driver), ``"fake"`` (the process's fake driver,
        made with ``seed`` on first use) or a :class:`~pipellm.devices.fakedriver.FakeDriver`;
        ``group_messages``: messages verified as one group at most (1 to 1024)."""
        from .gpupath import DriverPath
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ArgumentError(f"device_id must be an int >= 0, got {device_id!r}")
        if isinstance(group_messages, bool) or not isinstance(group_messages, int) or not 1 <= group_messages <= 1024:
            raise ArgumentError(f"group_messages must be an int from 1 to 1024, got {group_messages!r}")
        sizes = dict(staging_bytes=staging_bytes, sessions=_SESSIONS, group_rows=group_messages)
        if driver is None:
            from numba import cuda  # at open only: the compute capability, and the PTX compiled once
            cuda.select_device(device_id)
            gpu = cuda.get_current_device()
            self._name = str(gpu.name)
            self._path = DriverPath.real(device_id, cc=gpu.compute_capability, **sizes)
            self._fake = None
        else:
            from .fakedriver import FakeDriver, installed
            if driver == "fake":
                driver = installed(seed)
            if not isinstance(driver, FakeDriver):
                raise ArgumentError(f"driver must be None (the CUDA driver), 'fake' or a FakeDriver, got {driver!r}")
            self._name, self._fake = "fake driver", driver
            self._path = DriverPath.fake(driver, **sizes)
        self.device_id = device_id
        self._stream = self._path.h2d.kernel_stream
        self._context = threading.local()
        self._slots: dict[int, int] = {}        # session id -> its refusal flag's slot
        self._fresh: set[int] = set()            # slots whose flag is cleared before their first group
        self._free_slots = list(range(_SESSIONS))
        self._group: list[int] = []              # channel index of each staged message
        self._inflight: list[tuple] = []         # (group id, its ops, its indices): launched, unread
        self._refusal = None                     # a group in flight was refused: (-1, channel index)
        self._group_slot = -1
        self._pins: dict[int, int] = {}
        self.opener_class = partial(_PathOpener, device=self)
        self.sealer_class = partial(_PathSealer, device=self)
        super().__init__(adversary=adversary, staging_bytes=staging_bytes)

    # -- sessions: a refusal flag each on the GPU ---------------------------------------------------
    def open_session(self, host_public: bytes, *, rotate_after: int, window: int = 0) -> tuple[int, bytes]:
        with self._cond:
            if not self._free_slots:
                raise DeviceError(f"the cuda device holds at most {_SESSIONS} sessions at once")
            slot = self._free_slots.pop()
        try:
            session, public = super().open_session(host_public, rotate_after=rotate_after, window=window)
        except BaseException:
            with self._cond:
                self._free_slots.append(slot)
            raise
        with self._cond:
            self._slots[session] = slot
            self._fresh.add(slot)
        self._sessions[session].opener.slot = slot
        return session, public

    def close_session(self, session: int) -> None:
        super().close_session(session)
        with self._cond:
            slot = self._slots.pop(session, None)
            if slot is not None:
                self._free_slots.append(slot)

    # -- the copy engine's hooks ----------------------------------------------------------------------
    def _current(self) -> None:
        if not getattr(self._context, "set", False):  # the driver's context is per thread
            self._path.driver.use_context()
            self._context.set = True

    def _stage(self, opener, key, iv, index, payload, aad, nbytes):
        self._current()
        path = self._path
        position, offset = path.stage(path.key(key.secret, key.key_id), iv, aad, payload, nbytes)
        self._group.append(index)
        self._group_slot = opener.slot
        return _Span(offset, nbytes, position)

    def _staging(self, session, nbytes: int):
        return _Span(0, self._path.h2d.staging_bytes)

    def _address(self, buffer_id: int, offset: int, nbytes: int) -> int | None:
        """The device address of ``[offset, offset + nbytes)`` of a buffer (None where the
        buffer is not allocated or does not hold those bytes: see ``_fits``)."""
        return self._mem[buffer_id].address + offset if self._fits(buffer_id, offset, nbytes) else None

    def _write(self, buffer_id: int, offset: int, plaintext) -> str | None:
        address = self._address(buffer_id, offset, len(plaintext))
        if address is None:
            return "which is not allocated"
        if len(plaintext):
            self._path.commit(plaintext.position, address, self._path.h2d.staged - 1)
        return None

    def _make_room(self, session, nbytes: int) -> None:
        # the group is full: launch it and go on staging; its ops finish at the next
        # settle (the engine waits for the GPU there, not here)
        self._current()
        if not self._path.room(nbytes):
            if len(self._inflight) >= MAX_IN_FLIGHT - 1:
                self._read_oldest()  # the path keeps that many outcomes at most
            self._inflight.append((self._launch(), self._deferred, self._group))
            self._deferred, self._group = [], []
            if not self._path.room(nbytes):  # (waits for the oldest group when the ring is full)
                raise DeviceError(f"a {nbytes}-byte message does not fit the device's staging")

    def _abandon(self) -> None:
        # the session failed part-way: its groups in flight are waited for and forgotten
        # (their ops fail with the session; the GPU's flag keeps what followed a refusal out)
        for group, _, _ in self._inflight:
            self._path.result(group)
        self._inflight.clear()
        self._refusal = None
        self._path.h2d.abandon()
        self._group.clear()

    def _staged(self) -> int:
        return self._path.h2d.staged

    def _in_flight(self) -> int:
        return len(self._inflight)

    def _launch(self) -> int:
        """Launch the group being staged; its id. What authenticated of a transfer still
        open is committed with it (a transfer is all-or-nothing within one group, up to
        the staging's size)."""
        path = self._path
        for session in self._sessions.values():
            for commit in session.receiver.flush():
                span = commit.plaintext
                address = self._address(commit.buffer, commit.offset, len(span))
                if address is not None and len(span):
                    path.commit(span.position, address, span.position)
        slot = self._group_slot
        if slot in self._fresh:
            path.h2d.reset_flag(slot)
            self._fresh.discard(slot)
        return path.launch(slot)

    def _read_oldest(self) -> None:
        """Wait for the oldest group in flight and finish its ops (those before a refused
        message); a refusal is kept for the settle to report."""
        group, ops, indices = self._inflight.pop(0)
        first = self._path.result(group)
        if self._refusal is None:
            for owner, staged in ops:
                if not owner.finished and (first < 0 or staged <= first):
                    self._finish(owner)
            if first >= 0:
                self._refusal = (-1, indices[first])  # -1: none of the settling ops lands

    def _verify_staged(self):
        path = self._path
        while self._inflight:  # launched when their group filled up, in order
            self._read_oldest()
        refused, self._refusal = self._refusal, None
        if path.h2d.staged:
            indices, self._group = self._group, []
            first = path.result(self._launch())
            if refused is None and first >= 0:
                refused = (first, indices[first])
        return refused

    def _span(self, buffer_id: int, offset: int, nbytes: int):
        address = self._address(buffer_id, offset, nbytes)
        if address is None:
            return None
        self._current()
        return _Span(0, nbytes, -1, address)

    def _copy_in(self, src, buffer_id: int, offset: int) -> bool:
        address = self._address(buffer_id, offset, len(src))
        if address is None:
            return False
        self._current()
        self._path.driver.copy_htod(address, np.frombuffer(src, np.uint8), self._stream)
        self._path.driver.synchronize(self._stream)  # the host may reuse ``src`` once the op is done
        return True

    def _copy_out(self, buffer_id: int, offset: int, dst) -> bool:
        address = self._address(buffer_id, offset, len(dst))
        if address is None:
            return False
        self._current()
        self._path.driver.copy_dtoh(np.frombuffer(dst, np.uint8), address, self._stream)
        self._path.driver.synchronize(self._stream)
        return True

    def _compute(self, op: Op, seconds: float, ready: float) -> None:
        # a kernel that keeps the GPU busy, behind the commits queued before it (the op's
        # weights landed first), waited for: copies queued after it start once it ran
        self._current()
        self._path.h2d.compute(round(seconds * 1e9))

    # -- memory ------------------------------------------------------------------------------------
    def _allocate(self, buf: DeviceBuffer) -> None:
        self._current()
        driver = self._path.driver
        try:
            address = driver.alloc(buf.nbytes)
        except DeviceError as exc:
            raise DeviceError(f"cuda device {self.device_id}: allocating {buf.nbytes} bytes failed: {exc}") from exc
        zeros = np.zeros(max(buf.nbytes, 1), np.uint8)  # new memory reads as zeros, as on the other devices
        driver.copy_htod(address, zeros[:buf.nbytes], self._stream)
        driver.synchronize(self._stream)
        self._mem[buf.id] = _Mem(address, buf.nbytes)
        self._allocated += buf.nbytes

    def _release(self, buf: DeviceBuffer) -> None:
        mem = self._mem.pop(buf.id, None)
        if mem is not None:
            self._current()
            self._path.driver.synchronize(self._stream)  # nothing queued still writes it
            self._path.driver.free(mem.address)
            self._allocated -= buf.nbytes

    def _release_all(self) -> None:
        path, self._path = self._path, None
        if path is None:
            return
        try:
            for mem in self._mem.values():
                path.driver.free(mem.address)
            self._mem.clear()
        finally:
            path.close()

    def _fetch(self, buffer_id: int, offset: int, nbytes: int) -> np.ndarray:
        self._current()
        out = np.empty(nbytes, np.uint8)
        self._path.driver.copy_dtoh(out, self._mem[buffer_id].address + offset, self._stream)
        self._path.driver.synchronize(self._stream)
        return out

    def pin_host(self, address: int, nbytes: int) -> None:
        """Register a bounce pool with the driver (real GPU only), so copies from it are
        DMA; refused in H100 confidential-computing mode, where copies still work, slower."""
        if self._fake is not None or not address:
            return
        from .._ext import cudadriver
        try:
            cudadriver.register_host(address, nbytes)
            self._pins[address] = nbytes
        except DeviceError as exc:
            warnings.warn(f"cuda device: could not register {nbytes} bytes of bounce buffers for DMA ({exc}); "
                          f"copies go through the driver's staging instead", PinningWarning, stacklevel=3)

    def unpin_host(self, address: int) -> None:
        if self._pins.pop(address, None) is not None:
            from .._ext import cudadriver
            cudadriver.unregister_host(address)

    def stats(self) -> dict:
        calls = self._path.calls if self._path is not None else {}
        return {"device_busy_s": self._busy_s, "device_bytes_allocated": self._allocated,
                "driver_calls": dict(calls)}

    def info(self) -> dict:
        return {"kind": self.kind, "device_id": self.device_id, "name": self._name, "path": "driver",
                "adversary": type(self.adversary).__name__ if self.adversary else None}
