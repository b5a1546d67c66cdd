"""The causal (autoregressive) transformer: the same stack without conditioning."""

from typing import ClassVar

from dlm.models.backbone import Backbone


class Transformer(Backbone):
    """Causal language model (`config.mask` defaults to causal): logits at position i
    predict token i + 1. Accepts and ignores `t_B`, so every network shares one signature;
    `decode` appends tokens to a KV cache."""

    conditioned: ClassVar[bool] = False
