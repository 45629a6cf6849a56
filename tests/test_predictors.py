"""Predictors on synthetic traffic with known answers (the registry and the contract: test_predictor_registry.py)."""

import json
import os
import random
import sys
import time

import pytest

import pipellm
from pipellm.predictors import (KVSwapPredictor, LayerwisePredictor, LRUPredictor, NonePredictor, OraclePredictor,
                                SequencePredictor, TransferEvent, get)
from pipellm.traces import generate


def feed(p, events):
    for e in events:
        p.observe(TransferEvent(*e) if isinstance(e, tuple) else e)


def regions(preds):
    return [x.region for x in preds]


def test_none_predicts_nothing():
    p = NonePredictor()
    feed(p, [("a", 0, 1)] * 3)
    assert p.predict(5) == []


def test_layerwise_first_pass_learns_then_predicts_the_loop():
    p = LayerwisePredictor()
    loop = [("embed", 0, 64), ("l0", 0, 1000), ("l1", 0, 1000), ("l2", 0, 1000), ("head", 0, 128)]
    feed(p, loop[:3])
    assert regions(p.predict(5)) == []                      # nothing seen after l1 yet
    feed(p, loop[3:] + loop[:2])
    assert regions(p.predict(4)) == ["l1", "l2", "head", "embed"]


def test_layerwise_micro_batches_and_growing_kv():
    p = LayerwisePredictor()
    for step in range(3):
        for layer in range(2):
            feed(p, [(f"w{layer}", 0, 4096)] + [(f"kv{layer}.{b}", 0, 100 * (step + 1)) for b in range(2)])
    got = p.predict(3)
    assert [(x.region, x.nbytes) for x in got] == [("w0", 4096), ("kv0.0", 400), ("kv0.1", 400)]


def test_layerwise_kv_of_a_region_seen_once_follows_its_look_alikes():
    p = LayerwisePredictor()
    for step in range(2):
        feed(p, [(f"kv{b}", 0, 100 + 10 * step) for b in range(3)])
    feed(p, [("kv0", 0, 120)])   # step 3 begins: kv0 grew by 10 again
    assert [(x.region, x.nbytes) for x in p.predict(2)] == [("kv1", 120), ("kv2", 120)]


def test_layerwise_forward_then_backward():
    p = LayerwisePredictor()
    forward = [(f"l{i}.{t}", 0, 10) for i in range(8) for t in "af"]
    backward = [(f"l{i}.{t}", 0, 10) for i in reversed(range(8)) for t in "af"]
    feed(p, forward + backward[:6])
    assert regions(p.predict(4)) == ["l4.a", "l4.f", "l3.a", "l3.f"]   # the first backward pass, already
    feed(p, backward[6:] + forward + backward[:2])
    assert regions(p.predict(2)) == ["l6.a", "l6.f"]                    # exact contexts now


def test_layerwise_keeps_the_forward_order_through_trainings_first_wrap():
    """LoRA-like steps: forward l0..l5, backward l5..l0 with a checkpoint loaded before
    l0. After the first step the one miss is the first wrap to the next step (never seen
    before); what follows l0's forward loads survives it (l1.a, not l0.a again)."""
    forward = [f"l{i}.{t}" for i in range(6) for t in "af"]
    backward = [r for i in reversed(range(6)) for r in (["ckpt0"] if i == 0 else []) + [f"l{i}.a", f"l{i}.f"]]
    step = forward + backward
    p = LayerwisePredictor()
    feed(p, [(r, 0, 10) for r in step])
    misses = []
    for n, region in enumerate(step * 3):
        guess = p.predict(1)
        if not guess or guess[0].region != region:
            misses.append((n, region))
        p.observe(TransferEvent(region, 0, 10))
    assert misses == [(0, "l0.a")]


def test_layerwise_ignores_device_to_host():
    p = LayerwisePredictor()
    feed(p, [("a", 0, 1), ("b", 0, 1), ("x", 0, 1, "d2h"), ("a", 0, 1)])
    assert regions(p.predict(1)) == ["b"]


def test_kvswap_lifo_across_requests_fifo_across_layers():
    p = KVSwapPredictor()
    for request, blocks in (("r1", [0, 1]), ("r2", [5])):
        for layer in range(3):
            feed(p, [TransferEvent(f"L{layer}", b * 16, 16, "d2h") for b in blocks])
    assert [(x.region, x.offset) for x in p.predict(10)] == [
        ("L0", 80), ("L1", 80), ("L2", 80), ("L0", 0), ("L0", 16), ("L1", 0), ("L1", 16), ("L2", 0), ("L2", 16)]
    feed(p, [("L0", 80, 16), ("L1", 80, 16), ("L2", 80, 16)])          # r2 swapped back in
    assert [(x.region, x.offset) for x in p.predict(2)] == [("L0", 0), ("L0", 16)]


def test_kvswap_is_not_thrown_off_by_small_copies_between_swaps():
    """Input ids and sampling parameters copied in between swap-out copies neither split
    the swap-out nor count as swap-ins (the mixed traces: kvswap's hit rate was 0)."""
    p = KVSwapPredictor()
    for layer in range(3):
        feed(p, [TransferEvent(f"L{layer}", 0, 16, "d2h"), ("ids", 0, 8), TransferEvent(f"L{layer}", 16, 16, "d2h")])
    feed(p, [("ids", 0, 8), ("L0", 0, 16), ("params", 0, 4)])
    assert [(x.region, x.offset) for x in p.predict(3)] == [("L0", 16), ("L1", 0), ("L1", 16)]


def test_lru_predicts_the_stored_run_after_a_hit():
    p = LRUPredictor()
    feed(p, [TransferEvent("pool", off, 8, "d2h") for off in (0, 8, 16, 24, 32)])
    assert [x.offset for x in p.predict(2)] == [32, 24]                 # nothing loaded yet: MRU first
    feed(p, [("pool", 8, 8)])
    assert [x.offset for x in p.predict(3)] == [16, 24, 32]


def test_oracle_reads_the_future():
    future = [("a", 0, 1), ("b", 0, 1), ("c", 0, 1)]
    p = OraclePredictor(future=future)
    assert regions(p.predict(2)) == ["a", "b"]
    feed(p, [("a", 0, 1)])
    assert regions(p.predict(5)) == ["b", "c"]
    p.reset()
    assert regions(p.predict(1)) == ["a"]


def test_sequence_is_next_in_sequence():
    p = SequencePredictor()
    feed(p, [("a", 0, 1), ("b", 0, 1), ("c", 0, 1), ("a", 0, 1)])
    assert regions(p.predict(3)) == ["b", "c", "a"]


@pytest.mark.parametrize("name,workload", [("layerwise", "accelerate"), ("layerwise", "flexgen"),
                                           ("kvswap", "vllm-swap")])
def test_rule_predictors_on_their_workloads(name, workload):
    """Offline: before each load, is it among the next 16 predicted? >= 99% after the
    first pass (the replay figures in the notes measure it through the pipeline)."""
    small = {"accelerate": dict(tokens=4), "flexgen": dict(new_tokens=4, prompt=32), "vllm-swap": dict(requests=8)}
    trace = generate.generate(workload, **small[workload])
    p = get(name)
    first, warm, hits, total, loads = None, False, 0, 0, 0
    for r in trace.records:
        if r.op not in ("h2d", "d2h"):
            continue
        if r.op == "h2d":
            first = first or r.region
            warm = warm or (r.region == first and loads > 0)
            loads += 1
            if warm:
                total += 1
                hits += (r.region, r.offset, r.nbytes) in [tuple(x) for x in p.predict(16)]
        p.observe(TransferEvent(r.region, r.offset, r.nbytes, r.op))
    assert total and hits / total >= 0.99


@pytest.mark.parametrize("workload,options", [("moe", dict(tokens=12, weight_budget=4 << 20)),
                                              ("mixed-accelerate", dict(tokens=3, weight_budget=4 << 20)),
                                              ("lora", dict(steps=2, weight_budget=4 << 20))])
def test_layerwise_kept_chain_is_what_a_recomputation_gives(workload, options):
    """The layerwise predictor keeps its chain across observations while nothing it was
    computed from changed: after every event it must equal a fresh computation."""
    trace = generate.generate(workload, **options)
    p = get("layerwise")
    checked = 0
    for r in trace.records:
        if r.op not in ("h2d", "d2h"):
            continue
        for k in (8, 3):
            assert p.predict(k) == p._recomputed(k)
        p.observe(TransferEvent(r.region, r.offset, r.nbytes, r.op))
        checked += 1
    assert checked > 100


def test_layerwise_kept_chain_matches_recomputation_on_random_walks():
    """Seeded walks over a few regions: mostly forward, with reversals, skips and jumps
    (what moves the walk model, the contexts and the tournament between them), asked
    for a different k each time as the pipeline does."""
    for seed in range(1500):
        rnd = random.Random(seed)
        regions = [f"r{i}" for i in range(rnd.randint(3, 12))]
        p = get("layerwise")
        position = 0
        for _ in range(rnd.randint(10, 120)):
            k = rnd.randint(1, 10)
            assert p.predict(k) == p._recomputed(k), f"seed {seed}"
            p.observe(TransferEvent(regions[position], 0, 64))
            if rnd.random() < 0.8:
                position = (position + rnd.choice([1, 1, 1, -1, -3, 2])) % len(regions)
            else:
                position = rnd.randrange(len(regions))


def test_predictor_overhead_is_small():
    """observe + predict per transfer: well under the 20 us target (measured in the
    benchmark; here only a loose bound so a loaded machine does not fail it)."""
    trace = generate.generate("flexgen", new_tokens=3, prompt=32)
    events = [TransferEvent(r.region, r.offset, r.nbytes, r.op) for r in trace.records if r.op in ("h2d", "d2h")]
    p = get("layerwise")
    start = time.perf_counter()
    for e in events:
        p.observe(e)
        p.predict(16)
    per = (time.perf_counter() - start) / len(events)
    assert per < 1e-3


def test_learned_predictor_fits_saves_and_loads(tmp_path):
    pytest.importorskip("sklearn", reason="the learned predictor trains with scikit-learn (pip install 'pipellm[learned]')")
    from pipellm.predictors import LearnedPredictor
    from pipellm.predictors.learned import NotFittedError

    train = [generate.moe(seed=s, tokens=24, weight_budget=4 << 20) for s in (1, 2)]
    model = LearnedPredictor().fit(train)
    path = tmp_path / "model.json"
    model.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "pipellm-learned-predictor" and len(data["coef"]) == len(data["features"])
    loaded = get(f"learned:{path}")
    assert loaded.coef_ is None  # __init__ stores parameters; the file is read when a pipeline takes it
    loaded.prepare()
    assert loaded.coef_ == model.coef_
    test = generate.moe(seed=0, tokens=24, weight_budget=4 << 20)
    hits = total = 0
    rule = get("layerwise")
    rule_hits = 0
    for r in test.records:
        if r.op != "h2d":
            continue
        key = (r.region, r.offset, r.nbytes)
        hits += key in [tuple(x) for x in loaded.predict(8)]
        rule_hits += key in [tuple(x) for x in rule.predict(8)]
        total += 1
        for p in (loaded, rule):
            p.observe(TransferEvent(*key))
    assert hits > rule_hits  # data-dependent experts: the model beats the rule
    with pytest.raises(NotFittedError, match="no model"):
        LearnedPredictor().save(tmp_path / "nothing.json")  # nothing fitted or loaded yet


def test_learned_predictor_without_a_model_file_uses_the_shipped_model_and_bad_files_are_refused_at_build(tmp_path):
    from pipellm.predictors import LearnedPredictor
    from pipellm.predictors.learned import DEFAULT_MODEL

    with open(DEFAULT_MODEL) as f:
        shipped = json.load(f)
    with pipellm.Pipeline(device="emulated", predictor="learned") as pipe:
        assert pipe.predictor.coef_ == shipped["coef"] and pipe.predictor.intercept_ == shipped["intercept"]
    p = LearnedPredictor()
    p.observe(TransferEvent("a", 0, 10))
    assert p.predict(2) == [] and p.coef_ == shipped["coef"]  # loaded at the first predict outside a pipeline
    (tmp_path / "bad.json").write_text("{}")
    predictor = get(f"learned:{tmp_path / 'bad.json'}")  # (only parameters stored so far)
    with pytest.raises(pipellm.ArgumentError, match="is not a pipellm-learned-predictor"):
        pipellm.Pipeline(device="emulated", predictor=predictor)


def test_learned_predictor_is_not_thrown_off_by_small_copies():
    """Random small copies between weight loads are out of every predictor's reach; the
    learned one must still follow the loads as well as the best rule does."""
    pytest.importorskip("sklearn", reason="the learned predictor trains with scikit-learn (pip install 'pipellm[learned]')")
    from pipellm.predictors import LearnedPredictor

    def trace(seed):
        return generate.mixed(generate.accelerate(tokens=4, weight_budget=4 << 20), seed=seed)

    model = LearnedPredictor().fit([trace(1), generate.moe(seed=1, tokens=24, weight_budget=4 << 20)])
    test = trace(0)
    predictors = {"learned": model, "layerwise": get("layerwise")}
    hits = dict.fromkeys(predictors, 0)
    loads = 0
    for r in test.records:
        if r.op != "h2d":
            continue
        key = (r.region, r.offset, r.nbytes)
        if r.nbytes >= 8192:  # the weight loads, not the random small copies
            loads += 1
            for name, p in predictors.items():
                hits[name] += key in [tuple(x) for x in p.predict(4)]
        for p in predictors.values():
            p.observe(TransferEvent(*key))
    assert hits["layerwise"] > 0.5 * loads  # it learns the order (the first of 4 passes can't hit)
    assert hits["learned"] >= hits["layerwise"] - 0.02 * loads


def test_learned_scores_are_the_model_over_its_features():
    """Inference scores candidates without building feature rows: each score must be
    intercept + coef . features(...), the rows training fits on."""
    from pipellm.predictors import LearnedPredictor
    from pipellm.predictors.learned import FEATURES

    rnd = random.Random(5)
    p = LearnedPredictor()
    p.coef_, p.intercept_ = [rnd.uniform(-3, 3) for _ in FEATURES], rnd.uniform(-2, 2)
    p.reset()
    h = p._history
    compared = 0
    for r in generate.moe(seed=3, tokens=10, weight_budget=4 << 20).records:
        if r.op != "h2d":
            continue
        prev, last = h.context()
        if last is not None:
            lw, kv = h.rule_chains(2)
            for rules in ((lw[0] if lw else None, kv[0] if kv else None), (None, None)):
                recent = set(list(h.loads)[-3:])
                ranked = h.ranked(p.coef_, p.intercept_, prev, last, recent, rules, 1000)
                candidates = [c for _, c in ranked]
                assert set(candidates) == h.candidates(last, rules)
                assert h.ranked(p.coef_, p.intercept_, prev, last, recent, rules, 1) == ranked[:1]
                rows = h.features(prev, last, candidates, recent, rules)
                for (z, c), row in zip(ranked, rows):
                    assert z == pytest.approx(p.intercept_ + sum(w * x for w, x in zip(p.coef_, row)), abs=1e-9), c
                    compared += 1
                assert [z for z, _ in ranked] == sorted((z for z, _ in ranked), reverse=True)
        p.observe(TransferEvent(r.region, r.offset, r.nbytes))
    assert compared > 500


@pytest.mark.parametrize("content,message", [("{not json", "cannot read"), ('{"format": "other"}', "is not a"),
                                             ('{"format": "pipellm-learned-predictor", "version": 1, '
                                              '"features": ["x"], "coef": [1], "intercept": 0}', "malformed")])
def test_learned_model_files_are_checked_and_never_executed(tmp_path, content, message):
    from pipellm.predictors import LearnedPredictor
    path = tmp_path / "bad.json"
    path.write_text(content)
    predictor = LearnedPredictor(model=str(path))  # parameters only: read when a pipeline takes it
    with pytest.raises(pipellm.ArgumentError, match=message):
        predictor.prepare()
    with pytest.raises(pipellm.ArgumentError, match=message):
        pipellm.Pipeline(device="emulated", predictor=LearnedPredictor(model=str(path)))


def plain_predictor_modules(monkeypatch, cython_installed=True):
    """_layerwise.py, _history.py, rules.py and learned.py loaded as plain Python (the fallback where no compiler
    built them), under a throw-away package name, beside the compiled ones; without
    Cython installed they read their declarations through predictors/_nocython.py."""
    import importlib.util
    import types

    import pipellm.predictors.rules as compiled
    folder = os.path.dirname(compiled.__file__)
    if not cython_installed:
        monkeypatch.setitem(sys.modules, "cython", None)   # import cython raises ImportError
    package = types.ModuleType("plain_predictors")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "plain_predictors", package)
    modules = {}
    for name in ("_nocython", "base", "_layerwise", "_history", "rules", "learned"):
        spec = importlib.util.spec_from_file_location(f"plain_predictors.{name}", os.path.join(folder, f"{name}.py"))
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, modules[name])
        spec.loader.exec_module(modules[name])
    return modules


def compiled_or_skip():
    import importlib.machinery

    import pipellm.predictors._history
    import pipellm.predictors._layerwise
    import pipellm.predictors.learned
    import pipellm.predictors.rules
    for module in (pipellm.predictors._layerwise, pipellm.predictors._history, pipellm.predictors.rules,
                   pipellm.predictors.learned):
        if not module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            pytest.skip(f"{module.__name__} was not compiled here ({module.__file__}): nothing to compare")


@pytest.mark.parametrize("cython_installed", [True, False])
@pytest.mark.parametrize("workload,options", [("moe", dict(seed=4, tokens=12, weight_budget=4 << 20)),
                                              ("lora", dict(model="opt-13b", steps=2))])
def test_compiled_predictors_predict_what_the_plain_modules_do(monkeypatch, workload, options, cython_installed):
    """The compiled modules carry C type declarations the plain ones ignore (with Cython
    installed or through the no-op stand-in): both must give the same predictions at
    every step (layerwise, and learned with a model)."""
    from pipellm.predictors import LearnedPredictor
    from pipellm.predictors.learned import FEATURES
    compiled_or_skip()
    plain = plain_predictor_modules(monkeypatch, cython_installed)
    assert all(plain[m].__file__.endswith(".py") for m in ("_layerwise", "_history", "rules", "learned"))
    assert (plain["_layerwise"].cython.__name__ == "cython") == cython_installed
    rnd = random.Random(2)
    coef, intercept = [rnd.uniform(-3, 3) for _ in FEATURES], rnd.uniform(-2, 2)
    pairs = [(LayerwisePredictor(), plain["rules"].LayerwisePredictor()),
             (LearnedPredictor(width=3), plain["learned"].LearnedPredictor(width=3))]
    for p in pairs[1]:
        p.coef_, p.intercept_ = coef, intercept
    steps = 0
    for r in generate.generate(workload, **options).records:
        if r.op not in ("h2d", "d2h"):
            continue
        event = TransferEvent(r.region, r.offset, r.nbytes, r.op)
        for compiled, plain_one in pairs:
            assert [tuple(x) for x in compiled.predict(6)] == [tuple(x) for x in plain_one.predict(6)], (steps, r)
            compiled.observe(event)
            plain_one.observe(event)
        steps += 1
    assert steps > 200


def test_layerwise_chain_past_its_walk_keys_still_matches_recomputation(monkeypatch):
    """A kept chain remembers at most _WALKED walk keys it looked up; past that, any
    change of a walk step drops it. With room for two (the plain module, patched) the cap
    is passed often: the bookkeeping must hold up and the kept chain still equal a
    recomputation on random walks."""
    plain = plain_predictor_modules(monkeypatch)
    monkeypatch.setattr(plain["_layerwise"], "_WALKED", 2)
    overflowed = 0
    for seed in range(300):
        rnd = random.Random(seed)
        regions = [f"r{i}" for i in range(rnd.randint(3, 12))]
        p = plain["rules"].LayerwisePredictor()
        position = 0
        for _ in range(rnd.randint(10, 80)):
            k = rnd.randint(1, 10)
            assert p.predict(k) == p._recomputed(k), f"seed {seed}"
            overflowed += p._nwalked > 2
            p.observe(TransferEvent(regions[position], 0, 64))
            position = (position + rnd.choice([1, 1, 1, -1, -3, 2])) % len(regions) if rnd.random() < 0.8 \
                else rnd.randrange(len(regions))
    assert overflowed > 100


def test_learned_takes_its_weights_as_any_sequence():
    """``coef_`` is public (scikit-learn style): a tuple or a numpy array of weights
    predicts as the list does (the compiled ranking must not insist on a list)."""
    import numpy as np

    from pipellm.predictors import LearnedPredictor
    from pipellm.predictors.learned import FEATURES
    rnd = random.Random(7)
    weights = [rnd.uniform(-3, 3) for _ in FEATURES]
    predictors = []
    for kind in (list, tuple, np.array):
        p = LearnedPredictor(width=2)
        p.coef_, p.intercept_ = kind(weights), 0.5
        predictors.append(p)
    records = [r for r in generate.moe(seed=2, tokens=6, weight_budget=4 << 20).records if r.op == "h2d"]
    for r in records:
        first = [tuple(x) for x in predictors[0].predict(4)]
        assert all([tuple(x) for x in p.predict(4)] == first for p in predictors[1:])
        for p in predictors:
            p.observe(TransferEvent(r.region, r.offset, r.nbytes))
    assert len(records) > 50
