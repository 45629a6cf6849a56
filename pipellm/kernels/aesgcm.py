"""AES-256-GCM on the GPU with Numba CUDA: the cuda device's copy-engine work.

Byte for byte the channel's AES-256-GCM (NIST SP 800-38D, 96-bit IVs): the same IVs,
AAD (the message header) and tags as the CPU side, so the GPU opens what the host
sealed and seals what the host opens.

Three kernels, each over a batch of messages under one key (``blockIdx.y`` = message):

- ``ghash_kernel``: GHASH in parallel. Thread k of a message hashes CHUNK_BLOCKS blocks
  (counted from the end) by Horner's rule with a 4-bit table of H in shared memory (laid
  out so that a warp's lookups never conflict on a bank), multiplies its partial sum by
  H^(k*CHUNK_BLOCKS) (precomputed per key); a block XORs its threads' sums together and
  XORs that into the message's accumulator atomically (addition in GF(2^128) is XOR).
- ``tag_kernel``: one thread per message: tag = GHASH ^ AES_K(J0). Decrypting, it
  compares with the received tag (without an early exit) and sets ``ok``; encrypting,
  it writes the tag. It clears the accumulator it read (reused accumulators stay 0).
- ``ctr_kernel``: AES-CTR, one 16-byte block per thread, T-table AES with the table and
  round keys in shared memory. It writes nothing for a message whose ``ok`` is 0, so a
  refused message leaves its destination unchanged (fail closed: decryption runs only
  after the tag verified).

Decrypt = ghash, tag (check), ctr; encrypt = ctr, ghash (over the output), tag (write).

Side channels: T-table AES indexes shared memory with key-dependent values, so its
timing (bank conflicts) depends on the key and data; so do the GHASH table lookups. An
attacker who can time kernels on the same GPU (another tenant, or the host measuring
kernel durations) may learn key bits, as with table-based AES on CPUs. The H100's own
copy engine does not have this exposure. See docs/threat-model.md.

Layout contract (checked by the launch helpers in ``pipellm.kernels``): ciphertext and
plaintext buffers are uint8 device arrays with a uint32 view of the same memory; each
message starts at a multiple of 16 bytes; reads may touch up to 15 bytes past a
message's end (padding), writes never do.
"""

from __future__ import annotations

from numba import cuda, types, uint32
from numba.core.extending import intrinsic

from .tables import CHUNK_BLOCKS

THREADS = 128  # threads per block; the simulator tests pass fewer


@cuda.jit(device=True, inline=True)
def _bswap(x):
    return uint32(((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | ((x >> 24) & 0xFF))


@cuda.jit(device=True, inline=True)
def _rotr(x, n):
    return uint32(((x >> n) | (x << (32 - n))) & 0xFFFFFFFF)


@cuda.jit(device=True, inline=True)
def _sub(te, x):
    """S-box through the T-table: S[x] is the second byte of Te0[x]."""
    return (te[x] >> 8) & 0xFF


@cuda.jit(device=True)
def _aes(te, rk, s0, s1, s2, s3):
    """Encrypt one block (4 big-endian words) with AES-256 round keys ``rk``."""
    s0 = uint32(s0 ^ rk[0])
    s1 = uint32(s1 ^ rk[1])
    s2 = uint32(s2 ^ rk[2])
    s3 = uint32(s3 ^ rk[3])
    for r in range(1, 14):
        k = 4 * r
        t0 = te[s0 >> 24] ^ _rotr(te[(s1 >> 16) & 0xFF], 8) ^ _rotr(te[(s2 >> 8) & 0xFF], 16) ^ _rotr(te[s3 & 0xFF], 24)
        t1 = te[s1 >> 24] ^ _rotr(te[(s2 >> 16) & 0xFF], 8) ^ _rotr(te[(s3 >> 8) & 0xFF], 16) ^ _rotr(te[s0 & 0xFF], 24)
        t2 = te[s2 >> 24] ^ _rotr(te[(s3 >> 16) & 0xFF], 8) ^ _rotr(te[(s0 >> 8) & 0xFF], 16) ^ _rotr(te[s1 & 0xFF], 24)
        t3 = te[s3 >> 24] ^ _rotr(te[(s0 >> 16) & 0xFF], 8) ^ _rotr(te[(s1 >> 8) & 0xFF], 16) ^ _rotr(te[s2 & 0xFF], 24)
        s0 = uint32(t0 ^ rk[k])
        s1 = uint32(t1 ^ rk[k + 1])
        s2 = uint32(t2 ^ rk[k + 2])
        s3 = uint32(t3 ^ rk[k + 3])
    o0 = (_sub(te, s0 >> 24) << 24) | (_sub(te, (s1 >> 16) & 0xFF) << 16) | (_sub(te, (s2 >> 8) & 0xFF) << 8) | _sub(te, s3 & 0xFF)
    o1 = (_sub(te, s1 >> 24) << 24) | (_sub(te, (s2 >> 16) & 0xFF) << 16) | (_sub(te, (s3 >> 8) & 0xFF) << 8) | _sub(te, s0 & 0xFF)
    o2 = (_sub(te, s2 >> 24) << 24) | (_sub(te, (s3 >> 16) & 0xFF) << 16) | (_sub(te, (s0 >> 8) & 0xFF) << 8) | _sub(te, s1 & 0xFF)
    o3 = (_sub(te, s3 >> 24) << 24) | (_sub(te, (s0 >> 16) & 0xFF) << 16) | (_sub(te, (s1 >> 8) & 0xFF) << 8) | _sub(te, s2 & 0xFF)
    return uint32(o0 ^ rk[56]), uint32(o1 ^ rk[57]), uint32(o2 ^ rk[58]), uint32(o3 ^ rk[59])


@cuda.jit(device=True, inline=True)
def _mul_word(ht, x, j, z0, z1, z2, z3):
    """Adds (XOR) the products of word ``x``'s 8 nibbles (nibbles j..j+7 of the block)
    through H's table: table (j, word w) holds its 16 values in consecutive words, so
    the 16 possible lookups of a warp fall in 16 different banks (no conflicts)."""
    for i in range(8):
        base = (j + i) * 64 + ((x >> (28 - 4 * i)) & 0xF)
        z0 = uint32(z0 ^ ht[base])
        z1 = uint32(z1 ^ ht[base + 16])
        z2 = uint32(z2 ^ ht[base + 32])
        z3 = uint32(z3 ^ ht[base + 48])
    return z0, z1, z2, z3


@cuda.jit(device=True)
def _mul_table(ht, x0, x1, x2, x3):
    """x * H through H's 4-bit table (32 nibbles x 4 words x 16 values, flattened)."""
    z0, z1, z2, z3 = _mul_word(ht, x0, 0, uint32(0), uint32(0), uint32(0), uint32(0))
    z0, z1, z2, z3 = _mul_word(ht, x1, 8, z0, z1, z2, z3)
    z0, z1, z2, z3 = _mul_word(ht, x2, 16, z0, z1, z2, z3)
    return _mul_word(ht, x3, 24, z0, z1, z2, z3)


@cuda.jit(device=True)
def _mul(x0, x1, x2, x3, y0, y1, y2, y3):
    """x * y in GF(2^128), bit by bit (once per thread, to place a partial sum)."""
    z0 = uint32(0)
    z1 = uint32(0)
    z2 = uint32(0)
    z3 = uint32(0)
    for i in range(128):
        w = i >> 5
        x = x0 if w == 0 else (x1 if w == 1 else (x2 if w == 2 else x3))
        if (x >> (31 - (i & 31))) & 1:
            z0 = uint32(z0 ^ y0)
            z1 = uint32(z1 ^ y1)
            z2 = uint32(z2 ^ y2)
            z3 = uint32(z3 ^ y3)
        lsb = y3 & 1
        y3 = uint32(((y3 >> 1) | (y2 << 31)) & 0xFFFFFFFF)
        y2 = uint32(((y2 >> 1) | (y1 << 31)) & 0xFFFFFFFF)
        y1 = uint32(((y1 >> 1) | (y0 << 31)) & 0xFFFFFFFF)
        y0 = uint32(y0 >> 1)
        if lsb:
            y0 = uint32(y0 ^ 0xE1000000)
    return z0, z1, z2, z3


@cuda.jit(device=True, inline=True)
def _load_tables(te_g, rk_g, te, rk):
    """Copy the T-table and the round keys into the block's shared memory."""
    for i in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        te[i] = te_g[i]
    for i in range(cuda.threadIdx.x, 60, cuda.blockDim.x):
        rk[i] = rk_g[i]
    cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _tail_mask(remaining, w):
    """Mask (big-endian) of the bytes of word ``w`` of a block that lie before the end,
    ``remaining`` bytes from the block's start."""
    valid = remaining - 4 * w
    if valid >= 4:
        return uint32(0xFFFFFFFF)
    if valid <= 0:
        return uint32(0)
    return uint32((0xFFFFFFFF << (32 - 8 * valid)) & 0xFFFFFFFF)


REDUCE = 512  # most threads per block of ghash_kernel (its XOR reduction's shared array)


@cuda.jit(cache=True)  # compiled once per machine, not once per process
def ghash_kernel(h_table, powers, data32, offs, lens, aad32, aad_len, acc):
    ht = cuda.shared.array(2048, uint32)
    red = cuda.shared.array((4, REDUCE), uint32)
    tid = cuda.threadIdx.x
    for i in range(tid, 2048, cuda.blockDim.x):
        ht[i] = h_table[i]
    cuda.syncthreads()
    msg = cuda.blockIdx.y
    k = cuda.blockIdx.x * cuda.blockDim.x + tid  # chunk number, counted from the end
    length = lens[msg]
    aad_blocks = (aad_len + 15) // 16
    m = aad_blocks + (length + 15) // 16 + 1     # AAD, ciphertext, the length block
    hi = m - k * CHUNK_BLOCKS
    lo = max(0, hi - CHUNK_BLOCKS)               # hi <= 0: nothing to hash (still reduces)
    base = offs[msg] // 4
    a0 = uint32(0)
    a1 = uint32(0)
    a2 = uint32(0)
    a3 = uint32(0)
    for b in range(lo, hi):
        if b < aad_blocks:
            x0 = aad32[msg, 4 * b]
            x1 = aad32[msg, 4 * b + 1]
            x2 = aad32[msg, 4 * b + 2]
            x3 = aad32[msg, 4 * b + 3]
        elif b < m - 1:
            c = b - aad_blocks
            p = base + 4 * c
            x0 = _bswap(data32[p])
            x1 = _bswap(data32[p + 1])
            x2 = _bswap(data32[p + 2])
            x3 = _bswap(data32[p + 3])
            rem = length - 16 * c
            if rem < 16:  # the last, partial block: only its bytes count
                x0 &= _tail_mask(rem, 0)
                x1 &= _tail_mask(rem, 1)
                x2 &= _tail_mask(rem, 2)
                x3 &= _tail_mask(rem, 3)
        else:  # len(A) || len(C) in bits, 64 bits each
            x0 = uint32((aad_len * 8) >> 32)
            x1 = uint32((aad_len * 8) & 0xFFFFFFFF)
            x2 = uint32((length * 8) >> 32)
            x3 = uint32((length * 8) & 0xFFFFFFFF)
        a0, a1, a2, a3 = _mul_table(ht, uint32(a0 ^ x0), uint32(a1 ^ x1), uint32(a2 ^ x2), uint32(a3 ^ x3))
    if k > 0 and hi > 0:
        a0, a1, a2, a3 = _mul(a0, a1, a2, a3, powers[k, 0], powers[k, 1], powers[k, 2], powers[k, 3])
    # XOR the block's partial sums together (a tree in shared memory), then one atomic
    # per word per block: thousands of threads XORing into one accumulator would queue
    red[0, tid] = a0
    red[1, tid] = a1
    red[2, tid] = a2
    red[3, tid] = a3
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            for w in range(4):
                red[w, tid] ^= red[w, tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        for w in range(4):
            cuda.atomic.xor(acc, (msg, w), red[w, 0])


@cuda.jit(cache=True)
def tag_kernel(te_g, rk_g, ivs, acc, tags, ok, check):
    """tag = GHASH ^ AES_K(J0); ``check``: compare with ``tags`` into ``ok``, else write it.
    Clears the message's GHASH accumulator after reading it, so a reused one starts at 0."""
    te = cuda.shared.array(256, uint32)  # a dependent chain of 224 lookups: shared, not global
    rk = cuda.shared.array(60, uint32)
    _load_tables(te_g, rk_g, te, rk)
    tid = cuda.threadIdx.x
    msg = cuda.blockIdx.x * cuda.blockDim.x + tid
    if msg >= ivs.shape[0]:
        return
    e0, e1, e2, e3 = _aes(te, rk, ivs[msg, 0], ivs[msg, 1], ivs[msg, 2], uint32(1))
    t0 = uint32(acc[msg, 0] ^ e0)
    t1 = uint32(acc[msg, 1] ^ e1)
    t2 = uint32(acc[msg, 2] ^ e2)
    t3 = uint32(acc[msg, 3] ^ e3)
    for w in range(4):
        acc[msg, w] = 0
    if check:
        diff = (t0 ^ tags[msg, 0]) | (t1 ^ tags[msg, 1]) | (t2 ^ tags[msg, 2]) | (t3 ^ tags[msg, 3])
        ok[msg] = uint32(1) if diff == 0 else uint32(0)
    else:
        tags[msg, 0] = t0
        tags[msg, 1] = t1
        tags[msg, 2] = t2
        tags[msg, 3] = t3
        ok[msg] = uint32(1)


@cuda.jit(cache=True)
def ctr_kernel(te_g, rk_g, ivs, src32, src_offs, dst8, dst32, dst_offs, lens, ok):
    """dst = src XOR keystream, one block per thread; nothing for a message not ``ok``.
    Full words are stored as words, the last partial word byte by byte, nothing past the
    message's end."""
    te = cuda.shared.array(256, uint32)
    rk = cuda.shared.array(60, uint32)
    _load_tables(te_g, rk_g, te, rk)
    tid = cuda.threadIdx.x
    msg = cuda.blockIdx.y
    b = cuda.blockIdx.x * cuda.blockDim.x + tid
    length = lens[msg]
    if ok[msg] == 0 or 16 * b >= length:
        return
    k0, k1, k2, k3 = _aes(te, rk, ivs[msg, 0], ivs[msg, 1], ivs[msg, 2], uint32((b + 2) & 0xFFFFFFFF))
    p = src_offs[msg] // 4 + 4 * b
    q = dst_offs[msg] // 4 + 4 * b
    rem = length - 16 * b
    for w in range(4):
        key = k0 if w == 0 else (k1 if w == 1 else (k2 if w == 2 else k3))
        valid = rem - 4 * w
        if valid <= 0:
            break
        word = uint32(_bswap(src32[p + w]) ^ key)
        if valid >= 4:
            dst32[q + w] = _bswap(word)
        else:
            at = dst_offs[msg] + 16 * b + 4 * w
            for j in range(valid):
                dst8[at + j] = (word >> (24 - 8 * j)) & 0xFF


# -- the driver path's commit and status (pipellm._ext.gpupath) ---------------------------------
# A group's rows (gpupath.ROW bytes each, read as int64 words): 12 = staging offset,
# 13 = length, 14 = destination address (0: none), 15 = the last message of the group that
# must have verified, with every one before it, for this one to be committed.
_ROW_OFF, _ROW_LEN, _ROW_DST, _ROW_UPTO = 12, 13, 14, 15


@intrinsic
def _bytes_at(typingctx, address):
    """A uint8 pointer to device address ``address`` (an int64): destinations are
    arbitrary device memory named by the host in the group's rows."""
    sig = types.CPointer(types.uint8)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


@cuda.jit(cache=True)
def commit_kernel(ok, rows64, plain, flag):
    """Copy message ``blockIdx.y``'s plaintext from staging to its destination if messages
    0..upto of the group verified and the session's refusal flag (raised by an earlier
    group's status_kernel) is clear. Blocks stride over the message's bytes."""
    msg = cuda.blockIdx.y
    dst = rows64[msg, _ROW_DST]
    if dst == 0 or flag[0] != 0:
        return
    for q in range(rows64[msg, _ROW_UPTO] + 1):
        if ok[q] == 0:
            return
    off = rows64[msg, _ROW_OFF]
    length = rows64[msg, _ROW_LEN]
    out = _bytes_at(dst)
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while i < length:
        out[i] = plain[off + i]
        i += cuda.gridDim.x * cuda.blockDim.x


@cuda.jit(cache=True)
def status_kernel(ok, flag, status):
    """One thread: the group's first refused message (-1: none) into ``status``; a refusal
    raises the session's flag, so later groups commit nothing. Runs after commit_kernel,
    which read the flag as it was before this group."""
    first = -1
    for q in range(ok.shape[0]):
        if ok[q] == 0:
            first = q
            break
    status[0] = first
    if first >= 0:
        flag[0] = uint32(1)
