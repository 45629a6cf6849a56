"""The cuda device's host-to-device path over the driver (``pipellm._ext.gpupath``): the
kernels loaded, the per-key tables on the device, the staging in groups.

Messages are staged one driver call each; a group is verified, decrypted and committed
on the GPU, the commit decided there (see ``pipellm._ext.gpupath``). The same object
runs on the real driver or on :class:`~pipellm.devices.fakedriver.FakeDriver`::

    >>> import os
    >>> from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    >>> from pipellm.devices.fakedriver import FakeDriver
    >>> from pipellm.devices.gpupath import DriverPath
    >>> fake = FakeDriver(seed=1)
    >>> path = DriverPath.fake(fake, staging_bytes=1 << 16)
    >>> secret, iv, aad = os.urandom(32), os.urandom(12), bytes(56)
    >>> sealed = AESGCM(secret).encrypt(iv, b"weights!" * 4, aad)
    >>> dst = path.driver.alloc(32)
    >>> key = path.key(secret)
    >>> path.room(32)
    True
    >>> position, _ = path.stage(key, iv, aad, sealed, 32)
    >>> path.commit(position, dst, position)
    >>> path.result(path.launch(session=0))
    -1
    >>> bytes(fake.view(dst, 32))
    b'weights!weights!weights!weights!'
    >>> path.driver.free(dst)
    >>> path.close()
    >>> fake.in_use()
    False
"""

from __future__ import annotations

import numpy as np

from .._ext.driver import Driver
from .._ext.gpupath import ROW, H2DPath, KeyTables, chunks_needed
from .._ext.sealpath import D2HSealer
from ..kernels import driverpath
from ..kernels.tables import TE0, GcmKey

_KEYS_KEPT = 8  # keys' tables kept on the device (epochs in flight)


class _Key:
    """One key's tables: the host arrays stay referenced while the device copies may run."""

    def __init__(self, path: "DriverPath", secret: bytes):
        self.host = GcmKey(secret)
        self.keep = [self.host.round_keys, np.ascontiguousarray(self.host.h_table.transpose(0, 2, 1)).reshape(-1)]
        driver, stream = path.driver, path.h2d.kernel_stream
        self.addresses = [driver.alloc(60 * 4), driver.alloc(2048 * 4)]
        for address, host in zip(self.addresses, self.keep):
            driver.copy_htod(address, host.view(np.uint8), stream)
        self.tables = KeyTables(self.addresses[0], self.addresses[1], 0, 0)
        self.grow(path, 1)

    def grow(self, path: "DriverPath", chunks: int) -> None:
        """Powers of H for ``chunks`` chunks (at least doubling, so growth is rare)."""
        chunks = max(chunks, 2 * self.tables.chunks, 16)
        powers = np.ascontiguousarray(self.host.ensure_chunks(chunks)[:chunks])
        address = path.driver.alloc(powers.nbytes)
        path.driver.copy_htod(address, powers.reshape(-1).view(np.uint8), path.h2d.kernel_stream)
        self.keep.append(powers)
        self.addresses.append(address)
        self.tables.grown(address, chunks)


class DriverPath:
    """Host-to-device staging, verification and commits on a GPU, through ``driver``.
    Use :meth:`real` or :meth:`fake`."""

    def __init__(self, driver: Driver, *, staging_bytes: int = 64 << 20, max_rows: int = 1024,
                 sessions: int = 64, group_rows: int = 0, cc: tuple[int, int] | None = None):
        self.driver = driver
        driver.use_context()
        if driver.kind == "fake":
            functions = tuple(driver.load(b"fake", [name])[0] for name in driverpath.NAMES)
        else:
            compiled = driverpath.ptx(cc)
            functions = tuple(driver.load(compiled[name][1].encode(), [compiled[name][0]])[0]
                              for name in driverpath.NAMES)
        self.h2d = H2DPath(driver, functions, staging_bytes=staging_bytes, max_rows=max_rows, sessions=sessions,
                           group_rows=group_rows)
        self._zeros = bytes(max(max_rows * 16, sessions * 4))
        self.h2d.clear_device(self._zeros, self._zeros)
        self._te = driver.alloc(TE0.nbytes)
        driver.copy_htod(self._te, TE0.view(np.uint8), self.h2d.kernel_stream)
        self.h2d.set_te(self._te)
        self._init = bytes(16) + (1).to_bytes(4, "little")
        self.d2h = D2HSealer(driver, functions[:3], self.h2d.kernel_stream, self._te, staging_bytes, self._init)
        self._keys: dict[bytes, _Key] = {}
        self._retired: list[_Key] = []

    @classmethod
    def fake(cls, fake, **kw) -> "DriverPath":
        """On a :class:`~pipellm.devices.fakedriver.FakeDriver` (no GPU needed)."""
        return cls(Driver.fake(fake), **kw)

    @classmethod
    def real(cls, device_id: int = 0, *, cc: tuple[int, int], **kw) -> "DriverPath":
        """On the CUDA driver, device ``device_id`` of compute capability ``cc``."""
        return cls(Driver.real(device_id), cc=cc, **kw)

    def key(self, secret: bytes, key_id: bytes | None = None) -> KeyTables:
        """The device tables of AES-256 key ``secret`` (made once, kept for the last few keys)."""
        key_id = bytes(secret) if key_id is None else key_id
        key = self._keys.get(key_id)
        if key is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._retired.append(self._keys.pop(next(iter(self._keys))))
            if self.h2d.idle:  # no group left that could read a retired key's tables
                self._free(self._retired)
            key = self._keys[key_id] = _Key(self, bytes(secret))
        return key.tables

    def _free(self, keys: list) -> None:
        for key in keys:
            for address in key.addresses:
                self.driver.free(address)
        keys.clear()

    def room(self, nbytes: int) -> bool:
        """Whether the group being staged takes one more message of ``nbytes`` (if not:
        launch it first)."""
        return self.h2d.room(nbytes)

    def _cover(self, tables: KeyTables, nbytes: int) -> None:
        """Grow the key's powers of H when a message of ``nbytes`` needs more."""
        if nbytes > tables.max_bytes():
            key = next(k for k in (*self._keys.values(), *self._retired) if k.tables is tables)
            key.grow(self, chunks_needed(nbytes))

    def stage(self, tables: KeyTables, iv, aad, payload, nbytes: int) -> tuple[int, int]:
        """Stage a message (ciphertext || tag in ``payload``, kept unchanged until its
        group's copies ran): (its position in the group, its staging offset)."""
        self._cover(tables, nbytes)
        return self.h2d.stage(tables, iv, aad, payload, nbytes)

    def seal(self, tables: KeyTables, iv, aad, src: int, nbytes: int, out) -> None:
        """Seal ``nbytes`` of device memory at ``src`` into host ``out`` (ciphertext || tag)."""
        self._cover(tables, nbytes)
        self.d2h.seal(tables, iv, aad, src, nbytes, out)

    def commit(self, position: int, destination: int, upto: int) -> None:
        self.h2d.commit(position, destination, upto)

    def launch(self, session: int) -> int:
        return self.h2d.launch(session)

    def result(self, group: int, block: bool = True):
        return self.h2d.result(group, block)

    @property
    def calls(self) -> dict:
        return self.h2d.calls

    def close(self) -> None:
        h2d, self.h2d = getattr(self, "h2d", None), None
        if h2d is None:
            return
        h2d.close()
        self.d2h.close()
        self._free([*self._keys.values(), *self._retired])
        self._keys.clear()
        self._retired.clear()
        self.driver.free(self._te)


__all__ = ["DriverPath", "ROW"]
