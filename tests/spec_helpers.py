"""Helpers of the pipellm mode's tests: small-chunk pipelines, layers, learned passes, a
slow predictor."""

import threading
import time

import numpy as np

import pipellm
from pipellm.predictors import Prediction, Predictor
from conftest import TIMEOUT, make_pipe

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
