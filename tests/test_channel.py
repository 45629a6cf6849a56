"""The channel protocol: key agreement, sealing, strict receiver order, rotation, fail-closed."""

import pytest

from pipellm import ArgumentError, ChannelClosedError, IntegrityError
from pipellm.channel import Direction, KeyAgreement, Kind, Opener, Sealer
from pipellm.channel.protocol import HEADER_BYTES, iv_for, next_position, unpack_header


def session_pair(session=1):
    host, dev = KeyAgreement(), KeyAgreement()
    kw = dict(session=session, host_public=host.public_bytes, device_public=dev.public_bytes)
    return host.derive(dev.public_bytes, **kw), dev.derive(host.public_bytes, **kw)


def channel(rotate_after=1 << 32, direction=Direction.H2D):
    a, b = session_pair()
    return Sealer(a, direction, rotate_after), Opener(b, direction, rotate_after)


def seal(sealer, data, buffer=7, offset=0):
    out = memoryview(bytearray(len(data) + 16))
    return sealer.seal_into(sealer.reserve(), Kind.DATA, buffer, offset, data, out)


def test_both_ends_derive_the_same_keys_and_directions_differ():
    a, b = session_pair()
    for d in Direction:
        assert a.epoch_key(d, 0).key_id == b.epoch_key(d, 0).key_id
        assert a.epoch_key(d, 0).mask == b.epoch_key(d, 0).mask
    assert a.epoch_key(Direction.H2D, 0).key_id != a.epoch_key(Direction.D2H, 0).key_id
    assert a.epoch_key(Direction.H2D, 0).key_id != a.epoch_key(Direction.H2D, 1).key_id


def test_sessions_get_fresh_keys():
    a, _ = session_pair()
    c, _ = session_pair()
    assert a.epoch_key(Direction.H2D, 0).key_id != c.epoch_key(Direction.H2D, 0).key_id


def test_key_agreement_rejects_bad_public_keys():
    with pytest.raises(ArgumentError, match="32 bytes"):
        KeyAgreement().derive(b"short", session=1, host_public=b"", device_public=b"")
    with pytest.raises(TypeError, match="bytes"):
        KeyAgreement().derive("not bytes", session=1, host_public=b"", device_public=b"")


def test_round_trip_and_header_binds_destination():
    sealer, opener = channel()
    msg = seal(sealer, b"hello world", buffer=9, offset=4096)
    header = unpack_header(msg.aad)
    assert len(msg.aad) == HEADER_BYTES
    assert (header.direction, header.counter, header.buffer, header.offset, header.length) == (0, 0, 9, 4096, 11)
    assert tuple(msg.dst) == (9, 4096, 11)
    staging = memoryview(bytearray(64))
    header, plain = opener.open_into(msg, staging)
    assert bytes(plain) == b"hello world"


def test_iv_is_mask_xor_counter_and_counter_steps_by_one():
    sealer, opener = channel()
    mask = sealer._keys.epoch_key(Direction.H2D, 0).mask
    msgs = [seal(sealer, b"x") for _ in range(3)]
    assert [m.iv for m in msgs] == [iv_for(mask, c) for c in range(3)]
    assert [unpack_header(m.aad).counter for m in msgs] == [0, 1, 2]


def test_receiver_accepts_only_its_expected_counter():
    sealer, opener = channel()
    first, second = seal(sealer, b"a"), seal(sealer, b"b")
    with pytest.raises(IntegrityError, match="h2d message 0"):
        opener.open_into(second, memoryview(bytearray(8)))
    with pytest.raises(ChannelClosedError):
        opener.open_into(first, memoryview(bytearray(8)))  # closed for good after a failure


@pytest.mark.parametrize("field", ["payload", "tag", "iv", "aad-counter", "aad-offset", "aad-magic"])
def test_tampering_is_refused_and_closes(field):
    sealer, opener = channel()
    msg = seal(sealer, b"secret data here")
    if field == "payload":
        msg.payload[0] ^= 1
    elif field == "tag":
        msg.payload[-1] ^= 0x80
    elif field == "iv":
        msg.iv = bytes([msg.iv[0] ^ 1]) + msg.iv[1:]
    elif field == "aad-counter":
        msg.aad[23] ^= 1
    elif field == "aad-offset":
        msg.aad[39] ^= 1
    else:
        msg.aad[0] ^= 1
    staging = bytearray(64)
    with pytest.raises(IntegrityError):
        opener.open_into(msg, memoryview(staging))
    with pytest.raises(ChannelClosedError):
        opener.open_into(seal(sealer, b"next"), memoryview(staging))


def test_wrong_direction_and_wrong_session_are_refused():
    a, b = session_pair()
    d2h = Sealer(a, Direction.D2H, 100)
    with pytest.raises(IntegrityError):
        Opener(b, Direction.H2D, 100).open_into(seal(d2h, b"x"), memoryview(bytearray(8)))
    other, _ = session_pair(session=2)
    with pytest.raises(IntegrityError):
        Opener(b, Direction.H2D, 100).open_into(seal(Sealer(other, Direction.H2D, 100), b"x"), memoryview(bytearray(8)))


def test_rotation_moves_to_a_new_key_and_counter_zero():
    assert next_position(0, 2, 3) == (1, 0)
    assert next_position(0, 1, 3) == (0, 2)
    sealer, opener = channel(rotate_after=3)
    staging = memoryview(bytearray(8))
    seen = set()
    for i in range(10):
        msg = seal(sealer, bytes([i]))
        header = unpack_header(msg.aad)
        assert (header.epoch, header.counter) == divmod(i, 3)
        key_id = sealer._keys.epoch_key(Direction.H2D, header.epoch).key_id
        assert (key_id, msg.iv) not in seen
        seen.add((key_id, msg.iv))
        assert bytes(opener.open_into(msg, staging)[1]) == bytes([i])
    assert sealer.rotations == opener.rotations == 3


def test_a_ticket_is_sealed_once():
    sealer, _ = channel()
    ticket = sealer.reserve()
    out = memoryview(bytearray(17))
    sealer.seal_into(ticket, Kind.DATA, 1, 0, b"a", out)
    with pytest.raises(ArgumentError, match="already sealed"):
        sealer.seal_into(ticket, Kind.DATA, 1, 0, b"a", out)


def test_seal_checks_output_size():
    sealer, _ = channel()
    with pytest.raises(ArgumentError, match="exactly 17 bytes"):
        sealer.seal_into(sealer.reserve(), Kind.DATA, 1, 0, b"a", memoryview(bytearray(16)))


def test_closed_sealer_refuses():
    sealer, _ = channel()
    sealer.close(IntegrityError("boom"))
    with pytest.raises(ChannelClosedError, match="boom"):
        sealer.reserve()
