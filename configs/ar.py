"""Autoregressive baseline: `--config=configs/ar.py:SIZE`, SIZE in micro|tiny|small|medium."""

from configs import common


def get_config(arg: str | None = None):
    size = arg or "micro"
    config = common.base_config("ar", "transformer", size)
    return common.apply_variant(config, size)
