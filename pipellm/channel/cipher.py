"""The channel's AES-256-GCM calls: 96-bit IVs, 128-bit tags, output into caller memory.

Sealer and Opener go through these two functions (and the NIST vectors are run through
them), so the cipher path is defined in one place.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def seal_into(aead: AESGCM, iv: bytes, plaintext, aad, out) -> None:
    """Write ciphertext || tag of ``plaintext`` into ``out`` (exactly len + 16 bytes)."""
    aead.encrypt_into(iv, plaintext, aad, out)


def open_into(aead: AESGCM, iv: bytes, payload, aad, out) -> bool:
    """Decrypt ciphertext || tag into ``out`` (exactly len - 16 bytes); False when the
    tag does not verify. ``out`` may hold unauthenticated plaintext afterwards either
    way: it must be staging memory, never the destination."""
    try:
        aead.decrypt_into(iv, payload, aad, out)
    except InvalidTag:
        return False
    return True
