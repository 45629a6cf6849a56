"""Host-side preparation for the GPU AES-256-GCM kernels (pure Python and numpy).

Everything a kernel needs that depends only on the key is computed here once per key
(``GcmKey``): the AES-256 round keys, the GHASH key H = AES_K(0^128) with its 4-bit
multiplication table, and the powers H^(k*CHUNK_BLOCKS) that let many threads hash one
message in parallel. The AES T-table is a constant.

Field elements of GF(2^128) are Python ints holding the 16-byte block big-endian (GCM's
bit order: the most significant bit is the coefficient of x^0); on the GPU, 4 uint32
words, most significant first.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: GHASH blocks one thread hashes (Horner's rule) before its partial sum is combined.
CHUNK_BLOCKS = 64

_R = 0xE1 << 120  # GCM's reduction polynomial x^128 + x^7 + x^2 + x + 1, reflected
_MASK128 = (1 << 128) - 1


def _sbox() -> list[int]:
    """The AES S-box, built from its definition (inverse in GF(2^8), then the affine map)."""
    box, p, q = [0] * 256, 1, 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)         # p *= 3
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09                                                 # q /= 3
        x = q ^ _rotl8(q, 1) ^ _rotl8(q, 2) ^ _rotl8(q, 3) ^ _rotl8(q, 4)
        box[p] = x ^ 0x63
        if p == 1:
            break
    box[0] = 0x63
    return box


def _rotl8(x: int, n: int) -> int:
    return ((x << n) | (x >> (8 - n))) & 0xFF


def _xtime(x: int) -> int:
    return ((x << 1) ^ (0x1B if x & 0x80 else 0)) & 0xFF


SBOX = _sbox()
#: Te0[x] = (2*S[x], S[x], S[x], 3*S[x]) big-endian; Te1..Te3 are its byte rotations and
#: the S-box is its second byte, so the kernels keep only this one 1 KiB table.
TE0 = np.array([(_xtime(s) << 24) | (s << 16) | (s << 8) | (_xtime(s) ^ s) for s in SBOX], dtype=np.uint32)


def expand_key(key: bytes) -> np.ndarray:
    """The 60 round-key words of AES-256 (FIPS 197 key expansion), big-endian words."""
    if len(key) != 32:
        raise ArgumentError(f"AES-256 needs a 32-byte key, got {len(key)} bytes")
    w = [int.from_bytes(key[4 * i:4 * i + 4], "big") for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = w[i - 1]
        if i % 8 == 0:
            t = ((t << 8) | (t >> 24)) & 0xFFFFFFFF
            t = _sub_word(t) ^ (rcon << 24)
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = _sub_word(t)
        w.append(w[i - 8] ^ t)
    return np.array(w, dtype=np.uint32)


def _sub_word(t: int) -> int:
    return (SBOX[t >> 24] << 24) | (SBOX[(t >> 16) & 0xFF] << 16) | (SBOX[(t >> 8) & 0xFF] << 8) | SBOX[t & 0xFF]


def gf_mul(x: int, y: int) -> int:
    """x * y in GF(2^128), GCM bit order (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return z


def _bit_products(h: int) -> list[int]:
    """``h`` times each single bit, in GCM order: entry k is ``h * x^k`` (the product of
    ``h`` and the element whose bit 127 - k alone is set), as gf_mul's loop steps ``v``."""
    out, v = [], h
    for _ in range(128):
        out.append(v)
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return out


def _digit_products(h: int, bits: int) -> list[list[int]]:
    """``t[j][n] = (n at digit j) * h`` for ``bits``-bit digits (digit 0 the most
    significant), each entry the XOR of the single-bit products of n's bits (the field
    multiplication is linear): a few thousand XORs, not a bit loop per entry."""
    single = _bit_products(h)
    digits = 128 // bits
    table = []
    for j in range(digits):
        row = [0] * (1 << bits)
        base = bits * (digits - 1 - j)  # the digit's lowest bit position in x
        for n in range(1, 1 << bits):
            low = n & -n
            row[n] = row[n ^ low] ^ single[127 - base - (low.bit_length() - 1)]
        table.append(row)
    return table


def mul_table(h: int) -> np.ndarray:
    """``t[j, n] = (n at nibble j) * h`` as 4 words, so ``x * h`` is the XOR over the 32
    nibbles of x of ``t[j, nibble_j(x)]`` (nibble 0 is the most significant): the table
    the kernels read."""
    return np.array([[to_words(v) for v in row] for row in _digit_products(h, 4)], dtype=np.uint32)


def mul_by_table(table: np.ndarray, x: int) -> int:
    """x * h through ``mul_table(h)``: what the kernels do, in Python."""
    z = 0
    for j in range(32):
        z ^= from_words(table[j, (x >> (4 * (31 - j))) & 0xF])
    return z


def _mul_bytes(table: list[list[int]], x: int) -> int:
    """x * h through ``_digit_products(h, 8)``: the host's own multiplication (16 lookups
    of Python ints, where the kernels' numpy table costs a conversion per lookup)."""
    z = 0
    for j in range(16):
        z ^= table[j][(x >> (8 * (15 - j))) & 0xFF]
    return z


def to_words(x: int) -> list[int]:
    return [(x >> 96) & 0xFFFFFFFF, (x >> 64) & 0xFFFFFFFF, (x >> 32) & 0xFFFFFFFF, x & 0xFFFFFFFF]


def from_words(w) -> int:
    return (int(w[0]) << 96) | (int(w[1]) << 64) | (int(w[2]) << 32) | int(w[3])


class GcmKey:
    """What the kernels need for one AES-256 key: round keys, H's multiplication table and
    the chunk powers of H (grown on demand to the longest message seen)."""

    def __init__(self, key: bytes):
        self.round_keys = expand_key(bytes(key))
        encryptor = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
        self.h = int.from_bytes(encryptor.update(bytes(16)) + encryptor.finalize(), "big")
        self.h_table = mul_table(self.h)
        by_h = _digit_products(self.h, 8)
        hl = self.h
        for _ in range(CHUNK_BLOCKS - 1):
            hl = _mul_bytes(by_h, hl)
        self._by_hl = _digit_products(hl, 8)  # multiplies by H^CHUNK_BLOCKS
        self._powers = [1 << 127]             # H^0 = 1 (GCM order: the top bit)
        self.chunk_powers = np.array([to_words(1 << 127)], dtype=np.uint32)

    def ensure_chunks(self, chunks: int) -> np.ndarray:
        """Powers H^(k*CHUNK_BLOCKS) for k < ``chunks`` as a (chunks, 4) uint32 array."""
        if chunks > len(self._powers):
            while len(self._powers) < chunks:
                self._powers.append(_mul_bytes(self._by_hl, self._powers[-1]))
            self.chunk_powers = np.array([to_words(p) for p in self._powers], dtype=np.uint32)
        return self.chunk_powers
