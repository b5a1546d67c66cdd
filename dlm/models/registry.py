"""The model registry (`config.model.name`), named sizes, model-config checks and
construction."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dlm.models.dit import DiT
from dlm.models.energy_net import EnergyNet
from dlm.models.layers import MLPS, NORMS, ROPE_SCALINGS
from dlm.models.masks import MaskSpec, as_mask_spec
from dlm.models.transformer import Transformer
from dlm.registry import Registry

# hidden, layers, heads; micro is the CPU demo, the others follow MDLM. model.size 'custom'
# (an imported network) keeps the config's own hidden/layers/heads.
SIZES = {
    "micro": (128, 4, 4),
    "tiny": (512, 8, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
}
# `config.model.name` -> (the Flax module class, its default `model.mask`).
MODELS: Registry[tuple[type[nn.Module], str]] = Registry("config.model.name")
MODELS.register("dit", (DiT, str(MaskSpec.full())))
MODELS.register("transformer", (Transformer, str(MaskSpec.causal())))
MODELS.register("energy", (EnergyNet, str(MaskSpec.full())))
DTYPES = ("float32", "bfloat16")
# The options of the pretrained families; `model_config` holds dlm's own networks' values.
ARCH_KEYS = ("norm", "norm_eps", "mlp", "mlp_hidden", "mlp_bias", "head_bias", "head_dim",
             "qkv_bias", "rope_base", "rope_scaling", "rope_factor", "rope_original_len",
             "tie_embeddings", "shift_logits")
ATTENTION_IMPLS = ("xla", "pallas")


def model_config(size: str = "small", name: str = "dit") -> ml_collections.ConfigDict:
    """Returns the model ConfigDict for a named size and model (one of `MODELS`)."""
    _check_choice("model.size", size, SIZES)
    _, default_mask = MODELS.get(name)
    hidden, layers, heads = SIZES[size]
    return ml_collections.ConfigDict({
        "name": name,
        "size": size,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": heads,
        "mlp_ratio": 4,
        "cond_dim": 128,  # width of the DiT conditioning vector (MDLM's cond_dim)
        "dropout": 0.1,
        "time_conditioning": False,
        "max_len": 1024,  # informational: RoPE needs no table
        "dtype": "float32",  # compute dtype; parameters and logits stay float32
        "attention_impl": "xla",
        "mask": default_mask,
        # The options of the pretrained families (dlm/models/backbone.py); these defaults
        # are dlm's own networks.
        "norm": "layernorm",
        "norm_eps": 1e-5,
        "mlp": "gelu",
        "mlp_hidden": 0,  # 0: mlp_ratio * hidden
        "mlp_bias": False,  # biased MLP projections (the public MDLM / BD3-LM DiTs)
        "head_bias": False,  # a biased output projection (the same)
        "head_dim": 0,  # 0: hidden / heads
        "qkv_bias": False,
        "rope_base": 10000.0,
        "rope_scaling": "none",
        "rope_factor": 1.0,
        "rope_original_len": 0,  # 0: max_len
        "tie_embeddings": False,
        "shift_logits": False,
    })


def validate_model_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending `model.*` key and its allowed values."""
    MODELS.get(config.name)
    _check_choice("model.size", config.size, (*SIZES, "custom"))
    _check_choice("model.dtype", config.dtype, DTYPES)
    _check_choice("model.attention_impl", config.attention_impl, ATTENTION_IMPLS)
    for key in ("hidden", "layers", "heads", "kv_heads", "mlp_ratio", "cond_dim"):
        value = config.get(key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive int, got {value!r}")
    _check_choice("model.norm", config.get("norm", "layernorm"), NORMS)
    _check_choice("model.mlp", config.get("mlp", "gelu"), MLPS)
    _check_choice("model.rope_scaling", config.get("rope_scaling", "none"), ROPE_SCALINGS)
    for key in ("mlp_hidden", "head_dim", "rope_original_len"):
        value = config.get(key, 0)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"model.{key} must be an int >= 0 (0: its default), got {value!r}")
    for key in ("norm_eps", "rope_base", "rope_factor"):
        value = config.get(key, 1.0)
        if not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"model.{key} must be a positive number, got {value!r}")
    if config.get("rope_scaling", "none") != "none" and config.get("rope_factor", 1.0) < 1:
        raise ValueError(f"model.rope_factor must be >= 1 with model.rope_scaling "
                         f"{config.rope_scaling!r}, got {config.rope_factor}")
    head_dim = config.get("head_dim", 0)
    if not head_dim and config.hidden % config.heads:
        raise ValueError(f"model.hidden ({config.hidden}) must be divisible by model.heads "
                         f"({config.heads}), or set model.head_dim")
    head_dim = head_dim or config.hidden // config.heads
    if head_dim % 2:
        raise ValueError(f"the head width {head_dim} (model.head_dim, else model.hidden / "
                         "model.heads) must be even (RoPE rotates pairs)")
    if config.name != "transformer":
        for key in ("tie_embeddings", "shift_logits"):
            if config.get(key, False):
                raise ValueError(f"model.{key} applies to model.name 'transformer' (the "
                                 f"pretrained families' stack), not {config.name!r}")
    if config.heads % config.kv_heads:
        raise ValueError(f"model.kv_heads ({config.kv_heads}) must divide model.heads "
                         f"({config.heads})")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {config.dropout}")
    try:
        as_mask_spec(config.mask)
    except ValueError as e:
        raise ValueError(f"model.mask: {e}") from None


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> nn.Module:
    """The Flax module `config.name` names (one of `MODELS`), for a config that
    `validate_model_config` accepts (ValueError naming the key otherwise)."""
    validate_model_config(config)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    module_class, _ = MODELS.get(config.name)
    return module_class(config=ml_collections.FrozenConfigDict(config), vocab_size=vocab_size)


def init_params(module: nn.Module, seq_len: int, rng: jax.Array):
    """Fresh parameters of `module` (any of MODELS) for sequences of `seq_len` tokens."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    t = jnp.ones((1,), jnp.float32)
    return module.init({"params": rng}, tokens, t, train=False)["params"]


def attention_flops(config: ml_collections.ConfigDict, queries, keys):
    """The FLOPs of dense attention for `queries` query positions against `keys` key slots
    in every layer: QK^T and PV, 2 multiply-adds per query-key pair and head dimension."""
    head_dim = config.get("head_dim", 0) or config.hidden // config.heads
    return 4 * config.layers * config.heads * head_dim * queries * keys


def param_count(params) -> int:
    """Total number of parameters in a pytree of arrays or jax.ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _check_choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(allowed)}")
