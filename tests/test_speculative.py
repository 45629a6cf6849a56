"""The pipellm mode: hits, validation, relinquishing, window order, async d2h, faults."""

import threading
import time

import numpy as np
import pytest

import pipellm
from pipellm import IntegrityError
from pipellm.channel import shared_write_observers
from pipellm.channel.protocol import Kind, unpack_header
from pipellm.predictors import Prediction, Predictor
from pipellm.testing import Adversary, IVLedger
from conftest import TIMEOUT, make_pipe, random_bytes

CHUNK = 4096


def spec_pipe(**kw):
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("depth_bytes", 64 * (CHUNK + 4096))
    kw.setdefault("depth_messages", 48)
    kw.setdefault("iv_window", 64)
    kw.setdefault("min_speculative_bytes", 0)  # these small transfers are encrypted ahead too
    return make_pipe("pipellm", **kw)


def layers(pipe, n=4, nbytes=3 * CHUNK + 100, seed=0):
    rng = np.random.default_rng(seed)
    return [pipe.register(pipellm.array(rng.integers(0, 256, nbytes, dtype=np.uint8)), name=f"layer{i}")
            for i in range(n)]


def learn(pipe, regions, timeout=TIMEOUT):
    """Two passes over ``regions``, then speculation settled: the predictor knows the loop."""
    for _ in range(2):
        for r in regions:
            pipe.to_device(r)
        pipe.synchronize()
    pipe.wait_speculation(timeout)


def check_device(pipe, regions):
    pipe.synchronize()
    for r in regions:
        assert np.array_equal(pipe.device.read(r.device_buffer), r.array), r.name


def settled_passes(pipe, regions, n=4) -> dict:
    """``n`` passes over ``regions``, speculation settled after each request; then every
    transfer landed (encrypted ahead or on demand). Returns the stats."""
    for _ in range(n):
        for r in regions:
            pipe.to_device(r)
            pipe.wait_speculation()
    check_device(pipe, regions)
    return pipe.stats()


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


class Order(Predictor):
    """Predicts a fixed list, for scripted scenarios."""

    def __init__(self, names, nbytes):
        self.names, self.nbytes = names, nbytes

    def predict(self, k):
        return [Prediction(n, 0, self.nbytes) for n in self.names[:k]]


def test_a_worker_failure_falls_back_to_on_demand():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        sealer = pipe._engine.channel.sealer
        real = sealer.seal_into
        failed = []

        def flaky(ticket, kind, *args, **kw):
            if kind == Kind.SPEC and not failed:
                failed.append(ticket)
                raise RuntimeError("injected worker failure")
            return real(ticket, kind, *args, **kw)

        sealer.seal_into = flaky
        for _ in range(3):
            for r in regions:
                pipe.to_device(r)
                pipe.wait_speculation()
        check_device(pipe, regions)
        assert failed and pipe.stats()["worker_errors"] == 1


class Broken(Predictor):
    """Raises in observe or predict, after the first few calls of each."""

    def __init__(self, names, nbytes, where):
        self.names, self.nbytes, self.where, self.calls = names, nbytes, where, 0

    def observe(self, event):
        self.calls += 1
        if self.where == "observe" and self.calls > 3:
            raise RuntimeError("observe is broken")

    def predict(self, k):
        if self.where == "predict" and self.calls > 3:
            raise RuntimeError("predict is broken")
        return [Prediction(n, 0, self.nbytes) for n in self.names[:k]]


@pytest.mark.parametrize("where", ["observe", "predict"])
def test_a_predictor_that_raises_costs_only_speculation(where):
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        pipe._engine.predictor = Broken([r.name for r in regions], regions[0].nbytes, where)
        with pytest.warns(pipellm.PredictorWarning, match=f"{where} is broken"):
            s = settled_passes(pipe, regions)
        assert s["predictor_errors"] >= 1 and s["worker_errors"] == 0
        assert s["hits"] + s["misses"] == 12


class Sloppy(Predictor):
    """Names the next region of the loop (its span in numpy integers), beside predictions
    that are wrong (out of range, an unknown region) or malformed (a float offset, an
    object that is not a Prediction)."""

    def __init__(self, names, nbytes):
        self.names, self.nbytes, self.last = names, nbytes, -1

    def observe(self, event):
        self.last = self.names.index(event.region)

    def predict(self, k):
        name = self.names[(self.last + 1) % len(self.names)]
        return [Prediction(name, np.int64(0), np.int64(self.nbytes)), Prediction(name, 0.0, self.nbytes),
                ("not", "a prediction"), Prediction(name, 0, self.nbytes + 1), Prediction("nowhere", 0, 1)][:k]


def test_malformed_predictions_are_a_predictor_error_and_wrong_ones_are_skipped():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        pipe._engine.predictor = Sloppy([r.name for r in regions], regions[0].nbytes)
        with pytest.warns(pipellm.PredictorWarning, match="has no attribute 'region'|an integer"):
            s = settled_passes(pipe, regions)
        assert s["predictor_errors"] >= 2 and s["worker_errors"] == 0
        assert s["hits"] >= 8 and s["hits"] + s["misses"] == 12  # the numpy-integer span hits


def burn(seconds):
    """Use this much CPU time (the pipeline counts the predictor's CPU time, not sleeps)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Slow(Predictor):
    """Predicts the loop of names, spending a known time in each call: CPU time
    (``burn``) or a wait (``time.sleep``); sums what it spent on worker threads."""

    def __init__(self, names, nbytes, spend=burn):
        self.names, self.nbytes, self.observed, self.predicted, self.last = names, nbytes, 0, 0, -1
        self.spend, self.spent_on_workers = spend, 0.0

    def _spend(self, seconds):
        if threading.current_thread().name.startswith("pipellm-worker"):
            self.spent_on_workers += seconds
        self.spend(seconds)

    def observe(self, event):
        self.observed += 1
        self.last = self.names.index(event.region)
        self._spend(0.002)

    def predict(self, k):
        self.predicted += 1
        self._spend(0.003)
        return [Prediction(self.names[(self.last + 1 + i) % len(self.names)], 0, self.nbytes) for i in range(k)]


def test_stats_count_the_time_spent_in_the_predictor():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        predictor = Slow([r.name for r in regions], regions[0].nbytes)
        pipe._engine.predictor = predictor
        assert pipe.stats()["predictor_s"] == 0
        for _ in range(3):
            for r in regions:
                pipe.to_device(r)
        pipe.wait_speculation()
        s = pipe.stats()
        assert predictor.observed == 9 and predictor.predicted >= 1
        assert s["predictor_s"] >= 0.002 * predictor.observed + 0.003 * predictor.predicted


def test_worker_cpu_time_leaves_out_what_workers_waited_for():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=3)
        predictor = Slow([r.name for r in regions], regions[0].nbytes, spend=time.sleep)
        pipe._engine.predictor = predictor
        for _ in range(4):
            for r in regions:
                pipe.to_device(r)
            pipe.wait_speculation()
        s = pipe.stats()
        assert predictor.spent_on_workers > 0 and s["speculative_bytes"] > 0
        assert 0 < s["worker_cpu_s"] <= s["worker_busy_s"] - 0.9 * predictor.spent_on_workers


class Naming(Predictor):
    """Names ``small`` while told to, else the loop of ``names``; counts predict calls."""

    def __init__(self, small, names, nbytes):
        self.small, self.names, self.nbytes, self.asked, self.last, self.naming_small = small, names, nbytes, 0, -1, True

    def observe(self, event):
        if event.region in self.names:
            self.last = self.names.index(event.region)

    def predict(self, k):
        self.asked += 1
        if self.naming_small:
            return [Prediction(self.small, 0, 64)] * min(k, 1)
        return [Prediction(self.names[(self.last + 1 + i) % len(self.names)], 0, self.nbytes) for i in range(k)]


def test_planning_backs_off_while_predictions_queue_nothing_and_resumes():
    """Predictions of transfers too small to encrypt ahead queue nothing: asking for them
    at every request (and waking a worker at every swap-out) costs CPU for nothing, so
    planning backs off; it resumes once a plan queues something."""
    with spec_pipe(min_speculative_bytes=1024) as pipe:
        small = pipe.register(pipellm.array(np.arange(64, dtype=np.uint8)), name="small")
        regions = layers(pipe, n=3)
        predictor = Naming("small", [r.name for r in regions], regions[0].nbytes)
        pipe._engine.predictor = predictor
        for _ in range(60):
            pipe.to_device(small)
            dbuf = small.device_buffer
            pipe.to_host(dbuf, small).wait()
        pipe.wait_speculation()
        s = pipe.stats()
        assert s["skipped_plans"] > 30 and predictor.asked < 40   # 120 transfers
        predictor.naming_small = False
        for _ in range(12):
            for r in regions:
                pipe.to_device(r)
        pipe.wait_speculation()
        assert pipe.stats()["hits"] >= 18   # the loop is speculated again
        check_device(pipe, regions)


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


def test_close_stops_workers():
    pipe = spec_pipe(workers=3)
    regions = layers(pipe)
    for r in regions * 2:
        pipe.to_device(r)
    workers = pipe._engine.workers.threads
    assert all(t.is_alive() for t in workers)
    pipe.close()
    assert not any(t.is_alive() for t in workers)


def test_predictor_by_name_and_instance():
    with spec_pipe(predictor="none") as pipe:
        regions = layers(pipe, n=2)
        for r in regions * 3:
            pipe.to_device(r)
        assert pipe.stats()["hits"] == 0
    with spec_pipe(predictor=Order(["layer1", "layer0"], 3 * CHUNK + 100)) as pipe:
        regions = layers(pipe, n=2)
        pipe.to_device(regions[1])
        pipe.wait_speculation()
        pipe.to_device(regions[0])
        check_device(pipe, regions)
        assert pipe.stats()["hits"] >= 1
    with pytest.raises(pipellm.ArgumentError, match="unknown predictor 'psychic'"):
        spec_pipe(predictor="psychic")


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


class Switchable(Predictor):
    """Always wrong (predicts a region never requested) until ``right`` is set, then
    predicts the next region of a round robin."""

    def __init__(self, names, nbytes):
        self.names, self.nbytes, self.right, self.last = names, nbytes, False, None

    def observe(self, event):
        self.last = event.region

    def predict(self, k):
        if not self.right:
            return [Prediction("decoy", 0, self.nbytes)]
        i = self.names.index(self.last) if self.last in self.names else -1
        return [Prediction(self.names[(i + 1 + j) % len(self.names)], 0, self.nbytes) for j in range(k)]


def test_a_wrong_predictor_stops_speculation_and_a_recovered_one_restarts_it():
    with spec_pipe() as pipe:
        regions = layers(pipe, n=4, nbytes=CHUNK)
        names = [r.name for r in regions]
        predictor = Switchable(names, CHUNK)
        pipe._engine.predictor = predictor
        pipe.register(pipellm.array(np.zeros(CHUNK, np.uint8)), name="decoy")

        def run(passes):
            for _ in range(passes):
                for r in regions:
                    pipe.to_device(r)
                    pipe.wait_speculation()

        run(8)  # the decoy is encrypted ahead, never requested: accuracy falls
        spent = pipe.stats()["speculative_bytes"]
        run(8)
        s = pipe.stats()
        assert s["hits"] == 0 and s["speculative_bytes"] == spent  # stopped: nothing more wasted
        assert s["prediction_accuracy"] < 0.25
        predictor.right = True
        run(4)
        s = pipe.stats()
        assert s["shadow_hits"] >= 2 and s["hits"] >= 4 * 4 - 4  # resumed within a pass
        check_device(pipe, regions)


def test_back_to_back_hits_leave_planning_to_a_worker_until_the_queue_runs_low():
    """A worker that cannot start the plan asked for (here: the device is paused, so the
    workers stand still) leaves it pending; the requester takes it back only once fewer
    than STEAL_PLAN_BELOW items are queued, not at every request."""
    from pipellm.pipeline.speculative import STEAL_PLAN_BELOW
    with spec_pipe(lookahead=16, depth_messages=64) as pipe:
        regions = layers(pipe, n=8, nbytes=CHUNK)
        learn(pipe, regions)
        for _ in range(4):  # misses while learning (timing) can leave the depth short: more hits
            if pipe.stats()["queued_items"] == 8:
                break
            learn(pipe, regions)
        before = pipe.stats()
        assert before["queued_items"] == 8
        with pipe.device.paused():
            for r in regions[:8 - STEAL_PLAN_BELOW]:
                pipe.to_device(r)
            middle = pipe.stats()
            for r in regions[8 - STEAL_PLAN_BELOW:]:
                pipe.to_device(r)
            after = pipe.stats()
        assert middle["hits"] - before["hits"] == 8 - STEAL_PLAN_BELOW
        assert middle["stolen_plans"] == before["stolen_plans"]   # a worker's job so far
        assert middle["inline_plans"] == before["inline_plans"]
        assert after["stolen_plans"] > middle["stolen_plans"]     # the queue ran low: planned here
        assert after["inline_plans"] - middle["inline_plans"] >= after["stolen_plans"] - middle["stolen_plans"]
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


def test_items_sent_by_hits_are_freed_by_workers_and_never_pile_up():
    import weakref

    from pipellm.pipeline._speculation import MAX_SPENT

    class Spent:  # stands for items hits sent earlier
        pass

    pipe = spec_pipe()
    regions = layers(pipe, n=4)
    learn(pipe, regions)
    engine = pipe._engine
    stats = settled_passes(pipe, regions)
    assert stats["hits"] >= 12
    # workers planned after those hits: what they sent is freed, bar the latest hits'
    assert len(engine._spent) < 4
    held = [Spent() for _ in range(MAX_SPENT)]
    refs = [weakref.ref(x) for x in held]
    engine._spent[:] = held
    del held
    hits = pipe.stats()["hits"]
    pipe.to_device(regions[0])  # a hit, past the bound: it frees them itself
    assert pipe.stats()["hits"] == hits + 1
    assert len(engine._spent) <= 1 and all(ref() is None for ref in refs)
    check_device(pipe, regions)
    pipe.close()
    assert not engine._spent


def _eventually(condition, timeout=TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_an_idle_worker_naps_and_takes_work_without_a_wake_then_blocks():
    """After its last task a worker naps for ``nap_window_s`` before it blocks: a
    request in that window hands it the next plan through a field (no token, no
    system call on the request path); past it the worker blocks and a request wakes it
    with a token. Closing the pipeline stops napping workers at once."""
    pipe = spec_pipe(workers=1)
    engine = pipe._engine
    regions = layers(pipe, n=4, nbytes=CHUNK)
    learn(pipe, regions)
    for window in (600.0, 0.0):
        engine.board.nap_window_s = window
        settled_passes(pipe, regions, n=1)  # the worker ran tasks since: idle under this window
        if window:
            assert _eventually(lambda: engine.board.napping == 1) and engine.board.idle == 0  # napping
        else:
            assert _eventually(lambda: engine.board.idle == 1) and engine.board.napping == 0  # blocked
        before = pipe.stats()
        pipe.to_device(regions[0])  # a hit: the worker is handed the next plan
        pipe.wait_speculation(TIMEOUT)
        after = pipe.stats()
        assert after["hits"] == before["hits"] + 1
        assert after["inline_plans"] == before["inline_plans"]  # the worker planned, not the request
        assert after["queued_items"] == before["queued_items"]  # the item sent is queued again
    check_device(pipe, regions)
    pipe.close()
    with spec_pipe(workers=3) as pipe:  # one worker naps at a time, the others block
        engine = pipe._engine
        regions = layers(pipe, n=4, nbytes=CHUNK)
        engine.board.nap_window_s = 600.0
        settled_passes(pipe, regions, n=2)
        assert _eventually(lambda: engine.board.napping == 1 and engine.board.idle == 2)
        workers = engine.workers.threads
    # (close joins for up to 30 s: a napper that missed the news would still be alive)
    assert not any(t.is_alive() for t in workers)


@pytest.mark.parametrize("idle", [True, False])
def test_an_idle_worker_plans_further_ahead_while_plans_queue_more(idle, monkeypatch):
    """A plan looks only a few transfers past the queue; with the workers idle (a long
    compute window) they plan on until the lookahead is queued and encrypted, where
    without that the queue stays a few items past the last request."""
    from pipellm.pipeline.speculative import SpeculativeEngine
    monkeypatch.setattr(SpeculativeEngine, "plan_when_idle", idle)
    with spec_pipe(predictor="layerwise", lookahead=36, depth_messages=200, depth_bytes=200 * (CHUNK + 4096),
                   iv_window=256) as pipe:
        regions = layers(pipe, n=40, nbytes=CHUNK)
        learn(pipe, regions)
        pipe.to_device(regions[0])
        pipe.wait_speculation(TIMEOUT)
        queued, idle_plans = pipe.stats()["queued_items"], pipe.stats()["idle_plans"]
        for r in regions[1:]:  # every queued item is still a hit
            pipe.to_device(r)
        pipe.synchronize()
    if idle:  # (the lookahead less the one request made)
        assert queued >= 30 and idle_plans > 0
    else:
        assert queued <= 20 and idle_plans == 0


def test_min_speculative_bytes_auto_comes_from_measured_costs():
    from pipellm.pipeline.threshold import MAX_THRESHOLD, MIN_THRESHOLD, speculation_threshold
    with make_pipe("pipellm") as pipe:
        chosen = pipe.stats()["min_speculative_bytes"]
    assert chosen == speculation_threshold() and MIN_THRESHOLD <= chosen <= MAX_THRESHOLD
    with pytest.raises(pipellm.ArgumentError, match="int >= 0 or 'auto', got 'big'"):
        make_pipe("pipellm", min_speculative_bytes="big")


class _Fixed(Predictor):
    """Predicts the same transfer, once armed."""

    name = "fixed"

    def __init__(self, key):
        self.key, self.armed = key, False

    def observe(self, event):
        pass

    def predict(self, k):
        return [Prediction(*self.key)][:k] if self.armed else []


def test_a_worker_encrypts_beside_data_landing_elsewhere_in_the_region_without_receiving_it():
    """Device-to-host data coming into block 0 of a region does not hold up (or get
    received by) a worker encrypting block 1 ahead: only data landing in the chunk's own
    bytes is waited for, and a landing there after all makes the chunk stale."""
    block = 16 * 1024
    predictor = _Fixed(("kv", block, block))
    with spec_pipe(predictor=predictor, min_speculative_bytes=8192, chunk_size=block, adaptive=False) as pipe:
        data = np.random.default_rng(5).integers(0, 256, 2 * block, dtype=np.uint8)
        kv = pipe.register(pipellm.array(data), name="kv")
        dbuf = pipe.to_device(kv)
        pipe.synchronize()
        predictor.armed = True  # block 1 is planned (and encrypted) after the read below is on its way
        pipe.to_host(dbuf, kv, src_offset=0, offset=0, nbytes=4096)  # lands in block 0, not waited for
        pipe.wait_speculation(TIMEOUT)
        assert pipe.stats()["queued_items"] == 1
        assert pipe._engine.receiver.expected, "the worker received the device-to-host data itself"
        hits = pipe.stats()["hits"]
        pipe.to_device(kv, block, block, dst=dbuf, dst_offset=block)
        pipe.synchronize()
        assert pipe.stats()["hits"] == hits + 1
        assert np.array_equal(pipe.device.read(dbuf), data)


def test_a_predicted_transfer_larger_than_the_depth_is_said_once_and_sent_on_demand():
    size = 2 << 20
    with pytest.warns(pipellm.DepthWarning, match=rf"larger than the speculation depth.*depth_bytes >= {2 * size}"):
        with make_pipe("pipellm", predictor="sequence", chunk_size=256 << 10, depth_bytes=1 << 20,
                       min_speculative_bytes=0, adaptive=False) as pipe:
            regions = [pipe.register(pipellm.array(random_bytes(size, seed=i)), name=f"layer{i}") for i in range(2)]
            small = pipe.register(pipellm.array(random_bytes(64 << 10, seed=9)), name="small")
            for _ in range(4):
                for r in regions + [small]:
                    buf = pipe.to_device(r)
                    pipe.synchronize()
                    assert np.array_equal(pipe.device.read(buf), np.asarray(r.array))
            s = pipe.stats()
    assert s["oversized_predictions"] >= 1
    assert s["hits"] >= 1  # the small one that fits is still encrypted ahead
