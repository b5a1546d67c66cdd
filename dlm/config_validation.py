"""Checks a run's ConfigDict once at start; every error names the key and what is allowed."""

from __future__ import annotations

import ml_collections

_CHOICES = {
    "data.name": ("tiny_shakespeare", "text_files", "text8_style", "text8", "lm1b", "openwebtext"),
    "data.tokenizer": ("char", "gpt2", "bpe"),
    "data.packing": ("wrap", "pad"),
    "model.name": ("dit", "transformer", "energy"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("xla", "pallas"),
    "process.name": ("mdlm", "bd3lm", "ar", "sdtt", "edlm_nce"),
    "process.schedule": ("loglinear", "linear", "cosine", "polynomial"),
    "optimizer.schedule": ("constant", "cosine"),
}
# The network each process needs (its attention mask is part of the network).
_PROCESS_MODEL = {"mdlm": "dit", "bd3lm": "dit", "ar": "transformer", "sdtt": "dit",
                  "edlm_nce": "energy"}

_POSITIVE_INTS = ("total_steps", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints", "max_consecutive_nonfinite", "data.seq_len",
                  "data.batch_size", "data.eval_batch_size", "optimizer.grad_accum_steps")


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            raise ValueError(f"config key {dotted!r} is missing")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad key, its value and the allowed values."""
    for key, allowed in _CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not one of {list(allowed)}")
    for key in _POSITIVE_INTS:
        value = _get(config, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")
    if config.data.seq_len < 2:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} must be at least 2")
    want = _PROCESS_MODEL[config.process.name]
    if config.model.name != want:
        raise ValueError(f"config.process.name={config.process.name!r} needs "
                         f"config.model.name={want!r}, got {config.model.name!r}")
    if config.process.name == "sdtt":
        from dlm.diffusion import distill  # lazy: keeps config checks light

        distill.check_config(config)
    accum = config.optimizer.grad_accum_steps
    if config.data.batch_size % accum:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                         f"config.optimizer.grad_accum_steps={accum}")
    for key in ("optimizer.ema_decay", "optimizer.b1", "optimizer.b2"):
        value = _get(config, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config.{key}={value!r} must lie in [0, 1)")
    if config.optimizer.learning_rate <= 0:
        raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate!r} "
                         "must be positive")
    if config.data.name in ("text_files", "text8_style") and not config.data.path:
        raise ValueError(f"config.data.path is empty; data.name={config.data.name!r} reads a "
                         "local text file or folder from it")
