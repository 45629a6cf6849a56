"""accelerate and transformers: real models offloaded with accelerate's own hooks through
the pipeline compute exactly what they compute without offloading, in every mode."""

import json

import numpy as np
import pytest

REASON = ("the accelerate integration needs torch, transformers, accelerate and peft "
          "(pip install 'pipellm[accelerate]'; CI installs them with the CPU build of torch)")
torch = pytest.importorskip("torch", reason=REASON)
pytest.importorskip("transformers", reason=REASON)
pytest.importorskip("accelerate", reason=REASON)

import pipellm  # noqa: E402
from accelerate.hooks import remove_hook_from_submodules  # noqa: E402
from pipellm.integrations.accelerate import WeightsMap, cpu_offload, dispatch_model, infer_device_map  # noqa: E402
from pipellm.integrations.models import block_class, build  # noqa: E402
from pipellm.traces import format as trace_format  # noqa: E402
from pipellm.traces.replay import replay  # noqa: E402
from conftest import make_pipe  # noqa: E402

MODES = ("plain", "cc", "pipellm")
PROMPT = torch.tensor([[2, 17, 33, 91, 5, 250], [2, 8, 400, 7, 77, 3]])


def pipe_for(mode, **kw):
    # min_speculative_bytes=0, adaptive=False: these small weights are encrypted ahead too
    extra = {"predictor": "layerwise", "min_speculative_bytes": 0, "adaptive": False} if mode == "pipellm" else {}
    return make_pipe(mode, chunk_size=16 << 10, bounce_bytes=4 << 20, **(extra | kw))


def generate(model, n=6):
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=n, do_sample=False,
                          pad_token_id=1)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_generate_gives_the_same_tokens_with_offloaded_weights(family, mode):
    expected = generate(build(family, "tiny"))
    model = build(family, "tiny")
    with pipe_for(mode) as pipe:
        weights = cpu_offload(model, pipe)
        tokens = generate(model)
        stats = pipe.stats()
    assert torch.equal(tokens, expected)
    # every weight read went through the pipeline: one load per name per forward
    names = len(dict(model.named_parameters(remove_duplicate=False)))
    assert weights.stats()["loads"] == names * 6
    # the tied head and embedding (OPT) load back to back across forwards: sent once
    tied = 6 - 1 if family == "opt" else 0
    assert weights.stats()["reused"] == tied
    assert stats["transfers_h2d"] == weights.stats()["transfers"] == names * 6 - tied
    if mode == "pipellm":
        assert stats["hits"] > stats["misses"]


def test_the_model_computes_on_the_bytes_the_device_received():
    """The tensors modules get are the emulated device's memory (read-only), not the host copy."""
    model = build("opt", "tiny")
    with pipe_for("cc") as pipe:
        weights = cpu_offload(model, pipe)
        name = "model.decoder.layers.0.fc1.weight"
        on_device = weights[name]
        host = weights.host(name)
        assert torch.equal(on_device, host) and on_device.data_ptr() != host.data_ptr()
        region = weights.region(name)
        assert on_device.data_ptr() == pipe.device.memory(region.device_buffer).ctypes.data
        assert not pipe.device.memory(region.device_buffer).flags.writeable


def test_each_module_loads_once_per_forward_in_the_order_it_runs(tmp_path):
    model = build("llama", "tiny")
    with pipe_for("plain") as pipe:
        cpu_offload(model, pipe)
        with torch.no_grad(), pipe.record(tmp_path / "llama.jsonl"):
            model(PROMPT)
    loads = [r.region for r in trace_format.read(tmp_path / "llama.jsonl").records if r.op == "h2d"]
    order = [n for n, _ in model.named_parameters()]  # llama's modules run in registration order
    assert sorted(loads) == sorted(order)  # each weight once
    layer = [n.split(".")[2] for n in loads if n.startswith("model.layers.")]
    assert layer == sorted(layer, key=int)  # layer by layer, in order


def test_a_weight_changed_between_forwards_is_never_sent_stale():
    """pipellm encrypts the next forward's weights ahead; a write after that must be seen."""
    model, reference = build("opt", "tiny"), build("opt", "tiny")
    name = "model.decoder.layers.1.fc2.weight"
    with pipe_for("pipellm") as pipe:
        weights = cpu_offload(model, pipe)
        with torch.no_grad():
            for _ in range(3):
                model(PROMPT)
            pipe.wait_speculation()
            assert pipe.stats()["hits"] > 0
            weights.host(name).mul_(-0.5)  # in place: the write-tracked host copy
            reference.get_parameter(name).mul_(-0.5)
            out = model(PROMPT).logits
    assert torch.equal(out, reference(PROMPT).logits)


@pytest.mark.parametrize("mode", MODES)
def test_dispatch_model_keeps_what_fits_and_offloads_the_rest(mode):
    expected = generate(build("opt", "tiny"))
    model = build("opt", "tiny")
    device_map = infer_device_map(model, 500_000, no_split_module_classes=[block_class(model)])
    assert device_map["model.decoder.layers.0"] == "device" and device_map["model.decoder.layers.1"] == "cpu"
    with pipe_for(mode) as pipe:
        weights = dispatch_model(model, pipe, device_map)
        resident = weights.stats()["loads"]  # loaded once, at dispatch
        tokens = generate(model)
        per_forward = (weights.stats()["loads"] - resident) / 6
    assert torch.equal(tokens, expected)
    assert resident == sum(1 for n, _ in model.named_parameters(remove_duplicate=False)
                           if not n.startswith(("model.decoder.layers.1.", "lm_head")))
    # the offloaded block and the head (tied to the resident embedding) load every forward
    assert per_forward == sum(1 for n, _ in model.named_parameters(remove_duplicate=False)
                              if n.startswith(("model.decoder.layers.1.", "lm_head")))
    # the tied embedding and head are one region
    assert weights.region("lm_head.weight") is weights.region("model.decoder.embed_tokens.weight")


def test_infer_device_map_does_not_split_blocks():
    model = build("llama", "tiny")
    block = block_class(model)
    from accelerate.utils import compute_module_sizes
    sizes = compute_module_sizes(model)
    budget = sizes["model.embed_tokens"] + sizes["model.layers.0"] // 2  # the embedding and half a block
    whole = infer_device_map(model, budget, no_split_module_classes=[block])
    assert whole["model.embed_tokens"] == "device"
    assert not any(k.startswith("model.layers.0.") for k in whole)  # whole blocks or nothing
    split = infer_device_map(model, budget)
    assert any(k.startswith("model.layers.0.") and v == "device" for k, v in split.items())
    assert infer_device_map(model, 10 << 20) == {"": "device"}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_lora_fine_tuning_over_offloaded_base_weights(mode, family):
    """peft LoRA adapters (not offloaded) train over offloaded base weights: the same loss
    and adapter gradients as without offloading, step after step."""
    peft = pytest.importorskip("peft", reason=REASON)

    def lora_model(base):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(1)  # the adapters' initial values
        return peft.get_peft_model(base, config)

    def steps(model, n=3):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        out = []
        for _ in range(n):
            optimizer.zero_grad()
            loss = model(input_ids=PROMPT, labels=PROMPT).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            out.append((loss.item(), grads))
        return out

    expected = steps(lora_model(build(family, "tiny")))
    with pipe_for(mode) as pipe:
        base = build(family, "tiny")
        model = lora_model(base)
        adapters = [n for n, p in model.named_parameters() if p.requires_grad]
        weights = cpu_offload(model, pipe, keep=adapters)  # the adapters train where they are
        got = steps(model)
        stats = weights.stats()  # each base weight once per step (a tied one reused across steps)
        assert stats["transfers"] == 3 * stats["names"] - stats["reused"] and stats["reused"] == (family == "opt") * 2
    assert [loss for loss, _ in got] == [loss for loss, _ in expected]
    for (_, g), (_, e) in zip(got, expected):
        assert set(g) == set(adapters)
        for n in adapters:
            assert torch.equal(g[n], e[n]), n


def test_a_recorded_transformers_trace_replays_verified_and_is_predicted(tmp_path):
    model = build("opt", "tiny")
    with pipe_for("plain") as pipe:
        weights = cpu_offload(model, pipe)
        with weights.record(tmp_path / "opt.jsonl.gz", workload="opt-tiny-generate"):
            generate(model, n=8)
    trace = trace_format.read(tmp_path / "opt.jsonl.gz")
    assert {r.kind for r in trace.records if r.op == "region"} == {"weight"}
    # the model's time between one module's loads and the next's, as compute
    modules = [r.region.rpartition(".")[0] for r in trace.records if r.op == "h2d"]
    changes = sum(a != b for a, b in zip(modules, modules[1:]))
    computes = [r for r in trace.records if r.op == "compute"]
    assert len(computes) == changes and all(r.us > 0 for r in computes)
    for mode in MODES:
        # (speculation always on, on every size: the hit rate measures the prediction)
        result = replay(trace, mode, min_speculative_bytes=0, adaptive=False) if mode == "pipellm" \
            else replay(trace, mode)
        assert result["verified"], mode
    # the default predictor learns a model's forward after one pass, the tied embedding too
    assert result["predictor"] == "sequence"
    assert result["hit_rate_after_first_pass"] >= 0.99


def test_bad_input_is_refused_and_leaves_nothing_registered():
    model = build("opt", "tiny")
    with pipe_for("cc") as pipe:
        with pytest.raises(pipellm.ArgumentError, match="disk"):
            dispatch_model(model, pipe, {"": "disk"})
        with pytest.raises(pipellm.ArgumentError, match="does not have"):
            dispatch_model(model, pipe, {"model.nope": "cpu"})
        with pytest.raises(pipellm.ArgumentError, match="places no module"):
            dispatch_model(model, pipe, {"model.decoder.layers.0": "cpu"})
        with pytest.raises(pipellm.ArgumentTypeError, match="not a tensor"):
            WeightsMap(pipe, {"w": np.zeros(4)})
        with pytest.raises(pipellm.ArgumentError, match="empty"):
            WeightsMap(pipe, {"w": torch.ones(2), "e": torch.ones(0)})
        for name in ("w", "e", *model.state_dict()):  # nothing left registered
            with pytest.raises(pipellm.UnknownRegionError):
                pipe.region(name)
        assert all(p.device.type == "cpu" for p in model.parameters())  # the model untouched
        weights = cpu_offload(model, pipe)
        with pytest.raises(pipellm.ArgumentError, match="already has accelerate hooks"):
            cpu_offload(model, pipe)
        with pytest.raises(KeyError):
            weights["nope"]
        remove_hook_from_submodules(model)
        weights.close()
        with pytest.raises(pipellm.ArgumentError, match="closed"):
            weights["lm_head.weight"]
    with pytest.raises(pipellm.ArgumentError, match="unknown model family"):
        build("gpt9")
    with pytest.raises(pipellm.ArgumentError, match="multiple of heads"):
        build("opt", dict(hidden=30, layers=1, ffn=8, heads=4, vocab=16))


def test_the_demo_runs_and_every_mode_gives_the_same_tokens(capsys, tmp_path):
    from pipellm.cli import main
    assert main(["demo", "--quick", "--json", "--no-progress", "--out", str(tmp_path / "demo.json")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == list(MODES)
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 <= r["hit_rate"] <= 1 and r["identical_tokens"] is True
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["config"]["torch_threads"] == 1 and saved["rows"][0]["mode"] == "plain"


def test_the_demo_counts_forwards_without_touching_the_model_output():
    """A progress callback that returns something (tqdm's update() returns True when it
    redraws) must not replace the model's output in the demo's forward hook."""
    import torch

    from pipellm.benchmarks.demo import _generate
    model = build("opt", "tiny")
    ids = torch.arange(4, 12).reshape(1, 8)
    counted = []
    tokens = _generate(model, ids, 3, lambda n: counted.append(n) or True)
    assert torch.equal(tokens, _generate(model, ids, 3, lambda n: None)) and sum(counted) == 3
