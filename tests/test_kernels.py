"""The GPU kernels without a GPU: host-side tables, the simulator suite (in its own
process) and PTX for the H100 (compute capability 9.0)."""

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from pipellm.kernels.tables import CHUNK_BLOCKS, SBOX, GcmKey, expand_key, from_words, gf_mul, mul_by_table

HERE = os.path.dirname(__file__)


def test_key_expansion_matches_fips_197():
    """FIPS 197 appendix A.3: the AES-256 key schedule's first and last words."""
    w = expand_key(bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
    assert len(w) == 60 and int(w[8]) == 0x9BA35411 and int(w[59]) == 0x706C631E


def test_sbox_is_the_aes_sbox():
    assert SBOX[:4] == [0x63, 0x7C, 0x77, 0x7B] and SBOX[0x53] == 0xED and len(set(SBOX)) == 256


def test_h_is_aes_of_zero():
    key = os.urandom(32)
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert GcmKey(key).h == int.from_bytes(enc.update(bytes(16)), "big")


@settings(max_examples=50, deadline=None)
@given(x=st.integers(0, (1 << 128) - 1))
def test_the_table_multiplies_like_the_field(x):
    """The kernels' nibble table and the host's byte tables (built from single-bit
    products, not a bit loop per entry) both multiply as the field does."""
    from pipellm.kernels.tables import _digit_products, _mul_bytes
    key = GcmKey(b"k" * 32)
    assert mul_by_table(key.h_table, x) == gf_mul(x, key.h)
    assert _mul_bytes(_digit_products(key.h, 8), x) == gf_mul(x, key.h)
    assert _mul_bytes(_digit_products(x | 1, 8), key.h) == gf_mul(key.h, x | 1)


def test_the_chunk_powers_are_powers_of_h():
    key = GcmKey(os.urandom(32))
    powers = key.ensure_chunks(5)
    step = 1 << 127
    for _ in range(CHUNK_BLOCKS):
        step = gf_mul(step, key.h)
    expected = 1 << 127
    for k in range(5):
        assert from_words(powers[k]) == expected
        expected = gf_mul(expected, step)


def _blocks(b):
    b = b + bytes(-len(b) % 16)
    return [int.from_bytes(b[i:i + 16], "big") for i in range(0, len(b), 16)]


@pytest.mark.parametrize("nbytes", [0, 1, 16 * CHUNK_BLOCKS - 56, 16 * 3 * CHUNK_BLOCKS + 5])
def test_chunked_ghash_with_powers_gives_the_gcm_tag(nbytes):
    """What the kernels compute (per-chunk Horner sums placed by H^(k*CHUNK_BLOCKS),
    XORed together) is GCM's tag."""
    key_bytes, iv, aad, plain = os.urandom(32), os.urandom(12), os.urandom(56), os.urandom(nbytes)
    sealed = AESGCM(key_bytes).encrypt(iv, plain, aad)
    key = GcmKey(key_bytes)
    stream = _blocks(aad) + _blocks(sealed[:-16]) + [(len(aad) * 8 << 64) | nbytes * 8]
    m = len(stream)
    chunks = -(-m // CHUNK_BLOCKS)
    powers = key.ensure_chunks(chunks)
    total = 0
    for k in range(chunks):
        partial = 0
        for x in stream[max(0, m - (k + 1) * CHUNK_BLOCKS):m - k * CHUNK_BLOCKS]:
            partial = mul_by_table(key.h_table, partial ^ x)
        total ^= gf_mul(partial, from_words(powers[k]))
    enc = Cipher(algorithms.AES(key_bytes), modes.ECB()).encryptor()
    assert total ^ int.from_bytes(enc.update(iv + b"\0\0\0\1"), "big") == int.from_bytes(sealed[-16:], "big")


def test_kernels_under_the_cuda_simulator():
    """tests/cudasim in a process with NUMBA_ENABLE_CUDASIM=1: NIST vectors, random
    sizes, tampering (destination untouched), interoperation with the channel."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install 'pipellm[cuda]')")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "cudasim")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


def test_kernels_compile_for_the_h100():
    """PTX for compute capability 9.0, no GPU needed (numba-cuda's NVVM from the pip wheels)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install 'pipellm[cuda]')")
    code = ("from pipellm.kernels import compile_for\n"
            "ptx = compile_for((9, 0))\n"
            "assert set(ptx) == {'ghash_kernel', 'tag_kernel', 'ctr_kernel'}, ptx.keys()\n"
            "assert all('.target sm_90' in p and '.entry' in p for p in ptx.values())\n"
            "assert 'atom.global.xor' in ptx['ghash_kernel'] or 'red.global.xor' in ptx['ghash_kernel']\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_the_adversary_suite_against_the_cuda_device_under_the_simulator():
    """tests/test_adversary.py again, with the cuda device (its GPU kernels doing the
    authenticating) under the CUDA simulator: every attack refused there too."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install 'pipellm[cuda]')")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PIPELLM_TEST_DEVICE="cuda")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             os.path.join(HERE, "test_adversary.py")],
                            env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.splitlines()[-1]
