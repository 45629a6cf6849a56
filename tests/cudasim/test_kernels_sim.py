"""The GPU AES-256-GCM kernels under Numba's CUDA simulator (no GPU needed).

Runs only in a process started with NUMBA_ENABLE_CUDASIM=1 (``tests/test_kernels.py``
starts one): the simulator must be chosen before numba is imported. Messages are small:
the simulator runs every GPU thread as a Python thread.
"""

import os

import numpy as np
import pytest

numba = pytest.importorskip("numba", reason="numba-cuda is not installed (pip install 'pipellm[cuda]')")
from numba import cuda as _cuda  # noqa: E402

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not _cuda.is_available():
    pytest.skip("needs a CUDA GPU, or the CUDA simulator in its own process (tests/test_kernels.py starts one)",
                allow_module_level=True)
pytestmark = pytest.mark.gpu

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from numba import cuda  # noqa: E402

import pipellm  # noqa: E402
from pipellm.channel import Direction, Kind, Message, Opener, Sealer  # noqa: E402
from pipellm.channel.keys import SessionKeys  # noqa: E402
from pipellm.kernels import (KernelKey, Scratch, open_batch, open_into, seal_batch, _batch_arrays, _pack,  # noqa: E402
                             _words)
try:
    from vectors import load  # noqa: E402
except ImportError:  # cryptography_vectors not installed (the GPU machine): no NIST cases
    def load(name):
        return []

THREADS = 8  # few simulated threads per block: fast enough, and several blocks per message


def sample(vectors, n):
    """``n`` vectors spread over the file (different lengths), AAD within the kernels' 64 bytes."""
    usable = [v for v in vectors if len(v["AAD"]) <= 64 and len(v.get("PT", v.get("CT", b""))) <= 64]
    step = max(1, len(usable) // n)
    return usable[::step][:n]


@pytest.mark.parametrize("v", sample(load("gcmEncryptExtIV256.rsp"), 8),
                         ids=lambda v: f"enc-pt{v['params']['PTlen']}-aad{v['params']['AADlen']}")
def test_seal_matches_nist(v):
    key = KernelKey(v["Key"])
    assert seal_batch(key, [v["IV"]], [v["AAD"]], [v["PT"]], threads=THREADS)[0] == v["CT"] + v["Tag"]


@pytest.mark.parametrize("v", sample(load("gcmDecrypt256.rsp"), 10),
                         ids=lambda v: f"dec-pt{v['params']['PTlen']}-{'fail' if v['fail'] else 'ok'}")
def test_open_matches_nist(v):
    key = KernelKey(v["Key"])
    out = open_batch(key, [v["IV"]], [v["AAD"]], [v["CT"] + v["Tag"]], threads=THREADS)[0]
    if v["fail"]:
        assert out is None
    else:
        assert out.tobytes() == v["PT"]


def test_random_sizes_in_one_batch_match_cryptography():
    """Sizes around block and word boundaries, including empty, in one launch."""
    rng = np.random.default_rng(5)
    key_bytes = rng.bytes(32)
    sizes = [0, 1, 3, 4, 15, 16, 17, 31, 33, 64, 100, 129]
    ivs = [rng.bytes(12) for _ in sizes]
    aad = [rng.bytes(56) for _ in sizes]
    plain = [rng.bytes(n) for n in sizes]
    key = KernelKey(key_bytes)
    sealed = seal_batch(key, ivs, aad, plain, threads=THREADS)
    assert sealed == [AESGCM(key_bytes).encrypt(iv, p, a) for iv, p, a in zip(ivs, plain, aad)]
    assert [o.tobytes() for o in open_batch(key, ivs, aad, sealed, threads=THREADS)] == plain


def test_ghash_spans_several_chunks_and_blocks():
    """Longer than one thread's GHASH chunk (64 blocks) and one CUDA block of CTR threads."""
    rng = np.random.default_rng(6)
    key_bytes, iv, aad = rng.bytes(32), rng.bytes(12), rng.bytes(56)
    plain = rng.bytes(64 * 16 * 2 + 37)
    key = KernelKey(key_bytes)
    sealed = seal_batch(key, [iv], [aad], [plain], threads=32)[0]
    assert sealed == AESGCM(key_bytes).encrypt(iv, plain, aad)
    assert open_batch(key, [iv], [aad], [sealed], threads=32)[0].tobytes() == plain


@pytest.mark.parametrize("where", ["ciphertext", "tag", "aad", "iv"])
def test_tampered_messages_are_refused_and_their_destination_is_untouched(where):
    rng = np.random.default_rng(7)
    key_bytes = rng.bytes(32)
    sizes = [40, 17, 64]
    ivs = [rng.bytes(12) for _ in sizes]
    aads = [rng.bytes(56) for _ in sizes]
    plain = [rng.bytes(n) for n in sizes]
    payloads = [bytearray(AESGCM(key_bytes).encrypt(iv, p, a)) for iv, p, a in zip(ivs, plain, aads)]
    bad = 1
    if where == "ciphertext":
        payloads[bad][5] ^= 0x01
    elif where == "tag":
        payloads[bad][-1] ^= 0x80
    elif where == "aad":
        aads[bad] = bytes([aads[bad][0] ^ 1]) + aads[bad][1:]
    else:
        ivs[bad] = ivs[bad][:11] + bytes([ivs[bad][11] ^ 1])
    key = KernelKey(key_bytes)
    buf, offs, lens = _pack([bytes(p[:-16]) for p in payloads])
    tags = np.stack([_words(bytes(p[-16:]), 4) for p in payloads])
    ivs_d, aad_d = _batch_arrays(ivs, aads)
    sentinel = np.full_like(buf, 0xA5)
    out = cuda.to_device(sentinel)
    offs_d = cuda.to_device(offs)
    ok = open_into(key, ivs_d, aad_d, 56, cuda.to_device(buf), offs_d, lens, cuda.to_device(tags), out, offs_d,
                   threads=THREADS).copy_to_host()
    assert list(ok) == [1, 0, 1]
    result = out.copy_to_host()
    for i, (o, n) in enumerate(zip(offs, lens)):
        if i == bad:
            assert (result[o:o + n] == 0xA5).all(), "a refused message wrote into its destination"
        else:
            assert result[o:o + n].tobytes() == plain[i]
    # nothing past any message's end was written either
    ends = np.ones(len(buf), dtype=bool)
    for o, n in zip(offs, lens):
        ends[o:o + n] = False
    assert (result[ends] == 0xA5).all()


def test_the_kernels_speak_the_channel_protocol():
    """Messages sealed by the host's channel open on the GPU (same IVs, header as AAD,
    tags), and messages the GPU seals open in the host's channel."""
    keys = SessionKeys(os.urandom(32), session=3)
    sealer, opener = Sealer(keys, Direction.H2D, 1 << 32), Opener(keys, Direction.D2H, 1 << 32)
    sizes = [1, 33, 100]
    plain = [os.urandom(n) for n in sizes]
    msgs = []
    for i, p in enumerate(plain):
        out = memoryview(bytearray(len(p) + 16))
        msgs.append(sealer.seal_next(Kind.DATA, 7, 16 * i, p, out))
    h2d = KernelKey(keys.epoch_key(Direction.H2D, 0).secret)
    opened = open_batch(h2d, [m.iv for m in msgs], [bytes(m.aad) for m in msgs], [bytes(m.payload) for m in msgs],
                        threads=THREADS)
    assert [o.tobytes() for o in opened] == plain

    # device to host: the GPU seals under the d2h key with the header the host expects
    from pipellm.channel.endpoint import iv_for
    from pipellm.channel.protocol import pack_header
    epoch_key = keys.epoch_key(Direction.D2H, 0)
    ivs = [iv_for(epoch_key.mask, i) for i in range(len(plain))]
    headers = [pack_header(Direction.D2H, Kind.DATA, 3, 0, i, 9, 0, len(p)) for i, p in enumerate(plain)]
    sealed = seal_batch(KernelKey(epoch_key.secret), ivs, headers, plain, threads=THREADS)
    for i, (p, s) in enumerate(zip(plain, sealed)):
        staging = memoryview(bytearray(len(p)))
        _, index, got = opener.open_into(Message("d2h", ivs[i], bytearray(headers[i]), memoryview(bytearray(s))),
                                         staging)
        assert index == i and bytes(got) == p


def test_a_scratch_serves_batches_of_any_size_without_leftovers():
    """The kept arrays grow past their first size and are reused: each batch opens as
    if its arrays were fresh (the GHASH accumulators left at 0 by the previous one),
    a tampered message of a later batch is still refused."""
    rng = np.random.default_rng(5)
    key_bytes = os.urandom(32)
    key, scratch = KernelKey(key_bytes), Scratch()
    for n, bad in ((2, None), (20, 7), (3, None)):
        ivs, aads = [os.urandom(12) for _ in range(n)], [os.urandom(56) for _ in range(n)]
        plain = [os.urandom(int(rng.integers(0, 300))) for _ in range(n)]
        payloads = [bytearray(AESGCM(key_bytes).encrypt(iv, p, a)) for iv, p, a in zip(ivs, plain, aads)]
        if bad is not None:
            payloads[bad][-1] ^= 1
        buf, offs, lens = _pack([bytes(p[:-16]) for p in payloads])
        tags = np.stack([_words(bytes(p[-16:]), 4) for p in payloads])
        ivs_d, aad_d = _batch_arrays(ivs, aads, scratch=scratch)
        out, offs_d = cuda.to_device(np.zeros_like(buf)), scratch.put("offs", offs)
        ok = open_into(key, ivs_d, aad_d, 56, cuda.to_device(buf), offs_d, lens, scratch.put("tags", tags), out,
                       offs_d, threads=THREADS, scratch=scratch).copy_to_host()
        assert list(ok) == [0 if i == bad else 1 for i in range(n)]
        result = out.copy_to_host()
        assert all(result[o:o + m].tobytes() == p for i, (o, m, p) in enumerate(zip(offs, lens, plain)) if i != bad)


def test_threads_per_block_must_be_a_power_of_two_the_reduction_can_hold():
    key = KernelKey(bytes(32))
    for threads in (3, 1024):
        with pytest.raises(pipellm.ArgumentError, match="power of two from 1 to 512"):
            seal_batch(key, [bytes(12)], [b"h"], [b"x"], threads=threads)
        with pytest.raises(pipellm.ArgumentError, match="power of two"):
            pipellm.open_device("cuda", threads=threads)
