"""The MDLM denoiser: a diffusion transformer (DiT) with adaLN-zero conditioning and RoPE."""

from typing import ClassVar

from dlm.models.backbone import Backbone


class DiT(Backbone):
    """MDLM's denoiser. Returns raw float32 logits; the diffusion process applies SUBS.

    Conditioning: c = silu(MLP(sinusoidal(t))). Without `config.time_conditioning` (the
    default, as MDLM) t is replaced by 0, so c is a learned constant through the same path
    and the parameter tree is the same either way. At init every block is the identity and
    the logits are exactly 0. The mask is `config.mask` (default full).
    """

    conditioned: ClassVar[bool] = True
