"""The ``cuda`` device: a real NVIDIA GPU (any CUDA GPU, no CC hardware needed).

The host side is unchanged: CPU workers seal messages into bounce slots. The device side
is the software equivalent of the H100 copy engine's work: the copy-engine thread
(``devices/engine.py``, the same one the emulated device runs: ordering, GO/SPEC/SKIP,
fail closed) copies each message's ciphertext to device staging memory once, and the
AES-256-GCM kernels (``pipellm.kernels``) verify the tags of a batch of messages (one
launch per key, every 16 MiB staged) and only then decrypt them; once the batch settles,
the messages before the first refused one are committed, in order, by device-to-device
copies, and the ops are done only after that. Device to host, the kernels seal device
memory into staging and the sealed message is copied into the host's bounce slot. GO and
SKIP commands (a few bytes the receiver must read) are opened on the CPU by the same
trusted thread.

Memory and copies go through numba-cuda (device arrays on the primary context, shared
with PyTorch). Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the whole
device runs without a GPU, slowly: that is how CI tests it.

Bounce pools are registered with the driver (``pin_host``: cuMemHostRegister through
numba) so copies from them are DMA. Staging copies go on a copy stream, the kernels and
commits on a kernel stream that waits for them through events; a batch is waited for
once. The Cython ``cydriver`` layer (``pipellm._ext.cudadriver``: async copies, streams,
events) is built where its headers are; ``copies="driver"`` sends the staging copies
through it. ``as_tensor``/``torch_stream`` hand delivered memory and the device's kernel
stream to PyTorch. Measured on an H100 (docs/figures.md): the kernels reach 113 GB/s,
the host side's numba calls (about 1 ms per message) hold the encrypted path far below
the link. Not yet done (see the CUDA device issue): raw-pointer copies on the hot path,
per-slot events, compute as a GPU kernel (``compute`` sleeps on the copy-engine thread).
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial

import numpy as np

from ..channel import Kind, Opener, Sealer
from ..channel.protocol import HEADER_BYTES as _HEADER_BYTES
from ..channel.cipher import open_into as cpu_open_into
from ..errors import ArgumentError, DeviceError
from ..kernels import MAX_AAD_BYTES, _words
from .base import DeviceBuffer, Op
from .engine import CopyEngineDevice

_GPU_KINDS = (Kind.DATA, Kind.SPEC)  # payloads the kernels handle; commands open on the CPU
_KEYS_KEPT = 8                        # KernelKeys cached (epochs in flight, both directions)
_BATCH_MESSAGES = 1024                # messages verified in one batch at most (their rows are kept)
_LAUNCH_BYTES = 16 << 20              # staged ciphertext whose verification starts before the batch ends


def _slot(nbytes: int) -> int:
    """Staging bytes a message takes: the kernels want 16-byte aligned starts."""
    return max(16, -(-nbytes // 16) * 16)


def unavailable_reason() -> str | None:
    """Why the cuda device cannot be opened here (None: it can)."""
    from ..kernels import unavailable_reason as kernels_reason
    return kernels_reason()


class _Span:
    """``nbytes`` of the staging plaintext at ``offset``: where a staged message's
    plaintext will be once verified. Stands in for device-array slices on the per-message
    path, where numba's slicing is costly (docs/figures.md, the H100 profile); the receiver takes
    ``staging[:length]`` of it like of memory."""

    __slots__ = ("offset", "nbytes")

    def __init__(self, offset: int, nbytes: int):
        self.offset, self.nbytes = offset, nbytes

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, part: slice) -> "_Span":
        start, stop, step = part.indices(self.nbytes)
        if step != 1:
            raise ArgumentError("a staging span is sliced contiguously")
        return _Span(self.offset + start, max(0, stop - start))


class _Rows:
    """A batch's per-message launch arguments, kept in pinned host memory and on the
    device: a message's row is written when it is staged, and the rows of a launch are
    copied over at once, asynchronously, when its verification is launched."""

    FIELDS = {"ivs": ((3,), np.uint32), "aads": ((MAX_AAD_BYTES // 4,), np.uint32), "tags": ((4,), np.uint32),
              "offs": ((), np.int64), "lens": ((), np.int64)}

    def __init__(self, cuda, n: int):
        self.host = {k: cuda.pinned_array((n,) + shape, dtype) for k, (shape, dtype) in self.FIELDS.items()}
        self.device = {k: cuda.device_array((n,) + shape, dtype) for k, (shape, dtype) in self.FIELDS.items()}
        self.acc = cuda.to_device(np.zeros((n, 4), np.uint32))  # kept 0: tag_kernel clears what it read
        self.ok = cuda.device_array(n, np.uint32)

    def put(self, i: int, iv: bytes, aad: bytes, tag: bytes, offset: int, nbytes: int) -> None:
        h = self.host
        h["ivs"][i], h["tags"][i] = _words(iv, 3), _words(tag, 4)
        h["aads"][i] = _words(aad, MAX_AAD_BYTES // 4)
        h["offs"][i], h["lens"][i] = offset, nbytes

    def upload(self, a: int, b: int, stream) -> dict:
        """Rows a..b on the device (queued on ``stream``): their device views by field."""
        for k, host in self.host.items():
            self.device[k][a:b].copy_to_device(host[a:b], stream=stream)
        return {k: d[a:b] for k, d in self.device.items()}


class _Kernels:
    """The device's handle on the AES-GCM kernels: per-key tables, staging arrays."""

    def __init__(self, staging_bytes: int, threads: int, device_id: int = 0, driver=None):
        from numba import cuda

        from ..kernels import Scratch
        self.cuda = cuda
        self.threads = threads
        self.device_id, self.driver = device_id, driver
        self._context_set = threading.local()
        padded = (staging_bytes + 15) // 16 * 16
        self.cipher = cuda.to_device(np.zeros(padded, np.uint8))   # ciphertext, private copy
        self.plain = cuda.to_device(np.zeros(padded, np.uint8))    # plaintext before its commit
        self.sealed = cuda.to_device(np.zeros(padded, np.uint8))   # device to host ciphertext
        self.zero = cuda.to_device(np.zeros(1, np.int64))
        # two streams, so that the link and the kernels work at once: staging copies on the
        # copy stream; verification, commits and device-to-host sealing on the kernel
        # stream, which waits (an event) for the copies it reads. copies="driver": the
        # staging copies go through the Cython cydriver layer on a driver stream
        self.stream = cuda.stream()
        if driver is not None:
            self.copy_stream = driver.Stream()
            self._copies = cuda.external_stream(self.copy_stream.handle)
            self._cipher_at = self.cipher.__cuda_array_interface__["data"][0]
        else:
            self.copy_stream = self._copies = cuda.stream()
        self.rows = _Rows(cuda, _BATCH_MESSAGES)
        self.scratch = Scratch()  # device-to-host sealing's small arrays: kept, never allocated
        self._keys: dict[bytes, object] = {}
        self.reset()

    def key(self, epoch_key):
        from ..kernels import KernelKey
        k = self._keys.get(epoch_key.key_id)
        if k is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.pop(next(iter(self._keys)))
            k = self._keys[epoch_key.key_id] = KernelKey(epoch_key.secret)
        return k

    # -- host to device: messages are verified and decrypted in batches -----------------------
    def reset(self) -> None:
        self._staged: list[tuple] = []   # (KernelKey, AAD bytes, channel index), in order
        self._commits: list[tuple] = []  # (staged position, destination array, its offset, _Span)
        self._used = 0
        self._launched = 0               # staged messages whose verification is queued
        self._unlaunched_bytes = 0

    def room(self, nbytes: int) -> bool:
        return self._used + _slot(nbytes) <= len(self.cipher) and len(self._staged) < _BATCH_MESSAGES

    def stage(self, epoch_key, iv: bytes, payload, aad: bytes, nbytes: int, index: int):
        """Copy a message's ciphertext out of shared memory (once) into the batch; the
        device slice its plaintext will be in once :meth:`settle` verified it. Every
        _LAUNCH_BYTES of ciphertext, the verification of what was staged is queued
        behind its copies, so the kernels work while later messages cross the link."""
        off = self._used
        payload = np.frombuffer(payload, np.uint8)
        if nbytes and self.driver is not None:
            if not getattr(self._context_set, "done", False):  # the driver's context is per thread
                self.driver.use_primary_context(self.device_id)
                self._context_set.done = True
            self.driver.copy_to_device(self._cipher_at + off, payload[:nbytes], self.copy_stream)
        elif nbytes:
            self.cipher[off:off + nbytes].copy_to_device(payload[:nbytes], stream=self.copy_stream)
        self.rows.put(len(self._staged), iv, aad, payload[nbytes:nbytes + 16].tobytes(), off, nbytes)
        self._staged.append((self.key(epoch_key), len(aad), index))
        self._used += _slot(nbytes)
        self._unlaunched_bytes += nbytes
        if self._unlaunched_bytes >= _LAUNCH_BYTES:
            self.launch()
        return _Span(off, nbytes)

    def commit_later(self, destination, offset: int, plaintext: _Span, position: int | None = None) -> None:
        """Copy ``plaintext`` to ``destination[offset:]`` once verified: if the message
        staged at ``position`` (default: the last one staged, which completed the
        transfer) and every one before it verified."""
        self._commits.append((len(self._staged) - 1 if position is None else position, destination, offset,
                              plaintext))

    def position_of(self, plaintext: _Span) -> int:
        """The batch position of the message whose plaintext is ``plaintext``."""
        return int(np.flatnonzero(self.rows.host["offs"][:len(self._staged)] == plaintext.offset)[0])

    def _commit(self, upto: int | None) -> None:
        """Queue the device-to-device copies of the commits of messages before position
        ``upto`` (all if None), one per run of messages that sit back to back both in
        staging and in their destination (a transfer's chunks do)."""
        run = None  # [destination, its offset, staging offset, bytes]
        for position, destination, offset, span in sorted(self._commits, key=lambda c: c[0]):
            if upto is not None and position >= upto:
                break
            if (run is not None and run[0] is destination and run[1] + run[3] == offset
                    and run[2] + run[3] == span.offset):
                run[3] += span.nbytes
                continue
            if run is not None:
                self._copy_run(*run)
            run = [destination, offset, span.offset, span.nbytes]
        if run is not None:
            self._copy_run(*run)

    def _copy_run(self, destination, offset: int, at: int, nbytes: int) -> None:
        if nbytes:
            destination[offset:offset + nbytes].copy_to_device(self.plain[at:at + nbytes], stream=self.stream)

    def launch(self) -> None:
        """Queue the verification and decryption of the messages staged since the last
        launch on the kernel stream, behind their copies (one launch per key)."""
        from ..kernels import open_into
        a, b, staged = self._launched, len(self._staged), self._staged
        if a == b:
            return
        copied = self.cuda.event()
        copied.record(stream=self._copies)
        copied.wait(stream=self.stream)
        rows = self.rows.upload(a, b, self.stream)
        start = a
        while start < b:
            end = start
            while end < b and staged[end][:2] == staged[start][:2]:
                end += 1
            i, j = start - a, end - a
            open_into(staged[start][0], rows["ivs"][i:j], rows["aads"][i:j], staged[start][1], self.cipher,
                      rows["offs"][i:j], self.rows.host["lens"][start:end], rows["tags"][i:j], self.plain,
                      rows["offs"][i:j], threads=self.threads, stream=self.stream, lens_d=rows["lens"][i:j],
                      acc=self.rows.acc[start:end], ok=self.rows.ok[start:end])
            start = end
        self._launched, self._unlaunched_bytes = b, 0

    def settle(self) -> tuple[int, int] | None:
        """Verify and decrypt the batch, commit the messages before the first refused
        one in order; that one's position in the batch and channel index, or None."""
        try:
            n = len(self._staged)
            if n == 0:
                return None
            self.launch()
            ok = self.rows.ok[:n].copy_to_host(stream=self.stream)
            self.stream.synchronize()
            bad = np.flatnonzero(ok == 0)
            first_bad = int(bad[0]) if len(bad) else None
            self._commit(first_bad)
            self.stream.synchronize()
            return None if first_bad is None else (first_bad, self._staged[first_bad][2])
        finally:
            self.abandon()

    def warm_up(self) -> None:
        """Compile the kernels (or load them from numba's cache) for the argument types
        of the batch path and of sealing, at open rather than inside the first transfer
        (where it takes seconds): a message under a throw-away key goes through both."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from ..channel.keys import EpochKey
        secret = os.urandom(32)
        key = EpochKey(AESGCM(secret), 0, b"warm-up!", secret)
        try:
            self.stage(key, bytes(12), np.zeros(32, np.uint8), bytes(_HEADER_BYTES), 16, -1)
            self.settle()  # refused (its tag is wrong): nothing was to be committed anyway
            self.seal(key, bytes(12), self.plain[:16], bytes(_HEADER_BYTES), memoryview(bytearray(32)))
        finally:
            self._keys.pop(key.key_id, None)

    def abandon(self) -> None:
        """Forget the batch, once no queued copy still reads a bounce slot."""
        try:
            self.copy_stream.synchronize()
            self.stream.synchronize()
        finally:
            self.reset()

    def seal(self, epoch_key, iv: bytes, span, aad: bytes, out: memoryview) -> None:
        """Seal device bytes ``span`` into host memory ``out`` (ciphertext || tag)."""
        from ..kernels import _batch_arrays, seal_into
        nbytes, stream = len(span), self.stream
        self.plain[:nbytes].copy_to_device(span, stream=stream)  # aligned for the kernels
        tags = self.scratch.zeros("sealed_tags", 1, (4,), np.uint32)  # written by the kernel
        ivs, aads = _batch_arrays([iv], [aad], stream, self.scratch)
        seal_into(self.key(epoch_key), ivs, aads, len(aad), self.plain, self.zero, np.array([nbytes], np.int64),
                  self.sealed, self.zero, tags, threads=self.threads, stream=stream, scratch=self.scratch)
        host = np.frombuffer(out, np.uint8)
        self.sealed[:nbytes].copy_to_host(host[:nbytes], stream=stream)
        words = tags.copy_to_host(stream=stream)
        stream.synchronize()
        host[nbytes:] = np.frombuffer(words[0].astype(">u4").tobytes(), np.uint8)


class GpuOpener(Opener):
    """An opener whose DATA and SPEC payloads are verified and decrypted by the GPU."""

    def __init__(self, *args, kernels: _Kernels, **kw):
        super().__init__(*args, **kw)
        self._kernels = kernels

    def _decrypt(self, key, iv, index, kind, payload, aad, plain):
        if kind in _GPU_KINDS:  # verified when the batch settles: nothing is committed before
            return self._kernels.stage(key, iv, payload, aad, len(plain), index)
        host = memoryview(bytearray(len(plain)))  # a command: its body is read on the host
        return host if cpu_open_into(key.aead, iv, payload, aad, host) else None


class GpuSealer(Sealer):
    """A sealer whose plaintext is device memory, sealed by the GPU."""

    def __init__(self, *args, kernels: _Kernels, **kw):
        super().__init__(*args, **kw)
        self._kernels = kernels

    def _encrypt(self, key, iv, kind, plaintext, aad, out):
        self._kernels.seal(key, iv, plaintext, aad, out)


class CudaDevice(CopyEngineDevice):
    """An NVIDIA GPU as pipellm's device. Use ``pipellm.open_device("cuda", device_id=0)``."""

    kind = "cuda"

    def __init__(self, *, device_id: int = 0, adversary=None, staging_bytes: int = 64 << 20, threads: int = 0,
                 copies: str = "numba"):
        reason = unavailable_reason()
        if reason is not None:
            from ..errors import DeviceUnavailableError
            raise DeviceUnavailableError(f"cannot open the cuda device: {reason}")
        from numba import config, cuda
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ArgumentError(f"device_id must be an int >= 0, got {device_id!r}")
        if copies not in ("numba", "driver"):
            raise ArgumentError(f"copies must be 'numba' or 'driver', got {copies!r}")
        driver = None
        if copies == "driver":
            if config.ENABLE_CUDASIM:
                raise ArgumentError("copies='driver' needs a real GPU: the CUDA simulator has no driver")
            if driver_layer() != "built":
                from ..errors import DeviceUnavailableError
                raise DeviceUnavailableError(f"copies='driver': the cydriver layer is {driver_layer()}")
            from .._ext import cudadriver as driver
        cuda.select_device(device_id)  # the primary context, shared with PyTorch
        self.device_id = device_id
        self._name = "CUDA simulator" if config.ENABLE_CUDASIM else str(cuda.get_current_device().name)
        self._pins: dict[int, object] = {}  # bounce pools registered with the driver
        self.copies = copies
        from ..kernels import _threads
        threads = _threads(threads or (16 if config.ENABLE_CUDASIM else 0))  # refused here, not at a transfer
        self._kernels = _Kernels(staging_bytes, threads, device_id, driver)
        if not config.ENABLE_CUDASIM:  # (the simulator compiles nothing)
            self._kernels.warm_up()
        self.opener_class = partial(GpuOpener, kernels=self._kernels)
        self.sealer_class = partial(GpuSealer, kernels=self._kernels)
        super().__init__(adversary=adversary, staging_bytes=staging_bytes)

    # -- PyTorch interop ----------------------------------------------------------------------------
    def as_tensor(self, buf: DeviceBuffer):
        """A ``torch`` CUDA tensor over ``buf``'s device memory (no copy; its recorded dtype
        and shape): what the pipeline delivered is usable by PyTorch kernels once
        ``synchronize()`` returned. Needs a CUDA build of torch, on a real GPU."""
        from numba import config

        self.check_buffer(buf)
        if config.ENABLE_CUDASIM:
            raise DeviceError("the CUDA simulator's memory is host memory: no torch CUDA tensor can view it")
        import torch

        raw = torch.as_tensor(self._mem[buf.id], device=f"cuda:{self.device_id}")  # __cuda_array_interface__
        dtype = torch.from_numpy(np.empty(0, buf.dtype)).dtype
        whole = buf.nbytes // buf.dtype.itemsize * buf.dtype.itemsize
        view = raw[:whole].view(dtype)
        return view.reshape(buf.shape) if view.numel() == int(np.prod(buf.shape)) else view

    def torch_stream(self):
        """The device's copy-and-kernel stream as a ``torch.cuda.ExternalStream``, to order
        PyTorch work after the pipeline's (``stream.wait_stream``) without a host wait."""
        import torch

        handle = self._kernels.stream.handle
        return torch.cuda.ExternalStream(getattr(handle, "value", None) or int(handle),
                                         device=f"cuda:{self.device_id}")

    # -- memory ---------------------------------------------------------------------------------
    def _allocate(self, buf: DeviceBuffer) -> None:
        from numba import cuda
        try:
            self._mem[buf.id] = cuda.to_device(np.zeros(buf.nbytes, np.uint8))
        except Exception as exc:  # noqa: BLE001 - out of memory and friends, named
            raise DeviceError(f"cuda device {self.device_id}: allocating {buf.nbytes} bytes failed: {exc}") from exc
        self._allocated += buf.nbytes

    def _release_all(self) -> None:
        super()._release_all()
        self._pins.clear()

    def _fetch(self, buffer_id: int, offset: int, nbytes: int) -> np.ndarray:
        return self._mem[buffer_id][offset:offset + nbytes].copy_to_host()

    # -- the copy engine's hooks -------------------------------------------------------------------
    def _staging(self, session, nbytes: int):
        return _Span(0, len(self._kernels.plain))

    def _write(self, buffer_id: int, offset: int, plaintext) -> str | None:
        if not self._fits(buffer_id, offset, len(plaintext)):
            return "which is not allocated"
        self._kernels.commit_later(self._mem[buffer_id], offset, plaintext)
        return None

    def _make_room(self, session, nbytes: int) -> None:
        if not self._kernels.room(nbytes):
            self._settle(session)

    def _abandon(self) -> None:
        self._kernels.abandon()

    def _staged(self) -> int:
        return len(self._kernels._staged)

    def _verify_staged(self):
        # the batch's staging is reused after it settles: what authenticated of a transfer
        # still open is committed with it (a transfer is all-or-nothing within one batch,
        # up to the staging's size; a longer one lands batch by batch: docs/design.md)
        for session in self._sessions.values():
            for commit in session.receiver.flush():
                if self._fits(commit.buffer, commit.offset, len(commit.plaintext)):
                    self._kernels.commit_later(self._mem[commit.buffer], commit.offset, commit.plaintext,
                                               self._kernels.position_of(commit.plaintext))
        return self._kernels.settle()

    def _span(self, buffer_id: int, offset: int, nbytes: int):
        mem = self._mem.get(buffer_id)
        return None if mem is None else mem[offset:offset + nbytes]

    def _copy_in(self, src, buffer_id: int, offset: int) -> bool:
        mem = self._mem.get(buffer_id)
        if mem is None:
            return False
        mem[offset:offset + len(src)].copy_to_device(np.frombuffer(src, np.uint8))
        return True

    def _copy_out(self, buffer_id: int, offset: int, dst) -> bool:
        mem = self._mem.get(buffer_id)
        if mem is None:
            return False
        mem[offset:offset + len(dst)].copy_to_host(np.frombuffer(dst, np.uint8))
        return True

    def _compute(self, op: Op, seconds: float, ready: float) -> None:
        time.sleep(seconds)  # placeholder: serializes with copies (a GPU spin kernel is to come)

    def pin_host(self, address: int, nbytes: int) -> None:
        """Register a bounce pool with the driver (cuMemHostRegister through numba), so
        copies from it are DMA at the link's rate, not staged through the driver's own
        pinned buffers. Where that fails, copies still work, slower (one warning)."""
        from numba import config, cuda
        if config.ENABLE_CUDASIM or not address:
            return
        try:
            self._pins[address] = cuda.current_context().mempin(self, address, nbytes, mapped=False)
        except Exception as exc:  # noqa: BLE001 - pinning is an optimisation
            import warnings

            from ..errors import PinningWarning
            warnings.warn(f"cuda device: could not register {nbytes} bytes of bounce buffers for DMA ({exc}); "
                          f"copies go through the driver's staging instead", PinningWarning, stacklevel=3)

    def unpin_host(self, address: int) -> None:
        # numba unregisters (cuMemHostUnregister) at once when its last reference goes
        self._pins.pop(address, None)

    def stats(self) -> dict:
        return {"device_busy_s": self._busy_s, "device_bytes_allocated": self._allocated}

    def info(self) -> dict:
        return {"kind": self.kind, "device_id": self.device_id, "name": self._name,
                "adversary": type(self.adversary).__name__ if self.adversary else None,
                "driver_layer": driver_layer(), "copies": self.copies}


def driver_layer() -> str:
    """Whether the Cython cydriver layer (pipellm._ext.cudadriver) was built here. The
    device's staging copies go through it with ``copies="driver"``; numba's copies stay
    the default until the two are measured on a GPU."""
    try:
        from .._ext import cudadriver  # noqa: F401
    except ImportError:
        return "not built (needs cuda-bindings and the CUDA headers at build time)"
    return "built"
