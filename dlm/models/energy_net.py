"""EDLM's energy network: a DiT that reads x_t and a candidate x_0 and returns one scalar.

E(x_0, x_t, t) is low where x_0 is a likely completion of x_t. The network is MDLM's DiT
with two changes: its input at each position is a projection of the two embeddings
concatenated, [embed(x_t), embed(x_0)] -> hidden, and its head pools the last hidden states
(mean over positions) into one number instead of projecting to the vocabulary. Every other
parameter has the DiT's name, so `--config.init_from` copies a trained MDLM denoiser into
it (`dlm.training.experiment.merge_params`): only `fuse` and `energy_head` start fresh.

At initialisation `fuse` adds the two embeddings (its kernel is [I; I]), so the pretrained
blocks see the MDLM's input plus the candidate, and the last layer of the head is zero, so
E = 0 for every input: NCE's loss starts at exactly log 4.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlm.models.dit import DiT
from dlm.models.layers import Dense, LayerNorm
from dlm.models.masks import as_mask_spec


def _stacked_identity(key, shape, dtype=jnp.float32):
    """[2D, D] kernel [I; I]: the sum of the two halves of its input."""
    del key
    two_d, d = shape
    return jnp.concatenate([jnp.eye(d, dtype=dtype)] * (two_d // d), axis=0)


class EnergyNet(DiT):
    """E(x_0, x_t, t) -> float32 [B]; `__call__(x0_BL, t_B, train=..., xt_BL=...)`."""

    conditioned: ClassVar[bool] = True

    def setup(self):
        super().setup()
        hidden = self.config.hidden
        self.fuse = Dense(hidden, kernel_init=_stacked_identity, name="fuse")
        self.energy_norm = LayerNorm(name="energy_norm")
        self.energy_hidden = Dense(hidden, use_bias=True, name="energy_hidden")
        self.energy_out = Dense(1, kernel_init=nn.initializers.zeros, name="energy_out")

    def __call__(self, x0_BL: jax.Array, t_B: jax.Array | None = None, *, train: bool = False,
                 xt_BL: jax.Array | None = None) -> jax.Array:
        """The energy of each candidate `x0_BL` given `xt_BL` (default: x0 itself) at `t_B`.

        Both are int32 [B, L]; returns float32 [B].
        """
        xt_BL = x0_BL if xt_BL is None else xt_BL
        if xt_BL.shape != x0_BL.shape:
            raise ValueError(f"x_t has shape {xt_BL.shape} but x_0 has {x0_BL.shape}")
        mask = as_mask_spec(self.config.mask)
        c_BC = self._condition(t_B, x0_BL.shape[0])
        x_BLD = self.fuse(jnp.concatenate([self.embed(xt_BL).astype(jnp.float32),
                                           self.embed(x0_BL).astype(jnp.float32)], axis=-1))
        positions = jnp.arange(x0_BL.shape[1])
        for block in self.blocks:
            x_BLD, _ = block(x_BLD, c_BC, positions, mask, train=train)
        pooled_BD = jnp.mean(self.energy_norm(x_BLD), axis=1)
        h_BD = nn.gelu(self.energy_hidden(pooled_BD), approximate=True)
        return self.energy_out(h_BD)[:, 0].astype(jnp.float32)
