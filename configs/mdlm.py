"""Masked diffusion (MDLM): `--config=configs/mdlm.py:SIZE`, SIZE in micro|tiny|small|medium.

`micro` is the CPU demo on the bundled Tiny Shakespeare; the larger sizes are MDLM's.
"""

from configs import common


def get_config(arg: str | None = None):
    size = arg or "micro"
    config = common.base_config("mdlm", "dit", size)
    return common.apply_variant(config, size)
