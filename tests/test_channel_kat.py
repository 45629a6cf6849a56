"""Known-answer tests of the channel's own construction: key agreement, the key schedule,
the header, the IV, rotation, and one whole message, from fixed keys and counters.

The NIST vectors (test_cipher_vectors.py) check the AES-GCM call; these check what
pipellm builds around it. The expected bytes were written down from an independent
computation: HKDF-SHA256 (RFC 5869) by ``hmac`` below, itself checked against the RFC's
test case 1; X25519 from RFC 7748's section 6.1 key pairs; the header packed by hand
field by field from the layout in ``pipellm/channel/protocol.py``; the ciphertexts by
``AESGCM`` called directly with those keys, IVs and headers. A change to any label,
field order, byte order or derivation step changes these bytes.
"""

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pipellm.channel import keys as keys_module
from pipellm.channel.endpoint import Opener, Sealer
from pipellm.channel.keys import KeyAgreement, SessionKeys
from pipellm.channel.protocol import FIRST, LAST, Direction, Kind, iv_for, pack_header, position
from pipellm.errors import IntegrityError

# RFC 7748, section 6.1
ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SESSION = 7

# from the independent computation (hkdf() below), host = Alice, device = Bob, session 7
ROOT = "6993e07af580e3783a6192bea237b7b35fbe0ecd1101257d2a46d910ee588bdb"
EPOCH_KEYS = {  # (direction, epoch): (AES-256 key, IV mask, key id)
    (Direction.H2D, 0): ("9b2b0c15b6d48a0cf9585421fc1916534798117b50a964319191e8f9461819c2",
                         "709510fc10f21f3e399faea2", "2e168da154fd7d3c"),
    (Direction.H2D, 1): ("d51ba2b8530801090dde123db107f56620302e024ab225100aaa4237315ce435",
                         "2b4ff97eb45cbf814ce9d664", "aefa646889d3d94b"),
    (Direction.D2H, 0): ("b9b6082c6693d5efc4357d674448aba1479de26bd23ab12d17718df45579a959",
                         "faab9a12e111d3f254211451", "6dbbb55709663b32"),
    (Direction.D2H, 1): ("ac10153cd37648c12b871a269a78e401923530de8171df0b8f9337d12e88a46a",
                         "8ce87cda2d1e1ad64e0f617d", "c0374ef61499dae8"),
}
PLAINTEXT = b"pipellm KAT 16 B"


def hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256, written out with hmac."""
    prk = hmac.new(salt if salt is not None else bytes(32), ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def header_hex(epoch: int, counter: int, order: int, *, direction="00", kind="00", flags="0003") -> str:
    """The 56 header bytes, field by field: magic, direction, kind, flags, session,
    epoch, counter, buffer 5, offset 4096, length 16, order."""
    return ("504c4d32" + direction + kind + flags + f"{SESSION:08x}" + f"{epoch:08x}" + f"{counter:016x}"
            + f"{5:016x}" + f"{4096:016x}" + f"{16:016x}" + f"{order:016x}")


def test_the_independent_hkdf_is_rfc_5869():
    okm = hkdf(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_the_pinned_schedule_is_the_independent_computation():
    shared = X25519PrivateKey.from_private_bytes(bytes.fromhex(ALICE_PRIVATE)).exchange(
        X25519PrivateKey.from_private_bytes(bytes.fromhex(BOB_PRIVATE)).public_key())
    assert shared.hex() == "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"  # RFC 7748
    salt = hashlib.sha256(bytes.fromhex(ALICE_PUBLIC + BOB_PUBLIC) + SESSION.to_bytes(4, "big")).digest()
    root = hkdf(shared, salt, b"pipellm/v1 session root", 32)
    assert root.hex() == ROOT
    for (direction, epoch), (key, mask, key_id) in EPOCH_KEYS.items():
        info = b"pipellm/v1 " + direction.label.encode() + b" epoch " + epoch.to_bytes(4, "big")
        material = hkdf(root, None, info, 44)
        assert (material[:32].hex(), material[32:].hex(), hkdf(root, None, info + b" key id", 8).hex()) == \
            (key, mask, key_id)


def _agreement(private_hex: str) -> KeyAgreement:
    party = KeyAgreement()
    party._private = X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    party.public_bytes = party._private.public_key().public_bytes_raw()
    return party


def test_key_agreement_and_schedule_give_the_known_keys():
    host, device = _agreement(ALICE_PRIVATE), _agreement(BOB_PRIVATE)
    assert (host.public_bytes.hex(), device.public_bytes.hex()) == (ALICE_PUBLIC, BOB_PUBLIC)
    transcript = {"session": SESSION, "host_public": host.public_bytes, "device_public": device.public_bytes}
    for ours in (host.derive(device.public_bytes, **transcript), device.derive(host.public_bytes, **transcript)):
        for (direction, epoch), (key, mask, key_id) in EPOCH_KEYS.items():
            k = ours.epoch_key(direction, epoch)
            assert (k.secret.hex(), f"{k.mask:024x}", k.key_id.hex()) == (key, mask, key_id)
    # another session id salts the root: other keys from the same key pairs
    other = host.derive(device.public_bytes, **dict(transcript, session=SESSION + 1))
    assert other.epoch_key(Direction.H2D, 0).secret.hex() != EPOCH_KEYS[(Direction.H2D, 0)][0]
    assert keys_module._LABEL == b"pipellm/v1 "


def test_header_iv_and_position_are_the_written_layout():
    assert pack_header(Direction.H2D, Kind.DATA, SESSION, 0, 0, 5, 4096, 16, 1, FIRST | LAST).hex() == \
        header_hex(0, 0, 1)
    assert pack_header(Direction.D2H, Kind.DATA, SESSION, 3, 2**40 + 9, 5, 4096, 16).hex() == \
        header_hex(3, 2**40 + 9, 0, direction="01", flags="0000")
    assert pack_header(Direction.H2D, Kind.GO, SESSION, 0, 1, 5, 4096, 16, 2).hex() == \
        header_hex(0, 1, 2, kind="02", flags="0000")
    mask = int(EPOCH_KEYS[(Direction.H2D, 0)][1], 16)
    assert iv_for(mask, 0).hex() == "709510fc10f21f3e399faea2"
    assert iv_for(mask, 1).hex() == "709510fc10f21f3e399faea3"
    assert iv_for(mask, 0xFFFFFFFF).hex() == "709510fc10f21f3ec660515d"  # the low 64 bits XOR the counter
    assert iv_for(mask, 2**63).hex() == "709510fc90f21f3e399faea2"
    assert [position(i, 2) for i in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert position(2**32 + 5, 2**32) == (1, 5)


def _session() -> SessionKeys:
    return SessionKeys(bytes.fromhex(ROOT), SESSION)


def test_a_sealed_message_is_the_known_bytes_and_rotates_its_key():
    sealer = Sealer(_session(), Direction.H2D, rotate_after=2)
    known = [  # index: (epoch, counter, IV, ciphertext || tag) of PLAINTEXT for (5, 4096), order = index + 1
        (0, 0, "709510fc10f21f3e399faea2", "6e88681485e44401ac39719a5cdc747d1c4a473cd16d6e11106e07a06d4ca4aa"),
        None,
        (1, 0, "2b4ff97eb45cbf814ce9d664", "717405a19c69722ed6486f55344bb8cefb48f60652446ceecd347f3ac1339a58"),
    ]
    messages = []
    for index, expected in enumerate(known):
        out = memoryview(bytearray(len(PLAINTEXT) + 16))
        msg = sealer.seal_next(Kind.DATA, 5, 4096, PLAINTEXT, out, order=index + 1, flags=FIRST | LAST)
        messages.append(msg)
        if expected is None:
            continue
        epoch, counter, iv, payload = expected
        assert bytes(msg.aad).hex() == header_hex(epoch, counter, index + 1)
        assert msg.iv.hex() == iv and bytes(msg.payload).hex() == payload
    # the device's opener, from the same root, takes them in order and gives the plaintext back
    opener = Opener(_session(), Direction.H2D, rotate_after=2)
    for index, msg in enumerate(messages):
        staging = memoryview(bytearray(len(PLAINTEXT)))
        header, got, _ = opener.open_into(msg, staging)
        assert got == index and bytes(staging) == PLAINTEXT and header.order == index + 1


def test_the_known_message_under_another_counter_is_refused():
    sealer = Sealer(_session(), Direction.H2D, rotate_after=2)
    out = memoryview(bytearray(len(PLAINTEXT) + 16))
    msg = sealer.seal_next(Kind.DATA, 5, 4096, PLAINTEXT, out, order=1, flags=FIRST | LAST)
    opener = Opener(_session(), Direction.H2D, rotate_after=2)
    opener.skip_to(1)  # the opener expects index 1 (counter 1): the message carries counter 0
    with pytest.raises(IntegrityError):
        opener.open_into(msg, memoryview(bytearray(len(PLAINTEXT))))
