"""The kernels of the cuda device's driver path (``pipellm._ext.gpupath``): their argument
layouts, and their PTX, compiled once per GPU architecture and kept on disk.

The layouts are written here without numba, so the fake driver can decode the parameter
blocks gpupath packs without importing it: each argument is ``(dtype, ndim, layout)`` for
an array (numba's ABI passes meminfo, parent, nitems, itemsize, data, shape, strides:
5 + 2 * ndim 8-byte words) or ``("int64", 0, "")`` for a scalar (one word).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_U32, _U8, _I64 = "uint32", "uint8", "int64"

#: argument layouts by kernel, in gpupath's packing order ("A": strided views of the rows)
SIGNATURES: dict[str, tuple[tuple[str, int, str], ...]] = {
    "ghash_kernel": ((_U32, 1, "C"), (_U32, 2, "C"), (_U32, 1, "C"), (_I64, 1, "A"), (_I64, 1, "A"),
                     (_U32, 2, "A"), (_I64, 0, ""), (_U32, 2, "C")),
    "tag_kernel": ((_U32, 1, "C"), (_U32, 1, "C"), (_U32, 2, "A"), (_U32, 2, "C"), (_U32, 2, "A"),
                   (_U32, 1, "C"), (_I64, 0, "")),
    "ctr_kernel": ((_U32, 1, "C"), (_U32, 1, "C"), (_U32, 2, "A"), (_U32, 1, "C"), (_I64, 1, "A"),
                   (_U8, 1, "C"), (_U32, 1, "C"), (_I64, 1, "A"), (_I64, 1, "A"), (_U32, 1, "C")),
    "commit_kernel": ((_U32, 1, "C"), (_I64, 2, "A"), (_U8, 1, "C"), (_U32, 1, "C")),
    "status_kernel": ((_U32, 1, "C"), (_U32, 1, "C"), (_I64, 1, "C")),
    "spin_kernel": ((_I64, 0, ""),),
}
NAMES = tuple(SIGNATURES)  # gpupath.KERNELS, in the same order
_MODULES = {"spin_kernel": "spin"}  # where a kernel is defined, if not in aesgcm


def param_words(name: str) -> int:
    """8-byte words in kernel ``name``'s parameter block."""
    return sum(1 if ndim == 0 else 5 + 2 * ndim for _, ndim, _ in SIGNATURES[name])


def _numba_signature(name: str):
    from numba import types
    out = []
    for dtype, ndim, layout in SIGNATURES[name]:
        scalar = getattr(types, dtype)
        out.append(scalar if ndim == 0 else types.Array(scalar, ndim, layout))
    return tuple(out)


def _source_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for part in ("aesgcm.py", "driverpath.py", "spin.py", "tables.py"):
        digest.update((here / part).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("PIPELLM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                          or os.path.expanduser("~/.cache"), "pipellm")
    return Path(base)


def ptx(cc: tuple[int, int]) -> dict[str, tuple[str, str]]:
    """Kernel name -> (PTX entry name, PTX module) for compute capability ``cc``, compiled
    by numba-cuda the first time (no GPU needed) and read from the cache after."""
    path = cache_dir() / f"driverpath-sm{cc[0]}{cc[1]}-{_source_digest()}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        pass
    import importlib

    from numba import cuda

    from . import _device_functions_for
    out = {}
    with _device_functions_for(cc):
        for name in NAMES:
            module = importlib.import_module(f"{__package__}.{_MODULES.get(name, 'aesgcm')}")
            code, _ = cuda.compile_ptx(getattr(module, name).py_func, _numba_signature(name), cc=cc)
            out[name] = (entry_name(code), code)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: compiled again next time
    return out


def entry_name(code: str) -> str:
    """The one kernel entry point of a PTX module."""
    (name,) = re.findall(r"\.entry\s+([\w$]+)\s*\(", code)
    return name


def entry_params(code: str) -> int:
    """Parameters the PTX entry point declares (each 8 bytes in numba's ABI)."""
    body = code[code.index(".entry"):]
    body = body[:body.index(")")]
    return len(re.findall(r"\.param\s", body))
