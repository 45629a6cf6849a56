"""Session keys: X25519 key agreement + HKDF-SHA256 (standing in for SPDM).

Both endpoints generate an X25519 key pair, exchange public keys and derive the same
session root. From the root, each (direction, epoch) gets its own AES-256 key and IV
mask, so the two directions never share a key and rotation needs no extra message.
"""

from __future__ import annotations

import hashlib
import threading
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ArgumentError, ArgumentTypeError, KeyExhaustedError
from .protocol import EPOCH_LIMIT, IV_BYTES, KEY_BYTES, Direction

_LABEL = b"pipellm/v1 "


def _hkdf(ikm: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=_LABEL + info).derive(ikm)


class EpochKey(NamedTuple):
    """The key of one direction in one epoch."""

    aead: AESGCM
    mask: int       # the 12-byte IV mask as an int
    key_id: bytes   # 8-byte public fingerprint of the key (for ledgers and logs)
    secret: bytes   # the raw AES-256 key, for engines with their own AES (the GPU kernels)

    def __repr__(self) -> str:  # never print the secret
        return f"<EpochKey {self.key_id.hex()}>"


class KeyAgreement:
    """One endpoint's half of the X25519 exchange.

    >>> host, device = KeyAgreement(), KeyAgreement()
    >>> a = host.derive(device.public_bytes, session=7, host_public=host.public_bytes, device_public=device.public_bytes)
    >>> b = device.derive(host.public_bytes, session=7, host_public=host.public_bytes, device_public=device.public_bytes)
    >>> a.epoch_key(Direction.H2D, 0).key_id == b.epoch_key(Direction.H2D, 0).key_id
    True
    """

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public_bytes: bytes = self._private.public_key().public_bytes_raw()

    def derive(self, peer_public: bytes, *, session: int, host_public: bytes,
               device_public: bytes) -> SessionKeys:
        if not isinstance(peer_public, (bytes, bytearray)):
            raise ArgumentTypeError(f"peer public key must be bytes, got {type(peer_public).__name__}")
        if len(peer_public) != 32:
            raise ArgumentError(f"X25519 public key must be 32 bytes, got {len(peer_public)}")
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        # The transcript (both public keys, the session id) salts the root, so a key pair
        # replayed into another session derives other keys.
        salt = hashlib.sha256(host_public + device_public + session.to_bytes(4, "big")).digest()
        return SessionKeys(_hkdf(shared, 32, b"session root", salt), session)


class SessionKeys:
    """Per-(direction, epoch) keys derived lazily from the session root."""

    def __init__(self, root: bytes, session: int) -> None:
        self._root = root
        self.session = session
        self._cache: dict[tuple[int, int], EpochKey] = {}
        self._lock = threading.Lock()

    def epoch_key(self, direction: Direction, epoch: int) -> EpochKey:
        key = self._cache.get((direction, epoch))
        if key is not None:
            return key
        if not 0 <= epoch < EPOCH_LIMIT:
            raise KeyExhaustedError(
                f"{Direction(direction).label}: key epoch {epoch} is past the last one "
                f"({EPOCH_LIMIT - 1}); open a new session")
        info = Direction(direction).label.encode() + b" epoch " + epoch.to_bytes(4, "big")
        material = _hkdf(self._root, KEY_BYTES + IV_BYTES, info)
        key_id = _hkdf(self._root, 8, info + b" key id")
        key = EpochKey(AESGCM(material[:KEY_BYTES]), int.from_bytes(material[KEY_BYTES:], "big"), key_id,
                       material[:KEY_BYTES])
        with self._lock:
            # keep the last few epochs per direction: in-flight messages may still use them
            for old in [k for k in self._cache if k[0] == direction and k[1] < epoch - 2]:
                del self._cache[old]
            self._cache[(direction, epoch)] = key
        return key
