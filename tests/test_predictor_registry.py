"""The predictor registry, plugins by entry point, and the contract every predictor
keeps (the conformance battery, scikit-learn's parameter conventions)."""

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

import pipellm
from pipellm.predictors import LayerwisePredictor, SequencePredictor, TransferEvent, available, get
from pipellm.traces import generate

def test_registry_and_bad_names():
    names = available()
    for builtin in ("none", "sequence", "layerwise", "kvswap", "lru", "oracle"):
        assert builtin in names
    assert isinstance(get("layerwise", order=3), LayerwisePredictor) and get("layerwise", order=3).order == 3
    with pytest.raises(pipellm.ArgumentError, match="unknown predictor 'nope'"):
        get("nope")
    with pytest.raises(TypeError, match="predictor must be a name"):
        get(42)
    inst = SequencePredictor()
    assert get(inst) is inst
    with pytest.raises(pipellm.ArgumentError, match="options"):
        get(inst, order=2)


def _wheel(path, files: dict, entry_points: str):
    dist = "demo_pred-0.1.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = "Metadata-Version: 2.1\nName: demo-pred\nVersion: 0.1\n"
    files[f"{dist}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist}/entry_points.txt"] = entry_points
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in list(files) + [f"{dist}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


def test_a_throw_away_plugin_distribution_is_used_by_name(tmp_path):
    plugin = textwrap.dedent("""
        from pipellm.predictors import Prediction, Predictor

        class MarkovPredictor(Predictor):
            name = "markov"
            def __init__(self):
                self.last = None
            def observe(self, event):
                self.last = event
            def predict(self, k):
                return [] if self.last is None else [Prediction(self.last.region, 0, self.last.nbytes)]
    """)
    wheel = tmp_path / "demo_pred-0.1-py3-none-any.whl"
    _wheel(wheel, {"demo_pred/__init__.py": plugin},
           "[pipellm.predictors]\nmarkov = demo_pred:MarkovPredictor\nbroken = demo_pred.missing:Nope\n")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    code = textwrap.dedent("""
        import warnings, numpy as np, pipellm
        from pipellm.predictors import available, get
        names = available()
        print(names["markov"], names["broken"])
        with pipellm.Pipeline(device="emulated", mode="pipellm", predictor="markov", chunk_size=4096,
                              bounce_bytes=1 << 20, depth_bytes=1 << 20, min_speculative_bytes=0) as pipe:
            r = pipe.register(pipellm.empty(8192, np.uint8), name="w")
            for _ in range(4):
                pipe.to_device(r); pipe.wait_speculation()
            print(type(pipe.predictor).__name__, pipe.stats()["hits"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                get("broken")
            except ValueError as exc:
                print("refused:", exc)
            print("warned:", *[str(w.message) for w in caught])
    """)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "demo-pred demo-pred"
    assert lines[1] == "MarkovPredictor 3"
    assert lines[2].startswith("refused: unknown predictor 'broken'")
    assert "predictor plugin 'broken' (demo_pred.missing:Nope) failed to load" in lines[3]
    cli = subprocess.run([sys.executable, "-m", "pipellm.cli", "predictors"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "markov" in cli.stdout and "demo-pred" in cli.stdout


@pytest.mark.parametrize("name", ["layerwise", "kvswap", "lru", "sequence", "oracle"])
def test_predictions_are_the_named_tuples_they_say(name):
    """The planning path builds predictions from tuples of fields without a Python frame:
    what it returns is a Prediction (type, fields, equality and hash of a tuple), never a
    bare tuple or a half-made one."""
    from pipellm.predictors.base import Prediction
    trace = generate.vllm_swap(requests=4) if name in ("kvswap", "lru") else generate.moe(seed=2, tokens=4, weight_budget=4 << 20)
    records = [r for r in trace.records if r.op in ("h2d", "d2h")]
    cls = pipellm.predictors.BUILTIN[name]
    predictor = (cls(future=[(r.region, r.offset, r.nbytes) for r in records if r.op == "h2d"])
                 if name == "oracle" else cls())
    seen = 0
    for r in records:
        for p in predictor.predict(4):
            assert type(p) is Prediction
            assert p == Prediction(p.region, p.offset, p.nbytes) and hash(p) == hash(tuple(p))
            assert isinstance(p.region, str) and isinstance(p.offset, int) and isinstance(p.nbytes, int)
            seen += 1
        predictor.observe(TransferEvent(r.region, r.offset, r.nbytes, r.op))
    assert seen > 20


# -- scikit-learn's conventions and the conformance battery ---------------------------------
@pytest.mark.parametrize("name", sorted(pipellm.predictors.BUILTIN))
def test_every_builtin_predictor_passes_the_conformance_battery(name):
    from pipellm.testing import check_predictor
    check_predictor(pipellm.predictors.BUILTIN[name])


def test_the_battery_catches_a_predictor_that_breaks_the_contract():
    from pipellm.predictors import Prediction, Predictor
    from pipellm.testing import check_predictor

    class TooMany(Predictor):
        name = "too-many"

        def predict(self, k):
            return [Prediction("a", 0, 1)] * (k + 1)

    class Stateful(Predictor):
        name = "stateful"

        def __init__(self, depth: int = 2):
            self.depth = 3  # stored under its name, but not as given

        def predict(self, k):
            return []

    with pytest.raises(AssertionError, match=r"predict\(0\) must return nothing"):
        check_predictor(TooMany)
    with pytest.raises(AssertionError, match="as given"):
        check_predictor(Stateful(depth=5))


def test_params_clone_and_fit_follow_scikit_learn():
    from pipellm.predictors import LayerwisePredictor, Predictor, clone

    p = LayerwisePredictor(order=3)
    for name in ["l0", "l1", "l0", "l1"]:
        p.observe(TransferEvent(name, 0, 10))
    assert p.predict(1) and p.get_params() == {"order": 3}
    copy = clone(p)
    assert copy.get_params() == {"order": 3} and copy.predict(1) == []  # unfitted: nothing observed
    assert p.set_params(order=2) is p and p.order == 2 and p.predict(1) == []  # new parameters, forgotten
    with pytest.raises(pipellm.ArgumentError, match="order must be an integer"):
        p.set_params(order=0)
    with pytest.raises(pipellm.ArgumentError, match="no parameter 'depth'; its parameters: order"):
        p.set_params(depth=1)
    assert p.fit([]) is p
    with pytest.raises(TypeError, match="abstract"):
        type("NoPredict", (Predictor,), {})()
    with pytest.raises(pipellm.ArgumentTypeError):
        clone("layerwise")


def test_a_plugin_that_shadows_a_builtin_is_refused(monkeypatch):
    from importlib.metadata import EntryPoint

    import pipellm.predictors as predictors

    class Dist:
        name = "someone-elses-pkg"

    shadow = EntryPoint("layerwise", "somewhere:Thing", predictors.GROUP)
    monkeypatch.setattr(predictors, "entry_points",
                        lambda group: [_with_dist(shadow, Dist())] if group == predictors.GROUP else [])
    with pytest.raises(pipellm.ArgumentError, match="from someone-elses-pkg .* may not shadow a built-in"):
        predictors.get("layerwise")
    assert "refused" in predictors.available()["layerwise"]
    assert isinstance(predictors.get("sequence"), predictors.SequencePredictor)  # the others still work


def _with_dist(ep, dist):
    class WithDist:
        name, value, group = ep.name, ep.value, ep.group

    WithDist.dist = dist
    return WithDist()
