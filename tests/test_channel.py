"""The channel protocol: key agreement, sealing, strict receiver order, rotation, fail-closed."""

import pytest

from pipellm import ArgumentError, ChannelClosedError, IntegrityError
from pipellm.channel import Direction, KeyAgreement, Kind, Opener, Sealer
from pipellm.channel.protocol import ABANDON, FIRST, GO_BODY, HEADER_BYTES, LAST, SKIP_BODY, iv_for, position, unpack_header
from pipellm.channel import H2D_KINDS, Receiver


def session_pair(session=1):
    host, dev = KeyAgreement(), KeyAgreement()
    kw = dict(session=session, host_public=host.public_bytes, device_public=dev.public_bytes)
    return host.derive(dev.public_bytes, **kw), dev.derive(host.public_bytes, **kw)


def channel(rotate_after=1 << 32, direction=Direction.H2D):
    a, b = session_pair()
    return Sealer(a, direction, rotate_after), Opener(b, direction, rotate_after)


def seal(sealer, data, buffer=7, offset=0, flags=FIRST | LAST):
    out = memoryview(bytearray(len(data) + 16))
    return sealer.seal_into(sealer.reserve(), Kind.DATA, buffer, offset, data, out, flags=flags)


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
    header, index, plain = opener.open_into(msg, staging)
    assert bytes(plain) == b"hello world" and index == 0


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
    assert position(2, 3) == (0, 2)
    assert position(3, 3) == (1, 0)
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
        assert bytes(opener.open_into(msg, staging)[2]) == bytes([i])
    assert sealer.rotations == opener.rotations == 3  # epochs 0..3 were used


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


def window_channel(window=8):
    a, b = session_pair()
    return Sealer(a, Direction.H2D, 1 << 32), Opener(b, Direction.H2D, 1 << 32, window=window)


def test_window_accepts_unused_indices_out_of_order_and_refuses_replays():
    sealer, opener = window_channel(window=4)
    msgs = [seal(sealer, bytes([i])) for i in range(8)]
    staging = memoryview(bytearray(8))
    for i in (2, 0, 1, 5, 3):          # out of order, within the window
        assert opener.open_into(msgs[i], staging)[1] == i
    with pytest.raises(IntegrityError, match="h2d message 3"):
        opener.open_into(msgs[3], staging)   # replay refused


def test_window_refuses_indices_that_fell_behind():
    sealer, opener = window_channel(window=4)
    msgs = [seal(sealer, bytes([i])) for i in range(10)]
    staging = memoryview(bytearray(8))
    opener.open_into(msgs[9], staging)
    with pytest.raises(IntegrityError):
        opener.open_into(msgs[5], staging)   # 9 - 5 >= 4: outside the window


def h2d_pair(window=0):
    a, b = session_pair()
    sealer = Sealer(a, Direction.H2D, 1 << 32)
    return sealer, Receiver(Opener(b, Direction.H2D, 1 << 32, window=window, kinds=H2D_KINDS))


def seal_kind(sealer, ticket, kind, body, buffer=0, offset=0):
    out = memoryview(bytearray(len(body) + 16))
    return sealer.seal_into(ticket, kind, buffer, offset, body, out)


def test_spec_lands_only_where_a_go_sends_it():
    sealer, receiver = h2d_pair()
    go, spec1, spec2 = sealer.reserve_run(3)
    m1 = seal_kind(sealer, spec1, Kind.SPEC, b"aaaa", offset=0)
    m2 = seal_kind(sealer, spec2, Kind.SPEC, b"bbbb", offset=4)
    assert receiver.receive(seal_kind(sealer, go, Kind.GO, GO_BODY.pack(7, 100, 2, 8)), staging()) == []
    assert receiver.receive(m1, staging()) == []        # staged until the transfer is whole
    c1, c2 = receiver.receive(m2, staging())
    assert (c1.buffer, c1.offset, bytes(c1.plaintext)) == (7, 100, b"aaaa")
    assert (c2.buffer, c2.offset, bytes(c2.plaintext)) == (7, 104, b"bbbb")


def staging():
    return memoryview(bytearray(64))


@pytest.mark.parametrize("window", [0, 64])
def test_a_data_run_commits_whole_at_its_last_message(window):
    sealer, receiver = h2d_pair(window)
    parts = [seal(sealer, b"abc", offset=0, flags=FIRST), seal(sealer, b"def", offset=3, flags=0),
             seal(sealer, b"gh", offset=6, flags=LAST)]
    assert receiver.receive(parts[0], staging()) == []
    assert receiver.receive(parts[1], staging()) == []
    assert receiver.receiving is not None
    commits = receiver.receive(parts[2], staging())
    assert [(c.offset, bytes(c.plaintext)) for c in commits] == [(0, b"abc"), (3, b"def"), (6, b"gh")]
    assert receiver.receiving is None


@pytest.mark.parametrize("lost", ["first", "middle"])
def test_a_data_run_missing_a_message_is_refused_in_window_order(lost):
    sealer, receiver = h2d_pair(64)
    parts = [seal(sealer, b"abc", offset=0, flags=FIRST), seal(sealer, b"def", offset=3, flags=0),
             seal(sealer, b"gh", offset=6, flags=LAST)]
    del parts[0 if lost == "first" else 1]
    with pytest.raises(IntegrityError, match="does not continue"):
        for part in parts:
            receiver.receive(part, staging())


@pytest.mark.parametrize("window", [0, 64])
def test_a_transfer_the_host_abandoned_is_discarded_by_the_next(window):
    sealer, receiver = h2d_pair(window)
    assert receiver.receive(seal(sealer, b"abc", flags=FIRST), staging()) == []
    flags = FIRST | LAST | (ABANDON if window else 0)   # strict order: its indices say nothing was lost
    (commit,) = receiver.receive(seal(sealer, b"new", buffer=8, flags=flags), staging())
    assert (commit.buffer, bytes(commit.plaintext)) == (8, b"new") and receiver.abandoned == 1


def test_a_new_transfer_while_one_is_open_is_refused():
    sealer, receiver = h2d_pair(64)
    receiver.receive(seal(sealer, b"abc", flags=FIRST), staging())
    with pytest.raises(IntegrityError, match="never arrived"):
        receiver.receive(seal(sealer, b"new", buffer=8), staging())


def test_spec_without_go_is_refused():
    sealer, receiver = h2d_pair()
    (spec,) = sealer.reserve_run(1)
    with pytest.raises(IntegrityError, match="without a GO"):
        receiver.receive(seal_kind(sealer, spec, Kind.SPEC, b"stolen"), memoryview(bytearray(64)))
    with pytest.raises(ChannelClosedError):
        receiver.receive(seal(sealer, b"x"), memoryview(bytearray(64)))


def test_skip_moves_past_exposed_speculation():
    sealer, receiver = h2d_pair()
    skip, spec_a, spec_b, go, spec_c = sealer.reserve_run(5)
    exposed = seal_kind(sealer, spec_a, Kind.SPEC, b"old")
    receiver.receive(seal_kind(sealer, skip, Kind.SKIP, SKIP_BODY.pack(go.index)), staging())
    receiver.receive(seal_kind(sealer, go, Kind.GO, GO_BODY.pack(1, 0, 1, 3)), staging())
    (commit,) = receiver.receive(seal_kind(sealer, spec_c, Kind.SPEC, b"new"), staging())
    assert bytes(commit.plaintext) == b"new"
    with pytest.raises(IntegrityError):
        receiver.receive(exposed, staging())   # skipped for good


def test_skip_backwards_is_refused():
    sealer, receiver = h2d_pair()
    seal_first = seal(sealer, b"x")
    receiver.receive(seal_first, staging())
    with pytest.raises(IntegrityError, match="SKIP"):
        receiver.receive(seal_kind(sealer, sealer.reserve(), Kind.SKIP, SKIP_BODY.pack(0)), staging())


def test_d2h_opener_refuses_command_kinds():
    a, b = session_pair()
    sealer, opener = Sealer(a, Direction.D2H, 100), Opener(b, Direction.D2H, 100)
    with pytest.raises(IntegrityError):
        opener.open_into(seal_kind(sealer, sealer.reserve(), Kind.GO, GO_BODY.pack(1, 0, 1, 1)),
                         memoryview(bytearray(64)))
