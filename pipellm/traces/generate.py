"""Traces of realistic offloading workloads, by model shape, scaled to fit this machine.

Shapes are those of the published models (layers, hidden size, FFN size, experts);
``weight_budget`` scales the hidden size down so that all offloaded weights fit in that
many bytes, keeping the layer count, the tensor structure and the ratios between
transfer sizes. Compute times come from a simple roofline: ``flops / device_tflops``.

>>> t = accelerate("opt-13b", tokens=2, weight_budget=64 << 20)
>>> t.workload, sum(r.op == "h2d" for r in t.records) > 0
('accelerate-opt-13b', True)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import ArgumentError
from .format import Record, Trace

FP16 = 2
MiB = 1 << 20


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    experts: int = 0      # mixture of experts: experts per layer
    top_k: int = 0
    gated: bool = False   # SwiGLU: three FFN matrices
    vocab: int = 50272

    def ffn_matrices(self) -> int:
        return 3 if self.gated else 2


SHAPES = {
    "opt-13b": Shape("opt-13b", 40, 5120, 20480),
    "opt-30b": Shape("opt-30b", 48, 7168, 28672),
    "opt-66b": Shape("opt-66b", 64, 9216, 36864),
    "opt-175b": Shape("opt-175b", 96, 12288, 49152),
    "llama-7b": Shape("llama-7b", 32, 4096, 11008, gated=True, vocab=32000),
    "mixtral-8x7b": Shape("mixtral-8x7b", 32, 4096, 14336, experts=8, top_k=2, gated=True, vocab=32000),
}


def shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ArgumentError(f"unknown model {name!r}; known: {', '.join(SHAPES)}") from None


class _Scaled:
    """A model shape scaled so that its layers' weights total about ``budget`` bytes."""

    def __init__(self, s: Shape, budget: int, device_tflops: float):
        full = s.layers * self.layer_params(s, s.hidden, s.ffn) * FP16
        self.f = min(1.0, math.sqrt(budget / full))
        self.shape = s
        self.h = max(64, int(s.hidden * self.f) // 64 * 64)
        self.ffn = max(64, int(s.ffn * self.f) // 64 * 64)
        self.flops_per_us = device_tflops * 1e6
        self.true_h = s.hidden

    @staticmethod
    def layer_params(s: Shape, h: int, ffn: int) -> int:
        experts = max(1, s.experts)
        return 4 * h * h + experts * s.ffn_matrices() * h * ffn

    def attn_bytes(self) -> int:
        return 4 * self.h * self.h * FP16

    def expert_bytes(self) -> int:
        return self.shape.ffn_matrices() * self.h * self.ffn * FP16

    def ffn_bytes(self) -> int:
        return max(1, self.shape.experts) * self.expert_bytes()

    def layer_bytes(self) -> int:
        return self.attn_bytes() + self.ffn_bytes()

    def compute_us(self, params_touched: int, tokens: int) -> float:
        """Roofline time of a layer on the real model (2 flops per param per token),
        scaled like the bytes so compute/transfer ratios stay those of the full model."""
        flops = 2 * params_touched * tokens
        return flops / self.flops_per_us * self.f * self.f


class _Builder:
    def __init__(self, workload: str, meta: dict):
        self.workload, self.meta, self.records = workload, meta, []

    def region(self, rid: str, nbytes: int, kind: str) -> str:
        self.records.append(Record("region", rid, None, int(nbytes), None, None, kind))
        return rid

    def h2d(self, rid: str, nbytes: int, offset: int = 0, stream: int = 0) -> None:
        self.records.append(Record("h2d", rid, int(offset), int(nbytes), stream))

    def d2h(self, rid: str, nbytes: int, offset: int = 0, stream: int = 0) -> None:
        self.records.append(Record("d2h", rid, int(offset), int(nbytes), stream))

    def write(self, rid: str, nbytes: int, offset: int = 0) -> None:
        self.records.append(Record("write", rid, int(offset), int(nbytes)))

    def compute(self, us: float, stream: int = 0) -> None:
        self.records.append(Record("compute", None, None, None, stream, round(float(us), 3)))

    def sync(self, stream: int | None = None) -> None:
        self.records.append(Record("sync", stream=stream))

    def trace(self) -> Trace:
        return Trace(self.workload, self.meta, self.records, f"<{self.workload}>")


def _weights(b: _Builder, m: _Scaled, split_small: bool = True) -> list[list[tuple[str, int]]]:
    """Per layer, the offloaded weight tensors (name, bytes): attention, FFN, and the
    small irregular ones (layer norms, biases) real stacks move separately."""
    layers = []
    for i in range(m.shape.layers):
        tensors = [(b.region(f"layer{i}.attn", m.attn_bytes(), "weight"), m.attn_bytes()),
                   (b.region(f"layer{i}.ffn", m.ffn_bytes(), "weight"), m.ffn_bytes())]
        if split_small:
            norm = 4 * m.h * FP16
            tensors.append((b.region(f"layer{i}.norm", norm, "weight"), norm))
        layers.append(tensors)
    return layers


def accelerate(model: str = "opt-13b", *, tokens: int = 8, batch: int = 4, weight_budget: int = 256 * MiB,
               device_tflops: float = 400.0) -> Trace:
    """accelerate-style synchronous offload (``device_map`` with CPU-offloaded layers):
    before each layer's forward its weights are copied in, and the host waits. Decoding
    ``tokens`` tokens for ``batch`` sequences; embeddings and lm_head are small,
    irregular tensors moved at the ends of each step."""
    m = _Scaled(shape(model), weight_budget, device_tflops)
    b = _Builder(f"accelerate-{model}", {"model": model, "tokens": tokens, "batch": batch, "hidden_scaled": m.h,
                                         "source": "pipellm.traces.generate.accelerate"})
    layers = _weights(b, m)
    embed = b.region("embed.norm", 2 * m.h * FP16, "weight")
    head = b.region("lm_head.bias", min(m.shape.vocab, 8192) * FP16, "weight")
    ids = b.region("input_ids", 8 * batch, "other")
    layer_us = m.compute_us(_Scaled.layer_params(m.shape, m.true_h, m.shape.ffn), batch)
    for _ in range(tokens):
        b.write(ids, 8 * batch)
        b.h2d(ids, 8 * batch)
        b.h2d(embed, 2 * m.h * FP16)
        for tensors in layers:
            for rid, nbytes in tensors:
                b.h2d(rid, nbytes)
            b.compute(layer_us)
            b.sync()
        b.h2d(head, min(m.shape.vocab, 8192) * FP16)
        b.compute(layer_us / 4)
        b.sync()
    return b.trace()


def flexgen(model: str = "opt-66b", *, gpu_batches: int = 4, batch: int = 8, prompt: int = 512, new_tokens: int = 32,
            gpu_weight_fraction: float = 0.2, weight_budget: int = 128 * MiB, device_tflops: float = 400.0) -> Trace:
    """FlexGen's zig-zag block schedule, the paper's OPT-66B set-up: 20% of the weights on
    the GPU and 80% offloaded, the KV cache on the CPU, ``gpu_batches`` x ``batch``
    sequences, prompt 512, 32 new tokens. Per layer the offloaded weights are loaded
    once for all micro-batches (prefetched on stream 1 while stream 0 computes), and each
    micro-batch loads its KV cache and stores the new token's KV."""
    m = _Scaled(shape(model), weight_budget, device_tflops)
    b = _Builder(f"flexgen-{model}", {"model": model, "gpu_batches": gpu_batches, "batch": batch, "prompt": prompt,
                                      "new_tokens": new_tokens, "gpu_weight_fraction": gpu_weight_fraction,
                                      "hidden_scaled": m.h, "source": "pipellm.traces.generate.flexgen"})
    off = 1.0 - gpu_weight_fraction
    weights = [b.region(f"layer{i}.w", int(m.layer_bytes() * off) // 4096 * 4096, "weight")
               for i in range(m.shape.layers)]
    wbytes = int(m.layer_bytes() * off) // 4096 * 4096
    # K and V of one token, one micro-batch, scaled like the weights (by f^2, not f) so the
    # ratio of KV-cache traffic to weight traffic stays that of the full model (~0.4)
    token_kv = max(16, int(2 * m.true_h * batch * FP16 * m.f * m.f) // 16 * 16)
    total_tokens = prompt + new_tokens
    kv = {(i, j): b.region(f"kv{i}.b{j}", token_kv * total_tokens, "kv")
          for i in range(m.shape.layers) for j in range(gpu_batches)}
    params = _Scaled.layer_params(m.shape, m.true_h, m.shape.ffn)
    for step in range(new_tokens):
        ctx = prompt + step
        b.h2d(weights[0], wbytes, stream=1)
        for i in range(m.shape.layers):
            b.sync(1)
            if i + 1 < m.shape.layers:                       # prefetch the next layer's weights
                b.h2d(weights[i + 1], wbytes, stream=1)
            for j in range(gpu_batches):
                b.h2d(kv[(i, j)], token_kv * ctx, stream=0)  # this micro-batch's KV cache
                b.compute(m.compute_us(params, batch), stream=0)
                b.d2h(kv[(i, j)], token_kv, offset=token_kv * ctx, stream=0)  # the new token's KV
            b.sync(0)
    return b.trace()


def lora(model: str = "llama-7b", *, steps: int = 4, batch: int = 4, seq: int = 256,
         weight_budget: int = 256 * MiB, device_tflops: float = 400.0) -> Trace:
    """PEFT/LoRA fine-tuning with the frozen base weights offloaded: each step loads the
    layers forward (0..L-1), then backward (L-1..0) for the gradient of the adapters;
    adapters and optimizer state stay on the GPU. Activations of a few layers are
    checkpointed to the host and read back in backward."""
    m = _Scaled(shape(model), weight_budget, device_tflops)
    b = _Builder(f"lora-{model}", {"model": model, "steps": steps, "batch": batch, "seq": seq, "hidden_scaled": m.h,
                                   "source": "pipellm.traces.generate.lora"})
    layers = _weights(b, m, split_small=False)
    act = 2 * m.h * FP16 * 64
    ckpt = [b.region(f"act{i}", act, "activation") for i in range(0, m.shape.layers, 8)]
    params = _Scaled.layer_params(m.shape, m.true_h, m.shape.ffn)
    fwd_us = m.compute_us(params, batch * seq) / 64
    for _ in range(steps):
        for i, tensors in enumerate(layers):
            for rid, nbytes in tensors:
                b.h2d(rid, nbytes)
            b.compute(fwd_us)
            if i % 8 == 0:
                b.d2h(ckpt[i // 8], act)
            b.sync()
        for i in reversed(range(len(layers))):
            if i % 8 == 0:
                b.h2d(ckpt[i // 8], act)
            for rid, nbytes in layers[i]:
                b.h2d(rid, nbytes)
            b.compute(2 * fwd_us)
            b.sync()
    return b.trace()


def moe(model: str = "mixtral-8x7b", *, tokens: int = 48, batch: int = 1, locality: float = 0.6,
        skew: float = 1.2, weight_budget: int = 256 * MiB, device_tflops: float = 400.0, seed: int = 0) -> Trace:
    """Mixture-of-experts offload (Mixtral-style, top-2 of 8): attention weights are loaded
    every layer, experts only when the router picks them, which depends on the data. The
    router's choice is simulated with per-layer expert popularity (Zipf-like, exponent
    ``skew``) and temporal locality (``locality``: the chance a token reuses an expert the
    previous token used in that layer)."""
    s = shape(model)
    if not s.experts:
        raise ArgumentError(f"{model} is not a mixture-of-experts model")
    rng = random.Random(seed)
    m = _Scaled(s, weight_budget, device_tflops)
    b = _Builder(f"moe-{model}", {"model": model, "tokens": tokens, "locality": locality, "skew": skew,
                                  "hidden_scaled": m.h, "seed": seed, "source": "pipellm.traces.generate.moe"})
    attn = [b.region(f"layer{i}.attn", m.attn_bytes(), "weight") for i in range(s.layers)]
    experts = {(i, e): b.region(f"layer{i}.expert{e}", m.expert_bytes(), "weight")
               for i in range(s.layers) for e in range(s.experts)}
    popularity = []
    for _ in range(s.layers):
        order = list(range(s.experts))
        rng.shuffle(order)
        popularity.append({e: 1.0 / (rank + 1) ** skew for rank, e in enumerate(order)})
    previous = [None] * s.layers
    attn_us = m.compute_us(4 * s.hidden * s.hidden, batch)
    expert_us = m.compute_us(s.ffn_matrices() * s.hidden * s.ffn, batch)
    for _ in range(tokens):
        for i in range(s.layers):
            b.h2d(attn[i], m.attn_bytes())
            b.compute(attn_us)
            chosen: list[int] = []
            while len(chosen) < s.top_k:
                if previous[i] and rng.random() < locality:
                    e = rng.choice(previous[i])
                else:
                    weights = popularity[i]
                    e = rng.choices(list(weights), weights=list(weights.values()))[0]
                if e not in chosen:
                    chosen.append(e)
            previous[i] = chosen
            for e in sorted(chosen):
                b.h2d(experts[(i, e)], m.expert_bytes())
                b.compute(expert_us)
            b.sync()
    return b.trace()


def vllm_swap(model: str = "opt-30b", *, requests: int = 24, best_of: int = 4, block_tokens: int = 16,
              gpu_blocks: int = 96, arrival_rate: float = 2.0, prompt: int = 128, output: int = 64,
              kv_budget: int = 512 * MiB, device_tflops: float = 400.0, hbm_bytes_per_s: float | None = None,
              seed: int = 0) -> Trace:
    """vLLM-style preemption by swapping: sequence groups (``best_of`` sequences) arrive as a
    Poisson process; when the GPU runs out of KV blocks the newest running group is
    swapped out (all its blocks, layer by layer, K then V: device to host), and swapped
    groups come back newest-first when blocks free up (host to device, layer by layer:
    FIFO across layers within a group, LIFO across preempted groups).

    Blocks keep the real model's size (one block of one layer's K or V: ``block_tokens``
    x hidden x 2 bytes, 224 KiB for OPT-30B), since the size of each copy is what the
    channel's per-transfer costs and speculation thresholds meet; to fit ``kv_budget``
    (the host's swap space, twice ``gpu_blocks``) only the first layers are kept, and
    compute is scaled by the same fraction.

    Time: by default the arrival clock is abstract (8 decode steps per unit) and a decode
    step's compute is its flops at ``device_tflops``. With ``hbm_bytes_per_s`` (the
    device memory's rate) a step also reads every kept layer's weights once, whatever the
    batch (decoding is memory-bound at small batches), and the arrival clock runs in those
    modelled seconds: ``arrival_rate`` is then in requests per second of the run without
    CC (every mode replays the same schedule; a slower mode would in truth queue more and
    swap more, which a trace cannot show)."""
    s = shape(model)
    rng = random.Random(seed)
    block = s.hidden * FP16 * block_tokens                    # one layer's K (or V) of one block
    cpu_blocks = 2 * gpu_blocks
    layers = max(1, min(s.layers, kv_budget // (2 * block * cpu_blocks)))
    b = _Builder(f"vllm-swap-{model}", {"model": model, "best_of": best_of, "block_tokens": block_tokens,
                                        "gpu_blocks": gpu_blocks, "arrival_rate": arrival_rate, "seed": seed,
                                        "block_bytes": block, "layers_kept": layers,
                                        "source": "pipellm.traces.generate.vllm_swap"})
    kv = [b.region(f"kv_cache.layer{i}.{part}", block * cpu_blocks, "kv") for i in range(layers) for part in "kv"]
    free_cpu = list(range(cpu_blocks))
    t, arrivals = 0.0, []
    for r in range(requests):
        t += rng.expovariate(arrival_rate)
        arrivals.append((t, r))
    waiting, running, swapped = list(arrivals), [], []       # running: [rid, blocks, tokens_left]
    used = 0
    # a decode step of the kept layers: 2 flops per parameter per sequence (roofline)
    step_us = 2 * 12 * s.hidden * s.hidden * best_of * layers / (device_tflops * 1e6)
    weights_us = 12 * s.hidden * s.hidden * FP16 * layers / hbm_bytes_per_s * 1e6 if hbm_bytes_per_s else 0.0
    clock = 0.0
    while waiting or running or swapped:
        if not hbm_bytes_per_s:
            clock += 1.0 / 8                                  # decode steps per unit time
        while swapped and used + swapped[-1][1] <= gpu_blocks:  # LIFO: newest preempted first
            rid, nblocks, left, cpu = swapped.pop()
            for region in kv:
                for c in cpu:
                    b.h2d(region, block, offset=c * block)
            free_cpu.extend(cpu)
            used += nblocks
            running.append([rid, nblocks, left])
        while waiting and waiting[0][0] <= clock and not swapped:
            nblocks = best_of * math.ceil(prompt / block_tokens)
            if used + nblocks > gpu_blocks:
                break
            waiting.pop(0)
            used += nblocks
            running.append([len(running) + 1000 * len(swapped) + int(clock * 1000), nblocks, output])
        if not running:
            if waiting:
                clock = max(clock, waiting[0][0])
            continue
        step = max(step_us * len(running), weights_us)
        b.compute(step)
        b.sync()
        if hbm_bytes_per_s:
            clock += step * 1e-6
        for g in running:                                     # every sequence grows by a token
            g[2] -= 1
            if (output - g[2]) % block_tokens == 0:
                g[1] += best_of
                used += best_of
        for g in [g for g in running if g[2] <= 0]:           # finished groups free their blocks
            running.remove(g)
            used -= g[1]
        while used > gpu_blocks and running:                  # preempt the newest: swap it out
            g = running.pop()
            if len(free_cpu) < g[1]:
                raise ArgumentError("CPU swap space exhausted; raise cpu blocks or lower the load")
            cpu = [free_cpu.pop() for _ in range(g[1])]
            for region in kv:
                for c in cpu:
                    b.d2h(region, block, offset=c * block)
            used -= g[1]
            swapped.append((g[0], g[1], g[2], cpu))
    return b.trace()


def mixed(base: Trace, *, every: int = 4, nbytes: int = 4096, seed: int = 0) -> Trace:
    """``base`` with small (< 8 KiB) non-swap copies (input ids, positions, sampling
    parameters) interleaved before about every ``every``-th transfer; they take IVs on
    the channel like any other copy."""
    if not 0 < nbytes < 8192:
        raise ArgumentError(f"small copies are 1..8191 bytes, got {nbytes}")
    rng = random.Random(seed)
    small = [Record("region", f"small{i}", None, nbytes, None, None, "other") for i in range(3)]
    out = small + []
    for r in base.records:
        if r.op in ("h2d", "d2h") and rng.random() < 1.0 / every:
            s = rng.choice(small).region
            out.append(Record("write", s, 0, nbytes))
            out.append(Record("h2d", s, 0, nbytes, r.stream))
        out.append(r)
    meta = dict(base.meta, mixed_small_every=every, mixed_small_bytes=nbytes)
    return Trace(f"mixed-{base.workload}", meta, out, f"<mixed-{base.workload}>")


WORKLOADS = {"accelerate": accelerate, "flexgen": flexgen, "lora": lora, "moe": moe, "vllm-swap": vllm_swap}


def generate(workload: str, model: str | None = None, **options) -> Trace:
    """A workload's trace by name (``mixed-<workload>`` for the small-copy mix)."""
    if workload.startswith("mixed-"):
        return mixed(generate(workload[len("mixed-"):], model, **options))
    try:
        make = WORKLOADS[workload]
    except KeyError:
        raise ArgumentError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)} and mixed-<name>") from None
    return make(model, **options) if model else make(**options)
