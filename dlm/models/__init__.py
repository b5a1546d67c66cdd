"""Pure Flax modules: masks, attention, layers, the DiT denoiser and the causal transformer."""

from dlm.models.attention import attend
from dlm.models.dit import DiT
from dlm.models.kv_cache import KVCache
from dlm.models.masks import MaskSpec
from dlm.models.registry import (
    MODELS,
    SIZES,
    attention_flops,
    build_model,
    model_config,
    param_count,
)
from dlm.models.transformer import Transformer

__all__ = [
    "MODELS",
    "SIZES",
    "DiT",
    "KVCache",
    "MaskSpec",
    "Transformer",
    "attend",
    "attention_flops",
    "build_model",
    "model_config",
    "param_count",
]
