"""The ``experts`` predictor: a fan-out of candidates where a router picks the next load."""

import pytest

import pipellm
from pipellm.predictors import ExpertsPredictor, LayerwisePredictor, get
from pipellm.predictors.base import TransferEvent
from pipellm.traces import replay
from pipellm.traces.generate import moe
from pipellm.traces.replay import ALWAYS


def held_ahead(predictor, trace, k=16):
    """Per kind of load (attention, expert), the share the predictor had among its next
    ``k`` predictions just before the load."""
    held, total = {}, {}
    for r in trace.records:
        if r.op != "h2d":
            continue
        kind = "expert" if "expert" in r.region else "attn"
        total[kind] = total.get(kind, 0) + 1
        held[kind] = held.get(kind, 0) + ((r.region, r.offset, r.nbytes) in [p[:3] for p in predictor.predict(k)])
        predictor.observe(TransferEvent(r.region, r.offset, r.nbytes))
    return {kind: held[kind] / total[kind] for kind in total}


@pytest.fixture(scope="module")
def trace():
    return moe(tokens=16, weight_budget=16 << 20)


def test_the_router_s_likely_experts_are_predicted_ahead_where_one_guess_is_not_enough(trace):
    fan = held_ahead(ExpertsPredictor(), trace)
    one = held_ahead(LayerwisePredictor(), trace)
    assert fan["attn"] > 0.9                        # the fixed loads: the chain through the layers
    assert fan["expert"] > one["expert"] + 0.1      # several candidates per pick
    wider = held_ahead(ExpertsPredictor(width=8), trace)
    assert wider["expert"] >= fan["expert"]


def test_a_dense_model_is_predicted_in_the_order_of_its_last_pass():
    p = get("experts")
    for _ in range(3):
        for name in ("embed", "l0", "l1", "head"):
            p.observe(TransferEvent(name, 0, 64))
    p.observe(TransferEvent("embed", 0, 64))
    assert [x.region for x in p.predict(8)] == ["l0", "l1", "head"]   # up to one pass ahead
    assert [x[:3] for x in p.predict(1)] == [("l0", 0, 64)]


def test_a_candidate_loaded_before_the_last_one_is_not_predicted_again():
    p = ExpertsPredictor(width=3)
    for chosen in [(1, 2), (2, 3), (1, 3), (1, 2), (2, 3)]:
        for region in ["attn"] + [f"e{e}" for e in chosen] + ["out"]:
            p.observe(TransferEvent(region, 0, 8))
    p.observe(TransferEvent("attn", 0, 8))
    assert [x.region for x in p.predict(8)] == ["e1", "e2", "e3", "out"]
    p.observe(TransferEvent("e2", 0, 8))
    assert [x.region for x in p.predict(8)] == ["e3", "out"]   # e1 comes before e2: its chance is gone


@pytest.mark.parametrize("bad", [{"width": 0}, {"width": 2.5}, {"decay": 1.5}, {"decay": "fast"}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(pipellm.ArgumentError, match="width|decay"):
        ExpertsPredictor(**bad)


def test_the_pipeline_sends_the_candidates_it_was_asked_for_and_skips_the_rest(trace):
    # strict order: the candidates not picked are passed by one SKIP each time, never sent
    options = {"min_speculative_bytes": 0}
    fan = replay(trace, ALWAYS, "experts", **options)
    one = replay(trace, ALWAYS, "layerwise", **options)
    assert fan["verified"] and one["verified"]
    assert fan["hits"] > one["hits"]
    assert fan["nops"] > 0 and fan["wasted_bytes"] > 0
