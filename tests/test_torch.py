"""The PyTorch integration: offloaded modules load their weights through the pipeline."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch integration needs torch (pip install 'pipellm[torch]'; "
                                             "CI installs the CPU build)")

import pipellm  # noqa: E402
from pipellm.integrations.torch import offload  # noqa: E402
from pipellm.traces import format as trace_format  # noqa: E402
from pipellm.traces.replay import replay  # noqa: E402
from conftest import make_pipe  # noqa: E402


class Tiny(torch.nn.Module):
    """Embedding, three blocks (linear + norm), an lm_head tied to the embedding."""

    def __init__(self, vocab=64, width=32, blocks=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width)) for _ in range(blocks))
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LLMs

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = torch.relu(block(x)) + x
        return self.head(x)


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def device_bytes(pipe, region):
    pipe.synchronize()
    return pipe.device.read(region.device_buffer, 0, region.nbytes)


def tensor_bytes(t):
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy()


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_offloaded_model_computes_the_same_and_the_device_holds_its_weights(mode, dtype):
    model, ref_model = tiny(dtype=dtype), tiny(dtype=dtype)
    ids = torch.arange(16).reshape(2, 8)
    # min_speculative_bytes=0: these tiny weights are encrypted ahead too
    kw = {"predictor": "layerwise", "min_speculative_bytes": 0} if mode == "pipellm" else {}
    with make_pipe(mode, chunk_size=4096, **kw) as pipe, offload(model, pipe) as off:
        for _ in range(3):
            out = model(ids)
        assert torch.equal(out, ref_model(ids))
        # the tied embedding / head weight is one region, loaded by both modules
        assert set(off.regions) == {"embed.weight", *(f"blocks.{i}.{j}.{p}" for i in range(3) for j in (0, 1)
                                                       for p in ("weight", "bias"))}
        assert off.stats()["loads"] == 3 * (1 + 3 * 4 + 1)
        for name, t in model.state_dict().items():
            region = off.regions["embed.weight" if name == "head.weight" else name]
            assert np.array_equal(device_bytes(pipe, region), tensor_bytes(t)), name
        if mode == "pipellm":
            assert pipe.stats()["hits"] > 0


def test_an_optimizer_step_is_never_sent_stale():
    """Training with offloaded weights: every step rewrites them (page-protected memory:
    the writes fault once and are seen); the next forward must load the new values."""
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.arange(16).reshape(2, 8)
    with make_pipe("pipellm", chunk_size=4096, predictor="layerwise", min_speculative_bytes=0) as pipe, \
            offload(model, pipe) as off:
        for _ in range(4):
            opt.zero_grad()
            model(ids).float().square().mean().backward()
            opt.step()
            model(ids)  # loads the stepped weights
            for name, p in model.named_parameters():
                assert np.array_equal(device_bytes(pipe, off.regions[name]), tensor_bytes(p)), name
        assert pipe.stats()["stale"] > 0 or pipe.stats()["misses"] > 0


def test_backward_loads_each_module_again_in_reverse_order(tmp_path):
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = torch.nn.Parameter(torch.zeros(32, 32))  # a trainable adapter beside frozen, offloaded weights
    ids = torch.arange(8).reshape(1, 8)
    with make_pipe("cc", chunk_size=4096) as pipe, offload(model, pipe) as off:
        with off.record(tmp_path / "lora.jsonl", workload="tiny-lora"):
            x = model.embed(ids) @ (torch.eye(32) + lora)
            for block in model.blocks:
                x = torch.relu(block(x)) + x
            model.head(x).square().mean().backward()
    trace = trace_format.read(tmp_path / "lora.jsonl")
    loads = [r.region for r in trace.records if r.op == "h2d"]
    forward = ["embed.weight"] + [f"blocks.{i}.{j}.{p}" for i in range(3) for j in (0, 1)
                                  for p in ("weight", "bias")] + ["embed.weight"]
    backward = ["embed.weight"] + [f"blocks.{i}.{j}.{p}" for i in (2, 1, 0) for j in (1, 0)
                                   for p in ("weight", "bias")]
    assert loads == forward + backward
    assert lora.grad is not None and lora.grad.abs().sum() > 0
    assert trace.meta["source"] == "pipellm.integrations.torch" and trace.workload == "tiny-lora"
    assert {r.kind for r in trace.records if r.op == "region"} == {"weight"}


def test_in_place_activations_after_offloaded_modules_train():
    """Backward loads must not break modules followed by in-place ops (ReLU(inplace=True))."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    with make_pipe("cc", chunk_size=4096) as pipe, offload(model, pipe) as off:
        model(x).square().sum().backward()
        assert off.stats()["loads"] == 2 * 4  # forward and backward, two linears, two tensors each
    reference(x).square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad)


def test_blocks_load_whole_subtrees_for_fused_fast_paths():
    """TransformerEncoderLayer's inference fast path reads its children's weights without
    calling them: per-module hooks leave those unloaded (and say so); blocks= loads each
    layer's subtree at once."""
    def encoder():
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()

    x = torch.randn(2, 5, 32)
    for blocks in ((), (torch.nn.TransformerEncoderLayer,)):
        model = encoder()
        with make_pipe("cc", chunk_size=4096) as pipe, offload(model, pipe, blocks=blocks) as off, torch.no_grad():
            out = model(x)
            assert torch.allclose(out, encoder()(x), atol=1e-5)
            if blocks:
                assert off.stats()["never_loaded"] == 0 and off.stats()["loads"] == len(off.regions)
                for name, t in model.state_dict().items():
                    assert np.array_equal(device_bytes(pipe, off.regions[name]), tensor_bytes(t)), name
            else:
                assert off.stats()["never_loaded"] > 0  # the fast path skipped the children's hooks
    with make_pipe("cc", chunk_size=4096) as pipe, pytest.raises(pipellm.ArgumentTypeError, match="blocks must be"):
        offload(encoder(), pipe, blocks=("TransformerEncoderLayer",))


def test_a_recorded_model_trace_replays_verified(tmp_path):
    model = tiny()
    ids = torch.arange(16).reshape(2, 8)
    with make_pipe("plain", chunk_size=4096) as pipe, offload(model, pipe, compute="measured") as off:
        with off.record(tmp_path / "tiny.jsonl.gz"):
            for _ in range(3):
                model(ids)
    trace = trace_format.read(tmp_path / "tiny.jsonl.gz")
    # one measured compute per module with weights: embed, 3 x (linear, norm), head
    assert sum(r.op == "compute" for r in trace.records) == 3 * 8
    for mode in ("cc", "pipellm"):
        result = replay(trace, mode, "layerwise" if mode == "pipellm" else None)
        assert result["verified"], mode


def test_close_removes_the_hooks_and_the_regions():
    model = tiny()
    with make_pipe("cc", chunk_size=4096) as pipe:
        off = offload(model, pipe)
        model(torch.arange(4).reshape(1, 4))
        off.close()
        off.close()
        before = pipe.stats()["transfers_h2d"]
        out = model(torch.arange(4).reshape(1, 4))  # the weights stay usable where they are
        assert pipe.stats()["transfers_h2d"] == before and out.shape == (1, 4, 64)
        assert all(not r.registered for r in off.regions.values())


def test_bad_input_is_refused_and_changes_nothing():
    with make_pipe("cc", chunk_size=4096) as pipe:
        with pytest.raises(pipellm.ArgumentTypeError, match="takes a torch.nn.Module, got list"):
            offload([torch.nn.Linear(2, 2)], pipe)
        with pytest.raises(pipellm.ArgumentTypeError, match="needs a pipellm.Pipeline, got str"):
            offload(torch.nn.Linear(2, 2), "emulated")
        with pytest.raises(pipellm.ArgumentError, match="compute must be None or 'measured'"):
            offload(torch.nn.Linear(2, 2), pipe, compute="guessed")
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
        pointer = model[0].weight.data_ptr()
        with pytest.raises(pipellm.ArgumentError, match=r"tensor '1.weight' is on meta; offload\(\) takes"):
            offload(model, pipe)
        assert model[0].weight.data_ptr() == pointer  # the CPU tensors were not moved either
        assert pipe.stats()["transfers_h2d"] == 0 and not pipe._names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch on a GPU (benchmarks/gpu_check.sh)")
def test_a_buffer_the_cuda_device_delivered_is_a_torch_cuda_tensor():
    dev = pipellm.open_device("cuda")
    try:
        with pipellm.Pipeline(device=dev, mode="cc", chunk_size=4096) as pipe:
            weights = np.arange(3 * 1000, dtype=np.float16).reshape(3, 1000)
            buf = pipe.to_device(pipe.register(pipellm.array(weights), name="w"))
            pipe.synchronize()
            tensor = dev.as_tensor(buf)
            assert tensor.device.type == "cuda" and tensor.dtype == torch.float16 and tuple(tensor.shape) == (3, 1000)
            assert torch.equal(tensor.cpu(), torch.from_numpy(weights))
            with torch.cuda.stream(dev.torch_stream()):
                assert float((tensor.double() * 2).sum()) == float(weights.astype(np.float64).sum() * 2)
    finally:
        dev.close()
