"""Speculation kept only while it pays (pipellm/pipeline/payoff.py) and the engine's
obedience to it."""

import numpy as np
import pytest

import pipellm
from pipellm.pipeline.payoff import Payoff
from conftest import TIMEOUT, make_pipe, random_bytes


def run(payoff, rate_on, rate_off, epochs, clock=None):
    """Drive ``payoff`` for ``epochs`` epochs whose byte rate depends on the state
    (``clock``: [requests, bytes, time] carried over from an earlier run)."""
    clock = clock if clock is not None else [0, 0, 0.0]
    if payoff._start is None:
        payoff.update(*clock)
    states = []
    for _ in range(epochs):
        states.append(payoff.speculating)
        clock[0] += payoff.epoch
        clock[1] += payoff.epoch * 1000
        clock[2] += payoff.epoch * 1000 / (rate_on if payoff.speculating else rate_off)
        payoff.update(*clock)
    return states


@pytest.mark.parametrize("on,off", [(2.0, 1.0), (1.0, 2.0), (1.0, 1.05), (5.0, 1.0)])
def test_the_faster_state_runs_and_the_other_is_tried_ever_more_rarely(on, off):
    states = run(Payoff(epoch=8, max_interval=16, warmup=0), on, off, 400)
    better = on >= off
    share = sum(s == better for s in states) / len(states)
    assert share > 0.9
    # late in the run the loser is tried at most once every max_interval + 1 epochs
    late = states[200:]
    assert sum(s != better for s in late) <= len(late) // 17 + 1


def test_a_change_of_phase_is_followed():
    payoff, clock = Payoff(epoch=8, max_interval=8, warmup=0), [0, 0, 0.0]
    first = run(payoff, 2.0, 1.0, 100, clock)
    second = run(payoff, 1.0, 2.0, 100, clock)  # the workload changed: speculation now loses
    assert sum(first[50:]) / 50 > 0.8 and sum(second[50:]) / 50 < 0.2


class Forced:
    """A controller the test flips by hand."""

    def __init__(self):
        self.speculating, self.switches, self.rates = True, 0, {True: None, False: None}

    def update(self, requests, nbytes, now):
        return self.speculating


def test_the_engine_speculates_only_while_the_controller_says_so():
    with make_pipe("pipellm", predictor="layerwise", min_speculative_bytes=0, chunk_size=1 << 16,
                   depth_bytes=64 << 16, bounce_bytes=4 << 20) as pipe:
        forced = Forced()
        pipe._engine._payoff = forced
        data = [random_bytes(40_000, seed=i) for i in range(4)]
        regions = [pipe.register(pipellm.array(d), name=f"layer{i}") for i, d in enumerate(data)]

        def passes(n):
            before = pipe.stats()["hits"]
            for _ in range(n):
                for r in regions:
                    pipe.to_device(r)
                pipe.synchronize()
                pipe.wait_speculation(TIMEOUT)
            return pipe.stats()["hits"] - before

        assert passes(3) > 4            # learned, and hitting
        forced.speculating = False
        passes(1)                       # what was queued before is used up or given up
        assert passes(3) == 0           # nothing is encrypted ahead any more: on demand, as cc
        assert pipe.stats()["queued_items"] == 0
        forced.speculating = True
        assert passes(3) > 4            # and back
        for r, d in zip(regions, data):
            assert np.array_equal(pipe.device.read(r.device_buffer), d)


def test_adaptive_must_be_a_bool():
    with pytest.raises(pipellm.ArgumentTypeError, match="adaptive must be True or False"):
        make_pipe("pipellm", adaptive="yes")


def test_the_first_epochs_are_not_measured():
    payoff = Payoff(epoch=8, warmup=2)
    states = run(payoff, 1.0, 5.0, 3)  # off is far better, but it takes two epochs to learn
    assert states == [True, True, True]
    assert payoff.rates[True] is not None and payoff.rates[False] is None  # only the third counted
    assert not payoff.speculating  # and off is tried next
