"""``pipellm demo``: a transformers OPT model generating text with its weights offloaded,
in plain, cc and pipellm modes on the embedded emulated device.

Each mode builds the same model (same seed: :mod:`pipellm.integrations.models`),
offloads every weight with accelerate's own hooks through a pipeline
(:func:`pipellm.integrations.accelerate.cpu_offload`) and generates greedily for a batch
of prompts; the tokens are compared with those of the model run without offloading. So
each forward loads every layer's weights through the mode's channel right before the
layer runs, as accelerate's ``cpu_offload`` does on a GPU.

What is real and what is modelled. The model's compute is real CPU work here (PyTorch
on the host), split the same way in every mode: one torch thread for the model, the
other cores for the pipeline's encryption workers, plus the emulated copy engine's
thread. The emulated device models the link (PCIe Gen5) and a copy engine that decrypts
in hardware: its CPU work beyond that model is *emulation stall*, during which its
clock stands still. Times are the modelled time (wall minus stall, as every benchmark
here reports it); the wall time is in the JSON too.
"""

from __future__ import annotations

import os
from time import perf_counter, thread_time

import numpy as np

import pipellm

MODES = ("plain", "cc", "pipellm")
#: (model size, batch, prompt tokens, new tokens) of a full run and of --quick
FULL = {"size": "demo", "batch": 4, "prompt": 32, "new_tokens": 16}
QUICK = {"size": "tiny", "batch": 2, "prompt": 8, "new_tokens": 4}
#: each mode first generates this many tokens untimed: the timed run is the steady state
#: (the predictor has seen a forward, as in a server that keeps generating)
WARMUP_TOKENS = 2


def _split_cores() -> dict:
    cores = os.cpu_count() or 1
    return {"cores": cores, "torch_threads": 1, "workers": max(1, cores - 1)}


def _prompt(config: dict, vocab: int) -> "torch.Tensor":
    import torch
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, (config["batch"], config["prompt"]))
    return torch.from_numpy(ids)


def _generate(model, ids, new_tokens: int, progress):
    import torch
    def count(*_):  # one forward per new token (a hook's return value would replace the model's output:
        progress(1)  # tqdm's update() returns True when it redraws)

    handle = model.register_forward_hook(count)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    finally:
        handle.remove()


def _run_mode(mode: str, config: dict, family: str, split: dict, ids, progress, adaptive: bool = True,
              options: dict | None = None) -> dict:
    from pipellm.integrations.accelerate import cpu_offload
    from pipellm.integrations.models import build

    model = build(family, config["size"])
    extra = {"workers": split["workers"], "adaptive": adaptive, **(options or {})} if mode == "pipellm" else {}
    with pipellm.Pipeline(device="emulated", mode=mode, **extra) as pipe:
        weights = cpu_offload(model, pipe)
        _generate(model, ids, WARMUP_TOKENS, progress)  # the steady state: a server runs on
        stats0, weights0 = pipe.stats(), weights.stats()
        start, cpu = perf_counter(), thread_time()
        tokens = _generate(model, ids, config["new_tokens"], progress)
        wall, cpu = perf_counter() - start, thread_time() - cpu
        stats, spent = pipe.stats(), {k: v - weights0[k] for k, v in weights.stats().items()}
    time_s = wall - (stats["emulation_stall_s"] - stats0["emulation_stall_s"])
    new = config["batch"] * config["new_tokens"]
    hits, misses = (stats.get(k, 0) - stats0.get(k, 0) for k in ("hits", "misses"))
    # the model's thread outside its loads: CPU seconds, and seconds it was not running
    # (waiting for the GIL or a core) although it had nothing else to wait for
    rest_s, rest_cpu_s = time_s - spent["load_s"], cpu - spent["load_cpu_s"]
    return {"mode": mode, "time_s": time_s, "wall_s": wall, "stall_s": wall - time_s,
            "tokens_per_s": new / time_s, "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "speculating": stats.get("speculating"), "transfers": spent["transfers"],
            "load_s": spent["load_s"], "rest_s": rest_s, "rest_cpu_s": rest_cpu_s, "rest_off_cpu_s": rest_s - rest_cpu_s,
            "bytes_h2d": stats["bytes_h2d"] - stats0["bytes_h2d"], "tokens": tokens}


def _beside_encryption(model, ids, config: dict, progress) -> float:
    """Seconds of the model's generate without offloading while one thread encrypts all
    its weights once per forward (AES-GCM calls of a chunk each, into a ring of the
    speculation depth, as a worker would): what sharing the machine with the encryption
    alone costs the model's own compute here."""
    import threading

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from pipellm.pipeline.pipeline import DEFAULT_CHUNK_SIZE as chunk, DEFAULT_DEPTH_BYTES
    views = [memoryview(p.detach().numpy()).cast("B") for p in model.parameters()]
    # into a ring as large as the pipeline's speculation depth, as a worker's slots are
    ring = memoryview(bytearray(DEFAULT_DEPTH_BYTES + 16))
    aead, nonce = AESGCM(bytes(32)), bytes(12)  # (throw-away key: nothing is sent)
    forwards, stop = threading.Semaphore(0), threading.Event()

    def encrypt() -> None:
        while True:
            forwards.acquire()
            if stop.is_set():
                return
            at = 0
            for view in views:
                for start in range(0, len(view), chunk):
                    part = view[start:start + chunk]
                    at = 0 if at + len(part) > DEFAULT_DEPTH_BYTES else at
                    aead.encrypt_into(nonce, part, None, ring[at:at + len(part) + 16])
                    at += len(part)

    worker = threading.Thread(target=encrypt, daemon=True)
    worker.start()
    handle = model.register_forward_pre_hook(lambda *_: forwards.release())
    try:
        start = perf_counter()
        _generate(model, ids, config["new_tokens"], progress)
        return perf_counter() - start
    finally:
        handle.remove()
        stop.set()
        forwards.release()
        worker.join()


def points(quick: bool = False, repeats: int = 1) -> int:
    config = QUICK if quick else FULL
    return (2 + repeats * len(MODES)) * config["new_tokens"] + repeats * len(MODES) * WARMUP_TOKENS


def run(quick: bool = False, repeats: int = 1, family: str = "opt", adaptive: bool = True,
        options: dict | None = None, progress=lambda n=1: None) -> dict:
    """The demo's runs: each mode ``repeats`` times (interleaved; the median run counts),
    after one run without offloading that gives the reference tokens. ``adaptive``:
    pipellm's controller (False: speculation always on); ``options``: more of pipellm's
    :class:`~pipellm.Pipeline` options."""
    import torch
    from pipellm.integrations.models import build

    config = dict(QUICK if quick else FULL)
    split = _split_cores()
    threads = torch.get_num_threads()
    torch.set_num_threads(split["torch_threads"])
    try:
        reference = build(family, config["size"])
        params = sum(p.numel() for p in reference.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        ids = _prompt(config, reference.config.vocab_size)
        start = perf_counter()
        expected = _generate(reference, ids, config["new_tokens"], progress)
        resident_s = perf_counter() - start
        beside_s = _beside_encryption(reference, ids, config, progress)
        del reference
        runs = {m: [] for m in MODES}
        for _ in range(repeats):
            for mode in MODES:
                runs[mode].append(_run_mode(mode, config, family, split, ids, progress, adaptive, options))
    finally:
        torch.set_num_threads(threads)
    new = config["batch"] * config["new_tokens"]
    rows = []
    for mode in MODES:
        by_time = sorted(runs[mode], key=lambda r: r["time_s"])
        row = by_time[len(by_time) // 2]
        row["identical_tokens"] = all(bool(torch.equal(r.pop("tokens"), expected)) for r in runs[mode])
        row["runs_time_s"] = [r["time_s"] for r in runs[mode]]
        rows.append(row)
    plain = rows[0]["time_s"]
    cc = rows[1]["time_s"]
    for row in rows:
        row["overhead_vs_plain"] = row["time_s"] / plain - 1
        # the share of cc's extra time that the mode does not pay
        row["encryption_hidden"] = 1 - (row["time_s"] - plain) / (cc - plain) if cc > plain else None
    return {"config": {**config, "family": family, "parameters": params, "weight_bytes": weight_bytes,
                       "repeats": repeats, "adaptive": adaptive, "pipeline_options": options or {}, **split},
            "resident": {"time_s": resident_s, "tokens_per_s": new / resident_s,
                         "beside_encryption_s": beside_s, "beside_encryption_tokens_per_s": new / beside_s},
            "rows": rows}


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"pipellm demo{'' if c.get('adaptive', True) else ' (pipellm: speculation always on)'}: {c['family'].upper()} model ({c['parameters'] / 1e6:.1f} M parameters, "
             f"{c['weight_bytes'] / 1e6:.0f} MB of weights) generating {c['new_tokens']} tokens for "
             f"{c['batch']} prompts of {c['prompt']}, every weight offloaded with accelerate's hooks "
             f"through each mode on the emulated device",
             f"cores: {c['cores']}; the model: {c['torch_threads']} torch thread in every mode; pipellm: "
             f"{c['workers']} encryption worker(s)"
             + "".join(f", {k}={v}" for k, v in c.get("pipeline_options", {}).items())
             + "; the emulated copy engine: 1 thread",
             "time: modelled (wall minus emulation stall: the emulated copy engine's CPU work beyond its "
             f"link model), after {WARMUP_TOKENS} untimed tokens; the model's compute is real CPU time" +
             (f"; median of {c['repeats']} runs" if c["repeats"] > 1 else ""),
             "loads s: the model waiting for its weights (modelled); rest s: everything else (its compute), "
             "of which off CPU: the model's thread not running (waiting for the GIL or a core)",
             f"{'mode':8} {'tokens/s':>9} {'vs plain':>9} {'hit rate':>9} {'enc. hidden':>12} {'identical':>10} "
             f"{'time s':>8} {'loads s':>8} {'rest s':>8} {'off CPU':>8} {'wall s':>8}"]
    for r in result["rows"]:
        hidden = "-" if r["encryption_hidden"] is None or r["mode"] == "plain" else f"{r['encryption_hidden']:.0%}"
        lines.append(f"{r['mode']:8} {r['tokens_per_s']:9.1f} {r['overhead_vs_plain']:+9.1%} {r['hit_rate']:9.3f} "
                     f"{hidden:>12} {str(r['identical_tokens']):>10} {r['time_s']:8.2f} {r['load_s']:8.2f} "
                     f"{r['rest_s']:8.2f} {r['rest_off_cpu_s']:8.2f} {r['wall_s']:8.2f}")
    resident = result["resident"]
    lines.append(f"without offloading: {resident['tokens_per_s']:.1f} tokens/s (the weights resident); "
                 f"{resident['beside_encryption_tokens_per_s']:.1f} tokens/s while one thread encrypts all the "
                 f"weights once per forward beside the model (what sharing this machine with the encryption "
                 f"costs the model's compute)")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar([r["mode"] for r in rows], [r["tokens_per_s"] for r in rows],
                  color=["tab:gray", "tab:red", "tab:blue"])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['overhead_vs_plain']:+.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(result["resident"]["tokens_per_s"], color="black", linestyle="--", linewidth=0.8,
               label="without offloading")
    ax.legend(fontsize=8, loc="upper right")
    c = result["config"]
    ax.set_ylabel("tokens/s (modelled time)")
    ax.set_title(f"{c['family'].upper()} {c['parameters'] / 1e6:.0f} M, offloaded weights, emulated device",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
