"""The pipellm mode: hits, validation, relinquishing, window order, async d2h, faults."""

import threading

import numpy as np
import pytest

import pipellm
from pipellm import IntegrityError
from pipellm.channel import shared_write_observers
from pipellm.channel.protocol import Kind, unpack_header
from pipellm.testing import Adversary, IVLedger
from pipellm.traces.explain import _Decoyed
from conftest import TIMEOUT
from spec_helpers import CHUNK, spec_pipe, layers, learn, check_device, settled_passes


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_repeating_order_hits_after_the_first_pass(iv_order):
    with spec_pipe(iv_order=iv_order) as pipe:
        s = settled_passes(pipe, layers(pipe))  # (planning is asynchronous: settled after each)
        # pass 1 learns, the first request of pass 2 is the wrap-around; the rest hit
        assert s["hits"] == 4 * 4 - 5 and s["misses"] == 5
        assert s["nops"] == 0 and s["relinquishes"] == 0 and s["stale"] == 0


def test_a_write_after_speculation_is_never_sent_stale():
    with spec_pipe() as pipe:
        regions = layers(pipe)
        learn(pipe, regions)
        # layer0 is queued (encrypted ahead) now; change it with a plain numpy write
        regions[0]._array[:50] = 0xAB
        pipe.to_device(regions[0])
        check_device(pipe, regions)
        assert pipe.stats()["stale"] >= 1


def test_explicit_regions_are_validated_by_their_writes():
    with spec_pipe() as pipe:
        arrays = [np.full(2 * CHUNK, i, np.uint8) for i in range(3)]
        regions = [pipe.register(a, name=f"e{i}", tracking="explicit") for i, a in enumerate(arrays)]
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
        pipe.wait_speculation()
        with regions[0].writing() as a:
            a[:] = 77
        pipe.to_device(regions[0])
        check_device(pipe, regions)
        assert pipe.stats()["stale"] >= 1


def test_untracked_regions_are_never_speculated():
    with spec_pipe() as pipe:
        regions = [pipe.register(np.full(CHUNK, i, np.uint8)) for i in range(3)]
        for _ in range(3):
            for r in regions:
                pipe.to_device(r)
        check_device(pipe, regions)
        s = pipe.stats()
        assert s["hits"] == 0 and s["speculative_bytes"] == 0


def test_strict_misprediction_skips_with_one_command_window_needs_none():
    for iv_order, expect_nops in (("strict", True), ("window", False)):
        with spec_pipe(iv_order=iv_order) as pipe:
            regions = layers(pipe, n=6)
            learn(pipe, regions)
            pipe.to_device(regions[3])          # the queue holds 0, 1, 2...: 3 is behind them
            pipe.to_device(regions[0])
            check_device(pipe, regions)
            s = pipe.stats()
            assert (s["nops"] > 0) == expect_nops, s
            assert s["skipped_messages"] > 0 if expect_nops else s["skipped_messages"] == 0


def test_ledger_sees_no_iv_reuse_with_rotation_under_speculation():
    ledger = IVLedger()
    with ledger.watch(), spec_pipe(rotate_after=7) as pipe:
        regions = layers(pipe, n=5)
        rng = np.random.default_rng(3)
        for step in range(60):
            r = regions[step % 5] if rng.random() < 0.7 else regions[rng.integers(5)]
            pipe.to_device(r)
            if rng.random() < 0.2:
                r._array[rng.integers(r.nbytes)] ^= 1
        check_device(pipe, regions)
        assert pipe.stats()["key_rotations"] > 3
    ledger.check()
    assert ledger.writes > 60


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_a_hit_whose_submission_fails_never_reuses_its_go_index(iv_order):
    """The GO command was sealed (exposed) but the device refused the submission: strict
    order can never pass that index, so the channel closes, saying why; window order
    goes on (the index is just never delivered). No index is ever sealed twice."""
    with spec_pipe(iv_order=iv_order) as pipe:
        regions = layers(pipe, n=3)
        ledger = IVLedger()
        with ledger.watch():
            for _ in range(2):
                for r in regions:
                    pipe.to_device(r)
                    pipe.wait_speculation()
            real = pipe.device.submit_messages

            def refuse(stream, session, msgs):
                if len(msgs) > 1:  # a hit: GO + its chunks
                    pipe.device.submit_messages = real
                    raise pipellm.DeviceError("injected: the device refused the submission")
                return real(stream, session, msgs)

            pipe.device.submit_messages = refuse
            with pytest.raises(pipellm.DeviceError, match="injected"):
                pipe.to_device(regions[0])
            if iv_order == "strict":
                with pytest.raises(pipellm.ChannelClosedError, match="sealed but could not be sent"):
                    pipe.to_device(regions[1])
            else:
                for r in regions:
                    pipe.to_device(r)
                    pipe.wait_speculation()
                check_device(pipe, regions)
        ledger.check()


def decoyed_pipe(n=3):
    # each layer predicted after a decoy never requested: every request passes one queued item
    pipe = spec_pipe(predictor=_Decoyed([f"layer{i}" for i in range(n)], 3 * CHUNK + 100))
    regions = layers(pipe, n=n)
    for i in range(n):
        pipe.register(pipellm.array(np.full(3 * CHUNK + 100, 7, np.uint8)), name=f"decoy{i}")
    return pipe, regions


def test_a_request_that_passes_a_queued_item_sends_its_skip_in_its_own_submission():
    pipe, regions = decoyed_pipe()
    with pipe:
        learn(pipe, regions)
        submissions = []
        real = pipe.device.submit_messages

        def spy(stream, session, msgs):
            submissions.append([unpack_header(m.aad).kind for m in msgs])
            return real(stream, session, msgs)
        pipe.device.submit_messages = spy
        before = pipe.stats()
        for r in regions:
            pipe.to_device(r)
            pipe.wait_speculation()
        s = pipe.stats()
        check_device(pipe, regions)
    assert s["hits"] - before["hits"] == 3 and s["nops"] - before["nops"] == 3   # a SKIP each
    assert [k[:2] for k in submissions] == [[Kind.SKIP, Kind.GO]] * 3           # one submission each


def test_a_skip_led_submission_that_fails_closes_strict_order_and_reuses_no_index():
    pipe, regions = decoyed_pipe()
    ledger = IVLedger()
    with pipe, ledger.watch():
        learn(pipe, regions)
        real = pipe.device.submit_messages

        def refuse(stream, session, msgs):
            pipe.device.submit_messages = real
            raise pipellm.DeviceError("injected: the device refused the submission")
        pipe.device.submit_messages = refuse
        with pytest.raises(pipellm.DeviceError, match="injected"):
            pipe.to_device(regions[0])
        with pytest.raises(pipellm.ChannelClosedError, match="sealed but could not be sent"):
            pipe.to_device(regions[1])
    ledger.check()


def test_async_device_to_host_lands_and_waits():
    with spec_pipe() as pipe:
        src = layers(pipe, n=1, nbytes=10 * CHUNK)[0]
        dbuf = pipe.to_device(src)
        sink = pipe.register(np.zeros(10 * CHUNK, np.uint8), name="sink")
        transfer = pipe.to_host(dbuf, sink)
        assert np.array_equal(sink.array, src.array)    # .array waits for it
        transfer.wait(TIMEOUT)
        pipe.synchronize()
        s = pipe.stats()
        assert s["bytes_d2h"] == 10 * CHUNK
        assert 0 <= s["async_decrypted_bytes"] <= 10 * CHUNK


def test_device_to_host_into_a_speculated_region_invalidates_it():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
        other = pipe.device.alloc(regions[0].nbytes)
        pipe.to_device(regions[1], dst=other)            # other holds layer1's bytes
        pipe.to_host(other, regions[0]).wait()           # layer0 on the host := layer1's bytes
        pipe.to_device(regions[0])                       # must send the new bytes
        pipe.synchronize()
        assert np.array_equal(pipe.device.read(regions[0].device_buffer), regions[1].array)


def test_authentication_failure_in_async_decryption_surfaces():
    class FlipD2H(Adversary):
        armed = False

        def on_message(self, msg):
            if self.armed and msg.direction == "d2h":
                msg.payload[0] ^= 1
            return [msg]

    adv = FlipD2H()
    with pipellm.open_device("emulated", adversary=adv) as dev:
        pipe = spec_pipe(device=dev)
        src = layers(pipe, n=1)[0]
        dbuf = pipe.to_device(src)
        sink = pipe.register(np.zeros(src.nbytes, np.uint8), name="sink")
        adv.armed = True
        transfer = pipe.to_host(dbuf, sink)
        with pytest.raises(IntegrityError):
            transfer.wait(TIMEOUT)
        assert not sink._array.any()
        with pytest.raises(pipellm.ChannelClosedError):
            pipe.to_device(src)
        pipe.close()


def test_stolen_speculative_ciphertext_is_refused():
    """An attacker reads an unrequested speculative message from shared memory and
    delivers it: without a GO for it the device refuses it and writes nothing."""
    stolen = []

    def watch(msg, key_id, epoch, counter):
        if unpack_header(msg.aad).kind == Kind.SPEC and not stolen:
            stolen.append(msg.copy())

    class Inject(Adversary):
        armed = False

        def on_message(self, msg):
            if self.armed and msg.direction == "h2d" and stolen:
                self.armed = False
                return [stolen[0]]
            return [msg]

    for iv_order in ("strict", "window"):
        stolen.clear()
        adv = Inject()
        shared_write_observers.append(watch)
        try:
            with pipellm.open_device("emulated", adversary=adv) as dev:
                pipe = spec_pipe(device=dev, iv_order=iv_order)
                regions = layers(pipe, n=3)
                for r in regions:
                    pipe.to_device(r)
                pipe.to_device(regions[0])       # speculation starts after this
                pipe.synchronize()
                pipe.wait_speculation()
                before = [pipe.device.read(r.device_buffer) for r in regions]
                assert stolen
                adv.armed = True
                pipe.to_device(pipe.register(pipellm.empty(100, np.uint8), name="x"))  # on demand
                with pytest.raises(IntegrityError):
                    pipe.synchronize()
                for r, b in zip(regions, before):
                    assert np.array_equal(pipe.device.read(r.device_buffer), b)
                pipe.close()
        finally:
            shared_write_observers.remove(watch)


def test_threads_share_a_speculating_pipeline():
    with spec_pipe(bounce_bytes=1 << 20) as pipe:
        regions = layers(pipe, n=4)
        sinks = [pipe.register(np.zeros(r.nbytes, np.uint8), name=f"sink{i}") for i, r in enumerate(regions)]
        errors = []

        def work(k):
            try:
                for i in range(30):
                    r = regions[(i + k) % 4]
                    stream = pipe.stream()
                    dbuf = pipe.to_device(r, stream=stream)
                    if i % 5 == 0:
                        pipe.to_host(dbuf, sinks[k], stream=stream).wait(TIMEOUT)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        check_device(pipe, regions)
        for k, sink in enumerate(sinks):
            assert any(np.array_equal(sink.array, r.array) for r in regions)


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_small_predicted_transfers_hold_their_place_without_encryption(iv_order):
    """Below min_speculative_bytes nothing is encrypted ahead, yet strict order needs no
    SKIP: the transfer is sealed on demand under the index held for it."""
    with spec_pipe(iv_order=iv_order, min_speculative_bytes=8192, chunk_size=1 << 16,
                   depth_bytes=4 << 20, bounce_bytes=1 << 20) as pipe:
        regions = layers(pipe, n=3)  # 12 KiB: encrypted ahead
        small = pipe.register(np.arange(100, dtype=np.uint8), name="ids")   # untracked memory
        for _ in range(4):
            small.array[:] += 1
            pipe.to_device(small)
            pipe.wait_speculation()
            for r in regions:
                pipe.to_device(r)
                pipe.wait_speculation()
        check_device(pipe, regions + [small])
        s = pipe.stats()
        assert s["held_places"] >= 2 and s["speculative_bytes"] > 0 and s["nops"] == 0


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_traffic_of_small_transfers_only_runs_as_cc(iv_order):
    """Nothing worth encrypting ahead: no place is held (a misprediction would cost a
    SKIP, a hit would save nothing) and planning backs off."""
    with spec_pipe(iv_order=iv_order, min_speculative_bytes=1 << 20, chunk_size=1 << 16) as pipe:
        s = settled_passes(pipe, layers(pipe, n=3))
        assert s["held_places"] == 0 and s["speculative_bytes"] == 0 and s["nops"] == 0
        assert s["misses"] == 12


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_a_timeout_part_way_leaves_the_pipeline_usable(iv_order):
    """Bounce memory runs out while the copy engine is held: the request times out, and
    once the device moves again the pipeline goes on in order, nothing leaked."""
    with spec_pipe(iv_order=iv_order, timeout=0.3, bounce_bytes=2 * (CHUNK + 4096)) as pipe:
        regions = layers(pipe, n=3)
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
                pipe.wait_speculation()
        big = pipe.register(pipellm.array(np.arange(5 * CHUNK, dtype=np.uint8)), name="big")
        with pipe.device.paused():
            with pytest.raises(pipellm.TransferTimeoutError):
                pipe.to_device(big)    # on demand: 5 chunks, 2 slots, nothing completes
        pipe.synchronize()
        for r in regions + [big]:
            pipe.to_device(r)
        check_device(pipe, regions + [big])
        with pipe.device.paused():     # hits: 16 GO slots run out while nothing completes
            with pytest.raises(pipellm.TransferTimeoutError):
                for _ in range(40):
                    for r in regions:
                        pipe.to_device(r)
        pipe.synchronize()
        for r in regions:
            pipe.to_device(r)
        check_device(pipe, regions)


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_a_hit_lands_at_any_destination(iv_order):
    """The GO sealed ahead names the region's own device copy; a request for another
    destination is still a hit, its GO sealed at request time."""
    with spec_pipe(iv_order=iv_order) as pipe:
        regions = layers(pipe, n=3)
        learn(pipe, regions)
        other = pipe.device.alloc(regions[0].nbytes + 64)
        hits = pipe.stats()["hits"]
        pipe.to_device(regions[0], dst=other, dst_offset=64)
        pipe.to_device(regions[1])
        pipe.synchronize()
        assert pipe.stats()["hits"] - hits == 2
        assert np.array_equal(pipe.device.read(other, 64, regions[0].nbytes), regions[0].array)
        check_device(pipe, regions[1:2])
