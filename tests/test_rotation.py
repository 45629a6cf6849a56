"""Key rotation at a small counter limit, with an IV ledger over all shared-memory writes."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipellm.testing import IVLedger, IVReuseError
from pipellm.channel import KeyAgreement, Kind, Sealer, Direction
from pipellm.channel.protocol import position
from conftest import make_pipe, random_bytes


def test_rotation_under_traffic_never_repeats_an_iv():
    ledger = IVLedger()
    ivs = {}
    from pipellm.channel import shared_write_observers

    def record_iv(msg, key_id, epoch, counter):
        assert (key_id, msg.iv) not in ivs, "IV repeated under one key"
        ivs[(key_id, msg.iv)] = (epoch, counter)

    with ledger.watch():
        shared_write_observers.append(record_iv)
        try:
            with make_pipe(chunk_size=1000, bounce_bytes=64 << 10, rotate_after=5) as pipe:
                for i in range(40):
                    host = random_bytes(1 + 397 * i, seed=i)
                    region = pipe.register(host)
                    dbuf = pipe.to_device(region)
                    back = np.zeros_like(host)
                    pipe.to_host(dbuf, pipe.register(back)).wait()
                    assert np.array_equal(back, host)
                stats = pipe.stats()
        finally:
            shared_write_observers.remove(record_iv)
    ledger.check()
    messages = stats["messages_h2d"] + stats["messages_d2h"]
    assert ledger.writes == messages == len(ivs)
    # the host's sealer and opener each move to a new key for every 5 messages after the first 5
    assert stats["key_rotations"] == (stats["messages_h2d"] - 1) // 5 + (stats["messages_d2h"] - 1) // 5
    assert len({key_id for key_id, _ in ivs}) >= messages // 5  # many keys were used


def test_the_ledger_catches_reuse():
    """A ledger that can't fail proves nothing: force a (key, counter) reuse."""
    host, dev = KeyAgreement(), KeyAgreement()
    keys = host.derive(dev.public_bytes, session=1, host_public=host.public_bytes, device_public=dev.public_bytes)
    ledger = IVLedger()
    with ledger.watch():
        a = Sealer(keys, Direction.H2D, 100)
        b = Sealer(keys, Direction.H2D, 100)  # a second sealer on the same key: a bug
        for sealer, data in ((a, b"one"), (b, b"two")):
            sealer.seal_into(sealer.reserve(), Kind.DATA, 1, 0, data, memoryview(bytearray(19)))
    with pytest.raises(IVReuseError, match="1 \\(key, counter\\) pairs"):
        ledger.check()


@settings(max_examples=60, deadline=None)
@given(rotate_after=st.integers(1, 7), runs=st.lists(st.integers(1, 12), min_size=1, max_size=12))
def test_ticket_runs_follow_the_rotation_rule_across_epochs(rotate_after, runs):
    """Runs of tickets (a plan reserves one per item; the epoch's key is remembered
    between runs) carry each index's (epoch, counter) and that epoch's key, whatever
    epochs the runs start in or cross, and no index twice."""
    host, dev = KeyAgreement(), KeyAgreement()
    keys = host.derive(dev.public_bytes, session=1, host_public=host.public_bytes, device_public=dev.public_bytes)
    sealer = Sealer(keys, Direction.H2D, rotate_after)
    seen = []
    for count in runs:
        for ticket in sealer.reserve_run(count):
            assert (ticket.epoch, ticket.counter) == position(ticket.index, rotate_after)
            expected = keys.epoch_key(Direction.H2D, ticket.epoch)  # (derived again once evicted)
            assert (ticket.key.secret, ticket.key.mask) == (expected.secret, expected.mask)
            seen.append(ticket.index)
    assert seen == list(range(sum(runs)))
