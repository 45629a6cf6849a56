"""GPU kernels of the cuda device: AES-256-GCM with Numba CUDA (``pipellm.kernels.aesgcm``).

Needs ``numba-cuda`` (``pip install 'pipellm[cuda]'``). Without a GPU the kernels run
under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported):
slow, for tests on small messages. ``compile_for(cc)`` compiles them to PTX for a GPU
architecture without needing one.

Example (under the simulator or on a GPU)::

    >>> import os
    >>> from pipellm.kernels import KernelKey, seal_batch, open_batch   # doctest: +SKIP
    >>> key = KernelKey(os.urandom(32))                                   # doctest: +SKIP
    >>> sealed = seal_batch(key, [bytes(12)], [b"header"], [b"secret"])   # doctest: +SKIP
    >>> open_batch(key, [bytes(12)], [b"header"], sealed)[0].tobytes()    # doctest: +SKIP
    b'secret'
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import ArgumentError
from .tables import CHUNK_BLOCKS, TE0, GcmKey

# numba-cuda (0.30.4 at least) registers an overload for np.row_stack, which NumPy 2.4
# removed: its first compile then fails with AttributeError. The alias lets it load.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

TAG_BYTES = 16
MAX_AAD_BYTES = 64  # the channel's header is 56 bytes


def unavailable_reason() -> str | None:
    """Why the kernels can't run here (None: they can, on a GPU or the simulator)."""
    try:
        from numba import config, cuda
    except ImportError as exc:
        return f"numba-cuda is not installed (pip install 'pipellm[cuda]'): {exc}"
    if config.ENABLE_CUDASIM:
        return None
    try:
        if not cuda.is_available():
            return "no CUDA GPU or driver (set NUMBA_ENABLE_CUDASIM=1 to run the kernels in the simulator)"
    except Exception as exc:  # noqa: BLE001 - a driver that fails to load
        return f"CUDA is unusable here: {exc}"
    return None


class KernelKey:
    """One AES-256 key's tables on the device (round keys, T-table, H's table, chunk
    powers of H), made once per key and reused by every launch."""

    def __init__(self, key: bytes):
        from numba import cuda
        key = bytes(key)
        if len(key) != 32:
            raise ArgumentError(f"AES-256 needs a 32-byte key, got {len(key)} bytes")
        self._host = GcmKey(key)
        self.te = cuda.to_device(TE0)
        self.round_keys = cuda.to_device(self._host.round_keys)
        # (nibble, word, value): ghash_kernel's bank-conflict-free layout of H's table
        self.h_table = cuda.to_device(np.ascontiguousarray(self._host.h_table.transpose(0, 2, 1)).reshape(-1))
        self._powers = None

    def powers(self, chunks: int):
        """Device array of H^(k*CHUNK_BLOCKS), k < ``chunks`` (grown on demand)."""
        from numba import cuda
        if self._powers is None or self._powers.shape[0] < chunks:
            self._powers = cuda.to_device(self._host.ensure_chunks(chunks))
        return self._powers


def _words(b: bytes, n: int) -> np.ndarray:
    """``b`` zero-padded to ``4n`` bytes as big-endian uint32 words."""
    return np.frombuffer(bytes(b).ljust(4 * n, b"\0"), dtype=">u4").astype(np.uint32)


def _pack(items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte strings laid out at 16-byte aligned offsets: (buffer, offsets, lengths)."""
    lens = np.array([len(x) for x in items], dtype=np.int64)
    padded = (lens + 15) // 16 * 16
    offs = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    buf = np.zeros(max(int(padded.sum()), 16), dtype=np.uint8)
    for x, o in zip(items, offs):
        buf[o:o + len(x)] = np.frombuffer(bytes(x), dtype=np.uint8)
    return buf, offs, lens


def _check_batch(ivs, aads, n):
    if not (len(ivs) == len(aads) == n) or n == 0:
        raise ArgumentError(f"a batch needs as many IVs and AADs as messages (at least one), "
                            f"got {len(ivs)} IVs, {len(aads)} AADs, {n} messages")
    if any(len(iv) != 12 for iv in ivs):
        raise ArgumentError("every IV must be 12 bytes (96 bits, as the channel uses)")
    if len({len(a) for a in aads}) != 1 or len(aads[0]) > MAX_AAD_BYTES:
        raise ArgumentError(f"every AAD of a batch must have the same length, at most {MAX_AAD_BYTES} bytes")


def _grid(count: int, threads: int) -> int:
    return max(1, (count + threads - 1) // threads)


def _threads(threads: int) -> int:
    from .aesgcm import REDUCE, THREADS
    threads = threads or THREADS
    if threads & (threads - 1) or not 1 <= threads <= REDUCE:
        raise ArgumentError(f"threads per block must be a power of two from 1 to {REDUCE}, got {threads}")
    return threads


class Scratch:
    """Device arrays that launches reuse instead of allocating (an allocation costs far
    more than a small kernel): ``put`` copies a small host array into a kept one (grown
    when too small) on a stream and returns the view of its rows; ``zeros`` returns
    rows of a kept array that is zero between launches (the GHASH accumulators, which
    ``tag_kernel`` clears after reading). One launch sequence at a time per Scratch."""

    def __init__(self):
        self._arrays: dict[str, object] = {}

    def _rows(self, name: str, rows: int, shape: tuple, dtype, zero: bool):
        from numba import cuda
        have = self._arrays.get(name)
        if have is None or have.shape[0] < rows or have.shape[1:] != shape or have.dtype != dtype:
            rows_kept = max(rows, 16, 2 * have.shape[0] if have is not None else 0)
            have = self._arrays[name] = (cuda.to_device(np.zeros((rows_kept,) + shape, dtype)) if zero
                                         else cuda.device_array((rows_kept,) + shape, dtype))
        return have[:rows]

    def put(self, name: str, host: np.ndarray, stream=0):
        host = np.ascontiguousarray(host)
        rows = self._rows(name, host.shape[0], host.shape[1:], host.dtype, zero=False)
        rows.copy_to_device(host, stream=stream)
        return rows

    def zeros(self, name: str, rows: int, shape: tuple, dtype):
        return self._rows(name, rows, shape, np.dtype(dtype), zero=True)


def _ghash(key: KernelKey, data, offs, lens: np.ndarray, lens_d, aad, aad_len: int, threads: int, stream,
           acc):
    from .aesgcm import ghash_kernel
    n = len(lens)
    chunks = _grid((aad_len + 15) // 16 + (int(lens.max()) + 15) // 16 + 1, CHUNK_BLOCKS)
    ghash_kernel[(_grid(chunks, threads), n), threads, stream](
        key.h_table, key.powers(chunks), data.view(np.uint32), offs, lens_d, aad, aad_len, acc)
    return acc


def _ctr(key: KernelKey, ivs, src, src_offs, dst, dst_offs, lens: np.ndarray, lens_d, ok, threads: int, stream):
    from .aesgcm import ctr_kernel
    ctr_kernel[(_grid(_grid(int(lens.max()), 16), threads), len(lens)), threads, stream](
        key.te, key.round_keys, ivs, src.view(np.uint32), src_offs, dst, dst.view(np.uint32), dst_offs, lens_d, ok)


def open_into(key: KernelKey, ivs, aad, aad_len: int, data, offs, lens: np.ndarray, tags, out, out_offs,
              *, threads: int = 0, stream=0, scratch: Scratch | None = None, lens_d=None, acc=None, ok=None):
    """Authenticate and decrypt a batch already on the device; returns ``ok`` (device
    uint32 per message). Message i's ciphertext is ``data[offs[i]:+lens[i]]``, its tag
    ``tags[i]`` (4 big-endian words), its AAD row ``aad[i]`` (``aad_len`` bytes as
    big-endian words, zero-padded), its IV ``ivs[i]`` (3 words). Its plaintext goes to
    ``out[out_offs[i]:+lens[i]]`` only if the tag verified: a refused message's
    destination is not touched. Offsets are multiples of 16; ``lens`` is on the host.
    Everything is queued on ``stream`` (a numba stream; 0: the default stream). With a
    ``scratch``, nothing is allocated (``ok`` is then its rows: read them before the
    scratch's next launch). A caller that keeps its own device arrays passes ``lens_d``
    (``lens`` on the device), ``acc`` (n x 4 uint32, all 0: they are left 0) and ``ok``."""
    from .aesgcm import tag_kernel
    threads = _threads(threads)
    n = len(lens)
    scratch = scratch or Scratch()
    if lens_d is None:
        lens_d = scratch.put("lens", np.asarray(lens, dtype=np.int64), stream)
    acc = _ghash(key, data, offs, lens, lens_d, aad, aad_len, threads, stream,
                 scratch.zeros("acc", n, (4,), np.uint32) if acc is None else acc)
    ok = scratch.zeros("ok", n, (), np.uint32) if ok is None else ok
    tag_kernel[_grid(n, threads), threads, stream](key.te, key.round_keys, ivs, acc, tags, ok, 1)
    _ctr(key, ivs, data, offs, out, out_offs, lens, lens_d, ok, threads, stream)
    return ok


def seal_into(key: KernelKey, ivs, aad, aad_len: int, src, src_offs, lens: np.ndarray, out, out_offs, tags,
              *, threads: int = 0, stream=0, scratch: Scratch | None = None) -> None:
    """Encrypt a batch already on the device: ciphertext of message i into
    ``out[out_offs[i]:+lens[i]]``, its tag into ``tags[i]``. Layout as :func:`open_into`."""
    from .aesgcm import tag_kernel
    threads = _threads(threads)
    n = len(lens)
    scratch = scratch or Scratch()
    lens_d = scratch.put("lens", np.asarray(lens, dtype=np.int64), stream)
    ok = scratch.put("ones", np.ones(n, dtype=np.uint32), stream)
    _ctr(key, ivs, src, src_offs, out, out_offs, lens, lens_d, ok, threads, stream)
    acc = _ghash(key, out, out_offs, lens, lens_d, aad, aad_len, threads, stream, scratch.zeros("acc", n, (4,), np.uint32))
    tag_kernel[_grid(n, threads), threads, stream](key.te, key.round_keys, ivs, acc, tags, ok, 0)


def _batch_arrays(ivs, aads, stream=0, scratch: Scratch | None = None):
    """IVs and AADs of a batch as device word arrays (in ``scratch``'s kept arrays if given)."""
    scratch = scratch or Scratch()
    return (scratch.put("ivs", np.stack([_words(iv, 3) for iv in ivs]), stream),
            scratch.put("aads", np.stack([_words(a, MAX_AAD_BYTES // 4) for a in aads]), stream))


def open_batch(key: KernelKey, ivs, aads, payloads, *, threads: int = 0) -> list:
    """Authenticate and decrypt messages (ciphertext || 16-byte tag) on the GPU: for each,
    its plaintext (numpy uint8) or None where the tag is wrong."""
    from numba import cuda
    _check_batch(ivs, aads, len(payloads))
    if any(len(p) < TAG_BYTES for p in payloads):
        raise ArgumentError(f"a message is at least its {TAG_BYTES}-byte tag")
    buf, offs, lens = _pack([bytes(p)[:-TAG_BYTES] for p in payloads])
    tags = np.stack([_words(bytes(p)[-TAG_BYTES:], 4) for p in payloads])
    ivs_d, aad_d = _batch_arrays(ivs, aads)
    data, offs_d, out = cuda.to_device(buf), cuda.to_device(offs), cuda.to_device(np.zeros_like(buf))
    ok = open_into(key, ivs_d, aad_d, len(aads[0]), data, offs_d, lens, cuda.to_device(tags), out, offs_d,
                   threads=threads)
    plain, ok = out.copy_to_host(), ok.copy_to_host()
    return [plain[o:o + n].copy() if k else None for o, n, k in zip(offs, lens, ok)]


def seal_batch(key: KernelKey, ivs, aads, plaintexts, *, threads: int = 0) -> list[bytes]:
    """Encrypt messages on the GPU: for each, ciphertext || 16-byte tag, as the channel's
    CPU side produces them."""
    from numba import cuda
    _check_batch(ivs, aads, len(plaintexts))
    buf, offs, lens = _pack(plaintexts)
    ivs_d, aad_d = _batch_arrays(ivs, aads)
    src, offs_d, out = cuda.to_device(buf), cuda.to_device(offs), cuda.to_device(np.zeros_like(buf))
    tags = cuda.to_device(np.zeros((len(lens), 4), dtype=np.uint32))
    seal_into(key, ivs_d, aad_d, len(aads[0]), src, offs_d, lens, out, offs_d, tags, threads=threads)
    cipher, tags = out.copy_to_host(), tags.copy_to_host()
    return [cipher[o:o + n].tobytes() + tags[i].astype(">u4").tobytes() for i, (o, n) in enumerate(zip(offs, lens))]


def compile_for(cc: tuple[int, int] = (9, 0)) -> dict[str, str]:
    """PTX of every kernel for compute capability ``cc`` (no GPU needed): name -> PTX."""
    from numba import cuda, int64, uint8, uint32
    from numba.core import types
    u32 = uint32[::1]
    u32_2d = types.Array(uint32, 2, "C")
    i64 = int64[::1]
    signatures = {
        "ghash_kernel": (u32, u32_2d, u32, i64, i64, u32_2d, int64, u32_2d),
        "tag_kernel": (u32, u32, u32_2d, u32_2d, u32_2d, u32, int64),
        "ctr_kernel": (u32, u32, u32_2d, u32, i64, uint8[::1], u32, i64, i64, u32),
    }
    from . import aesgcm
    with _device_functions_for(cc):
        return {name: cuda.compile_ptx(getattr(aesgcm, name).py_func, sig, cc=cc)[0]
                for name, sig in signatures.items()}


@contextlib.contextmanager
def _device_functions_for(cc):
    """numba-cuda compiles the device functions a kernel calls for the *current* GPU, even
    inside ``compile_ptx``; with no GPU, tell it the target's compute capability (the
    final PTX is generated for ``cc`` either way)."""
    from numba import cuda
    from numba.cuda import dispatcher
    if cuda.is_available():
        yield
        return

    class Target:
        compute_capability = tuple(cc)

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: Target
    try:
        yield
    finally:
        dispatcher.get_current_device = real
