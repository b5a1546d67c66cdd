"""Checks a run's ConfigDict once at start; every error names the key and what is allowed."""

from __future__ import annotations

import ml_collections

from dlm.data import builders, packing, sft, tokenizers
from dlm.diffusion import process as process_lib
from dlm.diffusion import schedules
from dlm.training import optimizer as optimizer_lib


def _choices() -> dict[str, tuple[str, ...]]:
    """Keys whose allowed values come from the registry (or table) that owns them; read on
    each call, so a process or model registered after import (a test's toy) is allowed."""
    return {
        "data.name": tuple(builders.BUILDERS),
        "data.tokenizer": tokenizers.TOKENIZER_KINDS,
        "data.packing": tuple(packing.PACKERS),
        "data.fill": sft.FILLS,
        "data.too_long": sft.TOO_LONG,
        "process.name": process_lib.PROCESSES.names(),
        "process.schedule": schedules.SCHEDULES.names(),
        "optimizer.schedule": optimizer_lib.SCHEDULES,
    }


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
    """Raises ValueError naming the first bad key, its value and the allowed values.

    The process's own keys are checked by its class (`Process.check_config`, then
    `from_config` when the run is built), the model's by their owner when the network is
    built (`dlm.models.build_model`): each key is checked once, where it is used.
    """
    for key, allowed in _choices().items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not one of {list(allowed)}")
    process_class = process_lib.PROCESSES.get(config.process.name)
    for key in _POSITIVE_INTS:
        value = _get(config, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")
    if config.data.seq_len < 2:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} must be at least 2")
    if config.model.name not in process_class.models:
        raise ValueError(f"config.process.name={config.process.name!r} needs "
                         f"config.model.name in {list(process_class.models)}, got "
                         f"{config.model.name!r}")
    process_class.check_config(config)
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
