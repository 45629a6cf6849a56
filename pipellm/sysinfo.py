"""What this machine is, for ``pipellm info`` and for every benchmark result."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata

#: CPU flags that decide AES-GCM speed (AES-NI, carry-less multiply, their vector forms)
CRYPTO_FLAGS = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f", "sha_ni")


def _cpu() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU, cores, crypto features, library versions and limits, as plain data."""
    from cryptography.hazmat.backends.openssl.backend import backend

    model, flags = _cpu()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cpu_crypto_flags": {flag: flag in flags for flag in CRYPTO_FLAGS},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "openssl_behind_cryptography": backend.openssl_version_text(),
        "versions": {name: _version(name) for name in
                     ("pipellm", "cryptography", "numpy", "Cython", "cuda-bindings", "numba", "numba-cuda")},
        "rlimit_memlock": "unlimited" if soft == resource.RLIM_INFINITY else soft,
    }
