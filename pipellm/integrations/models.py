"""Real ``transformers`` models without downloads: OPT and a Llama-style model built from
their configs with seeded random weights.

The hub is out of reach here, and the weights' values do not change what a transfer
costs, so the integrations, tests and the demo use the real model classes at sizes from
CI's (under a megabyte) to the demo's (hundreds of MB). The same ``seed`` gives the same
weights, so a model built twice computes the same tokens.

>>> model = build("opt", "tiny")
>>> type(model).__name__, sum(p.numel() for p in model.parameters()) < 200_000
('OPTForCausalLM', True)
"""

from __future__ import annotations

from ..errors import ArgumentError

#: sizes by name: hidden width, layers, feed-forward width, attention heads, vocabulary
PRESETS = {
    "tiny": dict(hidden=64, layers=2, ffn=256, heads=4, vocab=512),       # CI: ~0.15 M parameters
    "small": dict(hidden=256, layers=4, ffn=1024, heads=8, vocab=4096),   # ~5 M (20 MB in float32)
    "demo": dict(hidden=1024, layers=8, ffn=4096, heads=16, vocab=16384),  # ~120 M (470 MB)
}
FAMILIES = ("opt", "llama")


def build(family: str = "opt", size: str | dict = "tiny", *, seed: int = 0, dtype=None):
    """A ``transformers`` causal LM of ``family`` (``"opt"`` or ``"llama"``) at ``size`` (a
    name in :data:`PRESETS`, or a dict with its keys), weights drawn with ``seed``, in
    evaluation mode, on the CPU, in ``dtype`` (float32 by default)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig
    except ImportError as exc:
        raise ImportError("pipellm.integrations.models needs PyTorch and transformers: "
                          "pip install 'pipellm[accelerate]'") from exc
    if family not in FAMILIES:
        raise ArgumentError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if isinstance(size, str):
        if size not in PRESETS:
            raise ArgumentError(f"unknown model size {size!r}; expected one of {', '.join(PRESETS)} or a dict")
        dims = PRESETS[size]
    elif isinstance(size, dict) and set(size) == set(PRESETS["tiny"]):
        dims = size
    else:
        raise ArgumentError(f"size must be one of {', '.join(PRESETS)} or a dict with keys "
                            f"{sorted(PRESETS['tiny'])}, got {size!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in dims.values()):
        raise ArgumentError(f"model dimensions must be positive ints, got {dims}")
    if dims["hidden"] % dims["heads"]:
        raise ArgumentError(f"hidden ({dims['hidden']}) must be a multiple of heads ({dims['heads']})")
    if family == "opt":
        config = OPTConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], word_embed_proj_dim=dims["hidden"],
                           num_hidden_layers=dims["layers"], ffn_dim=dims["ffn"],
                           num_attention_heads=dims["heads"], max_position_embeddings=512)
    else:
        config = LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
                             num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                             num_key_value_heads=dims["heads"], max_position_embeddings=512,
                             tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def block_class(model) -> str:
    """The class name of ``model``'s transformer block (accelerate's
    ``no_split_module_classes``): ``"OPTDecoderLayer"``, ``"LlamaDecoderLayer"``."""
    names = getattr(model, "_no_split_modules", None) or []
    if not names:
        raise ArgumentError(f"{type(model).__name__} names no blocks that must not be split")
    return sorted(names)[0]
