"""The pipellm mode's planning: predictors that raise, mispredict or name nothing useful,
their time, backing off and throttling, the speculation threshold and depth."""

import numpy as np
import pytest

import pipellm
from pipellm.predictors import Prediction, Predictor
from conftest import make_pipe, random_bytes
from spec_helpers import CHUNK, spec_pipe, layers, check_device, settled_passes, Slow


class Order(Predictor):
    """Predicts a fixed list, for scripted scenarios."""

    def __init__(self, names, nbytes):
        self.names, self.nbytes = names, nbytes

    def predict(self, k):
        return [Prediction(n, 0, self.nbytes) for n in self.names[:k]]


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


def test_min_speculative_bytes_auto_comes_from_measured_costs():
    from pipellm.pipeline.threshold import MAX_THRESHOLD, MIN_THRESHOLD, speculation_threshold
    with make_pipe("pipellm") as pipe:
        chosen = pipe.stats()["min_speculative_bytes"]
    assert chosen == speculation_threshold() and MIN_THRESHOLD <= chosen <= MAX_THRESHOLD
    with pytest.raises(pipellm.ArgumentError, match="int >= 0 or 'auto', got 'big'"):
        make_pipe("pipellm", min_speculative_bytes="big")


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
