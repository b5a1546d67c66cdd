"""Importing weights in the layout of the public PyTorch MDLM denoiser (its `DIT`), numpy only.

MDLM's DIT and dlm's DiT compute the same function up to these differences, each handled:

- q, k and v are one fused `blocks.N.attn_qkv.weight` [3D, D] ((three, heads, head_dim) rows),
  split into dlm's `attn.q` / `attn.k` / `attn.v`;
- its MLP (`blocks.N.mlp.0`, `blocks.N.mlp.2`) and output projection (`output_layer.linear`)
  carry biases that dlm's layers do not have: they are accepted only when they are all zero
  (then the map is exact), else a ValueError names the first non-zero one;
- the number of heads is not a parameter: it is read from the length of the
  `rotary_emb.inv_freq` buffer (head_dim / 2), whose values must be dlm's RoPE frequencies,
  or given as `heads`;
- a time-conditioned MDLM feeds sigma(t) (the total noise) to its `sigma_map`, dlm feeds t,
  so only MDLM's default (time_conditioning off: the map reads 0 in both) maps exactly.

Everything else (weight-only LayerNorms with eps 1e-5, rotate-half RoPE with base 10000,
adaLN-zero with a bias, the sinusoidal time features [cos | sin] of width 256 and their
two-layer SiLU MLP, c = silu(sigma_map(.)), tanh GELU, the mask token as the last id) is the
same. Lightning checkpoints prefix names with `backbone.`; that prefix is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from dlm.export import layout

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {  # MDLM name inside a block -> dlm export name inside a block
    "norm1.weight": "norm1.weight",
    "attn_out.weight": "attn.out.weight",
    "norm2.weight": "norm2.weight",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.2.weight": "mlp.fc2.weight",
    "adaLN_modulation.weight": "adaln.weight",
    "adaLN_modulation.bias": "adaln.bias",
}
_BLOCK_ZERO = ("mlp.0.bias", "mlp.2.bias")
_GLOBAL_NAMES = {
    "vocab_embed.embedding": "embed.weight",
    "sigma_map.mlp.0.weight": "time_embed.fc1.weight",
    "sigma_map.mlp.0.bias": "time_embed.fc1.bias",
    "sigma_map.mlp.2.weight": "time_embed.fc2.weight",
    "sigma_map.mlp.2.bias": "time_embed.fc2.bias",
    "output_layer.norm_final.weight": "final.norm.weight",
    "output_layer.linear.weight": "final.out.weight",
    "output_layer.adaLN_modulation.weight": "final.adaln.weight",
    "output_layer.adaLN_modulation.bias": "final.adaln.bias",
}
_GLOBAL_ZERO = ("output_layer.linear.bias",)
_INV_FREQ = "rotary_emb.inv_freq"


def from_state_dict(state: Mapping[str, np.ndarray], *, heads: int | None = None,
                    time_conditioning: bool = False,
                    source: str = "the MDLM state dict") -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json "model" section, tensors under dlm's export names) of an MDLM DIT.

    `state` maps MDLM parameter names (optionally prefixed `backbone.`) to arrays (numpy, or
    anything `np.asarray` reads). Raises ValueError naming the parameter that has no dlm
    counterpart, is missing, has the wrong shape, or is a non-zero bias.
    """
    if time_conditioning:
        raise ValueError("a time-conditioned MDLM DIT reads sigma(t) where dlm's DiT reads t, so "
                         "it does not map onto dlm exactly; only time_conditioning=False does")
    state = {_strip(name): np.asarray(value, np.float32) for name, value in state.items()}
    if "vocab_embed.embedding" not in state:
        raise ValueError(f"{source} has no vocab_embed.embedding: not an MDLM DIT state dict "
                         f"(first names: {sorted(state)[:5]})")
    V, D = state["vocab_embed.embedding"].shape
    layers = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, state) if m), default=-1)
    heads = _heads(state, D, heads, source)
    for name in _GLOBAL_ZERO + tuple(f"blocks.{i}.{b}" for i in range(layers)
                                      for b in _BLOCK_ZERO):
        if name in state and np.any(state[name] != 0):
            raise ValueError(
                f"{source}: {name} is non-zero (max |b| = {np.abs(state[name]).max():.3g}); "
                "MDLM's MLP and output projections have biases but dlm's are bias-free, so this "
                "checkpoint has no exact dlm equivalent")
    tensors, used = {}, {_INV_FREQ} | set(_GLOBAL_ZERO)
    for theirs, ours in _GLOBAL_NAMES.items():
        if theirs in state:
            tensors[ours] = state[theirs]
            used.add(theirs)
    for i in range(layers):
        prefix = f"blocks.{i}."
        used.update(prefix + b for b in _BLOCK_ZERO)
        for theirs, ours in _BLOCK_NAMES.items():
            if prefix + theirs in state:
                tensors[prefix + ours] = state[prefix + theirs]
                used.add(prefix + theirs)
        qkv = state.get(prefix + "attn_qkv.weight")
        if qkv is not None:
            used.add(prefix + "attn_qkv.weight")
            if qkv.shape != (3 * D, D):
                raise ValueError(f"{source}: {prefix}attn_qkv.weight has shape {qkv.shape}, "
                                 f"expected {(3 * D, D)}")
            for part, rows in zip("qkv", np.split(qkv, 3, axis=0), strict=True):
                tensors[f"{prefix}attn.{part}.weight"] = rows
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"{source}: parameters with no dlm counterpart: {unknown[:6]}")
    fc1 = tensors.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] // D if fc1 is not None and fc1.shape[0] % D == 0 else 4
    cond = tensors.get("time_embed.fc2.weight")
    model = {
        "architecture": "dit", "hidden": int(D), "layers": int(layers), "heads": int(heads),
        "kv_heads": int(heads), "mlp_ratio": int(mlp_ratio),
        "cond_dim": int(cond.shape[0]) if cond is not None else 128,
        "vocab_size": int(V), "time_conditioning": False, "mask": "full",
        "norm_eps": layout.NORM_EPS, "rope_base": layout.ROPE_BASE,
        "time_frequency_dim": layout.TIME_FREQUENCY_DIM,
        "time_max_period": layout.TIME_MAX_PERIOD, "activation": "gelu_tanh",
        "dtype": "float32", "compute_dtype": "float32", "max_len": 1024,
    }
    layout.check_tensors(tensors, model, source)
    return model, tensors


def export_config(model: dict, *, seq_len: int = 1024, source: str = "") -> dict:
    """A config.json for imported MDLM weights (process 'mdlm', MDLM's default schedule)."""
    return {
        "format": layout.FORMAT, "version": layout.VERSION, "model": model,
        "process": {"name": "mdlm", "block_size": None, "schedule": "loglinear",
                    "schedule_eps": 1e-3, "t_min": 1e-3, "num_timesteps": 0},
        "tokenizer": None, "seq_len": int(seq_len),
        "source": {"imported_from": "mdlm", "path": source}, "dlm_config": None,
    }


def _strip(name: str) -> str:
    for prefix in ("backbone.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _heads(state: dict, hidden: int, heads: int | None, source: str) -> int:
    inv_freq = state.get(_INV_FREQ)
    if inv_freq is None:
        if heads is None:
            raise ValueError(f"{source} has no {_INV_FREQ} buffer to read the head count from; "
                             "pass heads=")
        if hidden % heads:
            raise ValueError(f"heads={heads} does not divide the hidden size {hidden}")
        return heads
    head_dim = 2 * inv_freq.shape[0]
    if hidden % head_dim:
        raise ValueError(f"{source}: {_INV_FREQ} has {inv_freq.shape[0]} frequencies, which "
                         f"gives a head dimension {head_dim} that does not divide {hidden}")
    found = hidden // head_dim
    if heads is not None and heads != found:
        raise ValueError(f"heads={heads} but {source}'s {_INV_FREQ} says {found} heads "
                         f"(head dimension {head_dim})")
    half = head_dim // 2
    ours = layout.ROPE_BASE ** (-np.arange(half, dtype=np.float64) / half)
    if not np.allclose(inv_freq, ours, rtol=1e-5):
        raise ValueError(f"{source}: {_INV_FREQ} is not RoPE with base {layout.ROPE_BASE:g} "
                         f"over head dimension {head_dim}")
    return found
