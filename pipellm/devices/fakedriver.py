"""A fake CUDA driver for the cuda device's driver path, so CI runs that C path without a GPU.

``pipellm._ext.driver.Driver.fake(FakeDriver())`` fills the path's table of driver
calls with trampolines into this object. It behaves as the driver does where the path
relies on it, and adversarially where the driver is allowed to:

- device memory is numpy arrays at fake addresses; an access outside an allocation
  raises, as an illegal address does;
- work queued on a stream runs later, in stream order: nothing runs until the host
  queries an event (a seeded random amount of work then runs) or synchronizes; streams
  are interleaved in a seeded random order that honours recorded events and waits;
- a copy reads host memory when it *runs*, not when it is queued: a bounce slot reused
  before its copy ran delivers the new bytes, and the tag check catches it;
- a launch's parameter block is decoded at the call (numba's array ABI, the layouts in
  :mod:`pipellm.kernels.driverpath`), its grid checked to cover the work, and the
  kernel's effect computed by a reference (``cryptography`` for AES, numpy for GHASH)
  when it runs;
- every call is counted by name (``calls``), and the time spent running queued work is
  kept apart (``cpu_in_fake``), so a benchmark can report the host's own time.

Nothing here imports numba.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import random
import threading
import time
from collections import Counter, deque

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import DeviceError
from ..kernels import driverpath
from ..kernels.tables import TE0, expand_key

_BASE = 0x7A00_0000_0000  # fake device addresses start here (never host addresses)
_ALIGN = 256
SYNCHRONIZING = ("event_synchronize", "stream_synchronize")


class FakeDriverError(DeviceError):
    """The path used the fake driver wrongly (what a real GPU would fault on or compute
    garbage from): an illegal address, a grid that does not cover its work, a bad table."""


class _Array:
    """A kernel argument decoded from numba's ABI."""

    __slots__ = ("data", "nitems", "itemsize", "shape", "strides", "dtype")

    def __init__(self, dtype, words):
        meminfo, parent, self.nitems, self.itemsize, self.data = words[:5]
        ndim = (len(words) - 5) // 2
        self.shape, self.strides = tuple(words[5:5 + ndim]), tuple(words[5 + ndim:])
        self.dtype = np.dtype(dtype)
        if meminfo or parent or self.itemsize != self.dtype.itemsize or self.nitems != int(np.prod(self.shape)):
            raise FakeDriverError(f"a {dtype} array argument is malformed: meminfo {meminfo}, parent {parent}, "
                                  f"itemsize {self.itemsize}, nitems {self.nitems}, shape {self.shape}")


def _locked(method):
    """One driver call at a time (the real driver is thread-safe; the fake's books are not)."""
    @functools.wraps(method)
    def call(self, *args):
        with self._lock:
            return method(self, *args)
    return call


class FakeDriver:
    """See the module docstring. ``seed`` drives the scheduling; ``eager=True`` runs
    each queued operation at once (a plain, in-order device, for debugging);
    ``threaded=True`` runs queued work on a thread of its own, as a GPU runs beside the
    host (the host's threads then spend no CPU on it: what a benchmark of the host's
    own time needs; the order is then not reproducible)."""

    def __init__(self, *, seed: int = 0, eager: bool = False, threaded: bool = False):
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # (threaded) work queued: the GPU thread wakes
        self._done = threading.Condition(self._lock)  # (threaded) an event passed or a stream emptied
        self._threaded = threaded
        self._gpu = None
        self.calls: Counter = Counter()
        self.exec_cpu_s: Counter = Counter()  # CPU seconds running queued work (the "GPU"), by thread
        self.call_cpu_s: Counter = Counter()  # CPU seconds in calls through the driver table
        #                                       (trampolines included), by calling thread
        self._rng = random.Random(seed)
        self._eager = eager
        self._bases: list[int] = []          # sorted allocation addresses
        self._arrays: dict[int, np.ndarray] = {}
        self._next = _BASE
        self._host: dict[int, np.ndarray] = {}
        self._streams: dict[int, deque] = {}
        self._events: dict[int, list[int]] = {}  # event -> [recorded generation, completed generation]
        self._modules: dict[int, list] = {}
        self._functions: dict[int, str] = {}
        self._handles = iter(range(1, 1 << 40))
        self.launches: Counter = Counter()

    @_locked
    def close(self) -> None:
        """Drop every allocation, stream and event (as a process exiting does)."""
        self._arrays.clear()
        self._bases.clear()
        self._host.clear()
        self._streams.clear()
        self._events.clear()

    def cpu_in_fake(self, thread: int) -> float:
        """CPU seconds thread ``thread`` spent in the fake: its calls through the driver table
        (trampolines included) and the queued work it ran."""
        return self.call_cpu_s[thread] + self.exec_cpu_s[thread]

    def in_use(self) -> bool:
        """Memory, host memory or streams still allocated through it."""
        return bool(self._arrays or self._host or self._streams)

    # -- memory ------------------------------------------------------------------------------
    @_locked
    def mem_alloc(self, nbytes: int) -> int:
        self.calls["mem_alloc"] += 1
        address = self._next
        self._next += -(-nbytes // _ALIGN) * _ALIGN + _ALIGN  # a gap: overruns hit no allocation
        self._arrays[address] = np.zeros(nbytes, np.uint8)
        bisect.insort(self._bases, address)
        return address

    @_locked
    def mem_free(self, address: int) -> None:
        self.calls["mem_free"] += 1
        if address not in self._arrays:
            raise FakeDriverError(f"cuMemFree of {address:#x}, which is not allocated")
        del self._arrays[address]
        self._bases.remove(address)

    @_locked
    def view(self, address: int, nbytes: int) -> np.ndarray:
        """Device bytes [address, address + nbytes) (raises outside one allocation)."""
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0:
            base = self._bases[i]
            mem = self._arrays[base]
            if address + nbytes <= base + len(mem):
                return mem[address - base:address - base + nbytes]
        raise FakeDriverError(f"illegal address: {nbytes} bytes at {address:#x} are not in one allocation")

    def _strided(self, arg: _Array) -> np.ndarray:
        if not arg.nitems:
            return np.zeros(arg.shape, arg.dtype)
        extent = sum((n - 1) * s for n, s in zip(arg.shape, arg.strides)) + arg.itemsize
        region = self.view(arg.data, extent)
        return np.ndarray(arg.shape, arg.dtype, buffer=region, strides=arg.strides)

    @_locked
    def host_alloc(self, nbytes: int) -> int:
        self.calls["host_alloc"] += 1
        mem = np.zeros(nbytes, np.uint8)
        self._host[mem.ctypes.data] = mem
        return mem.ctypes.data

    @_locked
    def host_free(self, pointer: int) -> None:
        self.calls["host_free"] += 1
        if self._host.pop(pointer, None) is None:
            raise FakeDriverError(f"cuMemFreeHost of {pointer:#x}, which cuMemHostAlloc did not return")

    @_locked
    def context_current(self, device: int) -> None:
        self.calls["context_current"] += 1

    # -- streams and events --------------------------------------------------------------------
    @_locked
    def stream_create(self) -> int:
        self.calls["stream_create"] += 1
        handle = next(self._handles)
        self._streams[handle] = deque()
        return handle

    @_locked
    def stream_destroy(self, stream: int) -> None:
        self.calls["stream_destroy"] += 1
        self._run_until(lambda: not self._streams[stream])
        del self._streams[stream]

    @_locked
    def event_create(self) -> int:
        self.calls["event_create"] += 1
        handle = next(self._handles)
        self._events[handle] = [0, 0]
        return handle

    @_locked
    def event_destroy(self, event: int) -> None:
        self.calls["event_destroy"] += 1
        self._events.pop(event)

    @_locked
    def event_record(self, event: int, stream: int) -> None:
        self.calls["event_record"] += 1
        state = self._events[event]
        state[0] += 1
        generation = state[0]

        def complete():
            state[1] = max(state[1], generation)
        complete.signals = True  # (threaded) waiters look again
        self._queue(stream, complete, None)

    @_locked
    def stream_wait_event(self, stream: int, event: int) -> None:
        self.calls["stream_wait_event"] += 1
        state = self._events[event]
        generation = state[0]
        self._queue(stream, lambda: None, lambda: state[1] >= generation)

    @_locked
    def event_query(self, event: int) -> bool:
        self.calls["event_query"] += 1
        self._run_some(self._rng.randrange(4))
        state = self._events[event]
        return state[1] >= state[0]

    @_locked
    def event_synchronize(self, event: int) -> None:
        self.calls["event_synchronize"] += 1
        state = self._events[event]
        target = state[0]
        self._run_until(lambda: state[1] >= target)

    @_locked
    def stream_synchronize(self, stream: int) -> None:
        self.calls["stream_synchronize"] += 1
        self._run_until(lambda: not self._streams[stream])

    def idle(self) -> bool:
        """Nothing queued on any stream."""
        return not any(self._streams.values())

    @_locked
    def drain(self) -> None:
        """Run everything queued (what a GPU does on its own given time)."""
        self._run_until(self.idle)

    # -- the scheduler ---------------------------------------------------------------------------
    def _queue(self, stream: int, run, ready) -> None:
        if stream not in self._streams:
            raise FakeDriverError(f"stream {stream} does not exist")
        self._streams[stream].append((run, ready))
        if self._threaded:
            if self._gpu is None:
                self._gpu = threading.Thread(target=self._run_gpu, name="pipellm-fake-gpu", daemon=True)
                self._gpu.start()
            self._work.notify()
        elif self._eager:
            self._run_until(lambda: not self._streams[stream])

    def _ready(self) -> list:
        return [q for q in self._streams.values() if q and (q[0][1] is None or q[0][1]())]

    def _step(self) -> bool:
        ready = self._ready()
        if not ready:
            return False
        queue = self._rng.choice(ready)
        run, _ = queue.popleft()
        cpu = time.thread_time()
        try:
            run()
        finally:
            self.exec_cpu_s[threading.get_ident()] += time.thread_time() - cpu
        return True

    def _run_gpu(self) -> None:
        """The threaded fake's GPU: runs what is ready (outside the lock, so the host's
        calls go on meanwhile; the op leaves its stream only once it ran), sleeps while
        nothing is."""
        while True:
            with self._lock:
                ready = self._ready()
                while not ready:
                    self._work.wait(0.05)
                    ready = self._ready()
                queue = self._rng.choice(ready)
                run = queue[0][0]
            cpu = time.thread_time()
            run()
            with self._lock:
                queue.popleft()
                self.exec_cpu_s[threading.get_ident()] += time.thread_time() - cpu
                if not queue or getattr(run, "signals", False):
                    self._done.notify_all()

    def _run_some(self, steps: int) -> None:
        if self._threaded:
            return
        for _ in range(steps):
            if not self._step():
                return

    def _run_until(self, done) -> None:
        if self._threaded:
            while not done():
                self._done.wait(1.0)
            return
        while not done():
            if not self._step():
                raise FakeDriverError("deadlock: waiting for work that can never run (a wait on an event "
                                      "recorded behind it, or one never recorded)")

    # -- copies --------------------------------------------------------------------------------------
    @_locked
    def copy_htod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls["copy_htod"] += 1
        target = self.view(dst, nbytes)  # checked now; the host bytes are read when it runs

        def run():
            target[:] = np.frombuffer(ctypes.string_at(src, nbytes), np.uint8)
        self._queue(stream, run, None)

    @_locked
    def copy_dtoh(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls["copy_dtoh"] += 1
        source = self.view(src, nbytes)
        self._queue(stream, lambda: ctypes.memmove(dst, source.ctypes.data, nbytes), None)

    @_locked
    def copy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.calls["copy_dtod"] += 1
        target, source = self.view(dst, nbytes), self.view(src, nbytes)

        def run():
            target[:] = source
        self._queue(stream, run, None)

    # -- modules and launches ------------------------------------------------------------------------
    @_locked
    def module_load(self, image_head: bytes) -> int:
        self.calls["module_load"] += 1
        handle = next(self._handles)
        self._modules[handle] = []
        return handle

    @_locked
    def module_function(self, module: int, name: str) -> int:
        self.calls["module_function"] += 1
        kernel = next((k for k in driverpath.NAMES if k in name), None)
        if module not in self._modules or kernel is None:
            raise FakeDriverError(f"no kernel {name!r} in module {module}")
        handle = next(self._handles)
        self._functions[handle] = kernel
        return handle

    @_locked
    def param_count(self, function: int) -> int:
        return driverpath.param_words(self._functions[function])

    @_locked
    def launch(self, function: int, grid, block, shared: int, stream: int, words) -> None:
        self.calls["launch"] += 1
        name = self._functions[function]
        self.launches[name] += 1
        args, at = [], 0
        for dtype, ndim, _ in driverpath.SIGNATURES[name]:
            if ndim == 0:
                args.append(words[at])
                at += 1
            else:
                args.append(_Array(dtype, words[at:at + 5 + 2 * ndim]))
                at += 5 + 2 * ndim
        check = getattr(self, f"_check_{name}")
        check(grid, block, *args)
        self._queue(stream, lambda: getattr(self, f"_run_{name}")(*args), None)

    # -- the kernels' effects -----------------------------------------------------------------------
    def _key(self, te: _Array, rk: _Array) -> bytes:
        te_v, rk_v = self._strided(te), self._strided(rk)
        key = rk_v[:8].astype(">u4").tobytes()
        if not np.array_equal(te_v, TE0) or not np.array_equal(rk_v, expand_key(key)):
            raise FakeDriverError("a launch was given a T-table or round keys that are not AES-256's")
        return key

    @staticmethod
    def _cover(what: str, have: int, need: int) -> None:
        if have < need:
            raise FakeDriverError(f"{what}: the grid covers {have}, the work needs {need}")

    def _check_ghash_kernel(self, grid, block, h_table, powers, data32, offs, lens, aad32, aad_len, acc):
        n = lens.shape[0]
        self._cover("ghash_kernel messages (grid y)", grid[1], n)
        longest = int(self._strided(lens).max()) if n else 0
        chunks = -(-((aad_len + 15) // 16 + (longest + 15) // 16 + 1) // 64)
        self._cover("ghash_kernel chunks (grid x * block x)", grid[0] * block[0], chunks)
        self._cover("ghash_kernel chunk powers", powers.shape[0], chunks)

    def _run_ghash_kernel(self, h_table, powers, data32, offs, lens, aad32, aad_len, acc):
        ht = self._strided(h_table)
        # (nibble j, value n) -> (n at nibble j) * H, as two 64-bit halves
        words = ht.reshape(32, 4, 16).transpose(0, 2, 1).astype(np.uint64)
        t_hi, t_lo = (words[..., 0] << 32) | words[..., 1], (words[..., 2] << 32) | words[..., 3]
        offs_v, lens_v, aad_v, acc_v = (self._strided(a) for a in (offs, lens, aad32, acc))
        data = self.view(data32.data, data32.nitems * 4)
        pw = self._strided(powers).astype(np.uint64)
        aad_blocks = (aad_len + 15) // 16
        for i in range(len(lens_v)):
            length = int(lens_v[i])
            aad = aad_v[i].astype(np.uint64).reshape(-1, 4)[:aad_blocks]
            body = np.zeros(-(-length // 16) * 16, np.uint8)
            body[:length] = data[int(offs_v[i]):int(offs_v[i]) + length]
            blocks = body.view(">u4").astype(np.uint64).reshape(-1, 4)
            last = np.array([[0, aad_len * 8, 0, length * 8]], np.uint64)
            x = np.concatenate([aad, blocks, last])
            x_hi, x_lo = (x[:, 0] << 32) | x[:, 1], (x[:, 2] << 32) | x[:, 3]
            g_hi, g_lo = _ghash_chunked(x_hi, x_lo, t_hi, t_lo, pw)
            acc_v[i] ^= np.array([g_hi >> 32, g_hi & 0xFFFFFFFF, g_lo >> 32, g_lo & 0xFFFFFFFF], np.uint32)

    def _check_tag_kernel(self, grid, block, te, rk, ivs, acc, tags, ok, check):
        self._cover("tag_kernel messages (grid x * block x)", grid[0] * block[0], ivs.shape[0])

    def _run_tag_kernel(self, te, rk, ivs, acc, tags, ok, check):
        key = self._key(te, rk)
        ivs_v, acc_v, tags_v, ok_v = (self._strided(a) for a in (ivs, acc, tags, ok))
        ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        for i in range(ivs_v.shape[0]):
            j0 = ivs_v[i].astype(">u4").tobytes() + (1).to_bytes(4, "big")
            mask = np.frombuffer(ecb.update(j0), ">u4").astype(np.uint32)
            tag = acc_v[i] ^ mask
            acc_v[i] = 0
            if check:
                ok_v[i] = 1 if np.array_equal(tag, tags_v[i]) else 0
            else:
                tags_v[i], ok_v[i] = tag, 1

    def _check_ctr_kernel(self, grid, block, te, rk, ivs, src32, src_offs, dst8, dst32, dst_offs, lens, ok):
        n = lens.shape[0]
        self._cover("ctr_kernel messages (grid y)", grid[1], n)
        longest = int(self._strided(lens).max()) if n else 0
        self._cover("ctr_kernel blocks (grid x * block x)", grid[0] * block[0], -(-longest // 16))

    def _run_ctr_kernel(self, te, rk, ivs, src32, src_offs, dst8, dst32, dst_offs, lens, ok):
        key = self._key(te, rk)
        ivs_v, so, do, lens_v, ok_v = (self._strided(a) for a in (ivs, src_offs, dst_offs, lens, ok))
        src = self.view(src32.data, src32.nitems * 4)
        dst = self.view(dst8.data, dst8.nitems)
        for i in range(len(lens_v)):
            if not ok_v[i]:
                continue
            n = int(lens_v[i])
            counter = ivs_v[i].astype(">u4").tobytes() + (2).to_bytes(4, "big")
            stream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
            out = stream.update(src[int(so[i]):int(so[i]) + n].tobytes())
            dst[int(do[i]):int(do[i]) + n] = np.frombuffer(out, np.uint8)

    def _check_commit_kernel(self, grid, block, ok, rows64, plain, flag):
        self._cover("commit_kernel messages (grid y)", grid[1], rows64.shape[0])

    def _run_commit_kernel(self, ok, rows64, plain, flag):
        ok_v, rows, plain_v, flag_v = (self._strided(a) for a in (ok, rows64, plain, flag))
        if flag_v[0]:
            return
        for row in rows:
            off, length, dst, upto = (int(v) for v in row[12:16])
            if dst and ok_v[:upto + 1].all():
                self.view(dst, length)[:] = plain_v[off:off + length]

    def _check_status_kernel(self, grid, block, ok, flag, status):
        pass

    def _check_spin_kernel(self, grid, block, ns):
        if ns < 0:
            raise FakeDriverError(f"spin_kernel for {ns} ns")

    def _run_spin_kernel(self, ns):
        time.sleep(ns / 1e9)  # the GPU busy: the thread the work runs on waits that long

    def _run_status_kernel(self, ok, flag, status):
        ok_v, flag_v, status_v = (self._strided(a) for a in (ok, flag, status))
        refused = np.flatnonzero(ok_v == 0)
        status_v[0] = int(refused[0]) if len(refused) else -1
        if len(refused):
            flag_v[0] = 1


def installed(seed: int = 0) -> FakeDriver:
    """The process's fake driver (the one the driver table calls), made on first use with
    ``seed`` (or ``$PIPELLM_FAKE_SEED``, to run a suite under other schedules): what
    ``open_device("cuda", path="driver", driver="fake")`` runs on."""
    import os

    from .._ext.driver import installed_fake
    fake = installed_fake()
    return fake if fake is not None else FakeDriver(seed=int(os.environ.get("PIPELLM_FAKE_SEED", seed)))


_R = np.uint64(0xE1 << 56)


def _mul_table(x_hi, x_lo, t_hi, t_lo):
    """x * H for every element, through H's 4-bit table (nibble 0 is the most significant)."""
    z_hi = np.zeros_like(x_hi)
    z_lo = np.zeros_like(x_lo)
    for j in range(32):
        word, shift = (x_hi, 60 - 4 * j) if j < 16 else (x_lo, 60 - 4 * (j - 16))
        nibble = (word >> np.uint64(shift)) & np.uint64(0xF)
        z_hi ^= t_hi[j][nibble]
        z_lo ^= t_lo[j][nibble]
    return z_hi, z_lo


def _mul(x_hi, x_lo, y_hi, y_lo):
    """x * y in GF(2^128), GCM bit order, element-wise (NIST SP 800-38D algorithm 1)."""
    z_hi, z_lo = np.zeros_like(x_hi), np.zeros_like(x_lo)
    v_hi, v_lo = y_hi.copy(), y_lo.copy()
    one = np.uint64(1)
    for i in range(128):
        word, shift = (x_hi, 63 - i) if i < 64 else (x_lo, 127 - i)
        bit = ((word >> np.uint64(shift)) & one).astype(bool)
        z_hi ^= np.where(bit, v_hi, 0).astype(np.uint64)
        z_lo ^= np.where(bit, v_lo, 0).astype(np.uint64)
        carry = (v_lo & one).astype(bool)
        v_lo = (v_lo >> one) | (v_hi << np.uint64(63))
        v_hi = (v_hi >> one) ^ np.where(carry, _R, 0).astype(np.uint64)
    return z_hi, z_lo


def _ghash_chunked(x_hi, x_lo, t_hi, t_lo, powers):
    """GHASH of blocks x as ghash_kernel computes it: chunks of 64 blocks counted from the
    end, each by Horner's rule, chunk k times powers[k] = H^(64k), XORed together."""
    m = len(x_hi)
    chunks = -(-m // 64)
    pad = chunks * 64 - m  # zero blocks in front leave Horner's rule unchanged
    h = np.concatenate([np.zeros(pad, np.uint64), x_hi]).reshape(chunks, 64)
    lo = np.concatenate([np.zeros(pad, np.uint64), x_lo]).reshape(chunks, 64)
    s_hi, s_lo = np.zeros(chunks, np.uint64), np.zeros(chunks, np.uint64)
    for b in range(64):
        s_hi, s_lo = _mul_table(s_hi ^ h[:, b], s_lo ^ lo[:, b], t_hi, t_lo)
    k = np.arange(chunks - 1, -1, -1)  # row r is chunk chunks-1-r from the end
    p_hi, p_lo = (powers[k, 0] << np.uint64(32)) | powers[k, 1], (powers[k, 2] << np.uint64(32)) | powers[k, 3]
    s_hi, s_lo = _mul(s_hi, s_lo, p_hi, p_lo)
    return int(np.bitwise_xor.reduce(s_hi)), int(np.bitwise_xor.reduce(s_lo))
