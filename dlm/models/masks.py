"""Attention masks as data: a small frozen spec read by the reference attention and kernels.

A `MaskSpec` says which keys each query may attend to. Positions are absolute: query row `i`
sits at position `q_offset + i` (the number of tokens already in a KV cache when decoding),
key column `j` at position `j`.

Kinds (b = block size):

- 'full':         every query sees every key.
- 'causal':       query at p sees keys j <= p.
- 'block_causal': query at p sees keys j with p // b >= j // b (bidirectional inside a block,
                  causal across blocks).
- 'bd3lm':        BD3-LM's two-stream training mask over x_t ⊕ x_0, total length 2L:
                  x_t -> x_t block-diagonal, x_t -> x_0 offset block-causal (query block
                  strictly after key block), x_0 -> x_0 block-causal, x_0 -> x_t nothing.
"""

import dataclasses
from typing import Any

import numpy as np

KINDS = ("full", "causal", "block_causal", "bd3lm")
_BLOCK_KINDS = ("block_causal", "bd3lm")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to; hashable, so it can be a static jit argument."""

    kind: str
    block_size: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(self.block_size, int | np.integer):
            raise ValueError(f"mask block_size must be an int, got {self.block_size!r}")
        object.__setattr__(self, "block_size", int(self.block_size))  # np ints -> one hash
        if self.kind in _BLOCK_KINDS and self.block_size < 1:
            raise ValueError(
                f"mask kind {self.kind!r} needs block_size >= 1, got {self.block_size}")
        if self.kind not in _BLOCK_KINDS and self.block_size != 0:
            raise ValueError(f"mask kind {self.kind!r} takes no block_size, got {self.block_size}")

    @classmethod
    def full(cls) -> "MaskSpec":
        return cls("full")

    @classmethod
    def causal(cls) -> "MaskSpec":
        return cls("causal")

    @classmethod
    def block_causal(cls, block_size: int) -> "MaskSpec":
        return cls("block_causal", block_size)

    @classmethod
    def bd3lm(cls, block_size: int) -> "MaskSpec":
        return cls("bd3lm", block_size)

    @classmethod
    def parse(cls, text: str) -> "MaskSpec":
        """Reads 'full', 'causal', 'block_causal:16' or 'bd3lm:16' (the inverse of `str`)."""
        kind, _, size = text.partition(":")
        try:
            return cls(kind, int(size)) if size else cls(kind)
        except ValueError as e:
            raise ValueError(f"cannot parse mask {text!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.block_size}" if self.kind in _BLOCK_KINDS else self.kind

    def check_lengths(self, q_len: int, kv_len: int, q_offset: int | None = 0) -> None:
        """Raises ValueError if the mask is not defined for these lengths.

        `q_offset=None` means the offset is only known at run time (a traced cache length)
        and is not checked.
        """
        b = self.block_size
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"mask lengths must be >= 1, got q_len={q_len}, kv_len={kv_len}")
        if q_offset is not None and q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        if self.kind == "block_causal":
            if q_len % b or kv_len % b or (q_offset or 0) % b:
                raise ValueError(
                    f"block_causal mask with block_size {b} needs q_len, kv_len and q_offset "
                    f"divisible by it, got q_len={q_len}, kv_len={kv_len}, q_offset={q_offset}"
                )
        elif self.kind == "bd3lm":
            if q_len != kv_len or kv_len % (2 * b):
                raise ValueError(
                    f"bd3lm mask over x_t ⊕ x_0 needs q_len == kv_len == 2L with L divisible by "
                    f"block_size {b}, got q_len={q_len}, kv_len={kv_len}"
                )
            if q_offset:
                raise ValueError(
                    f"bd3lm mask is a training mask: q_offset must be 0, got {q_offset}")

    def allows(self, q_pos: Any, k_pos: Any, kv_len: int) -> Any:
        """Elementwise predicate: may the query at absolute position q_pos see key k_pos?

        Works on numpy or jax.numpy integer arrays (broadcasting), so a traced q_offset can use
        the same definition as `dense`. Returns a bool array of the broadcast shape.
        """
        b = self.block_size
        if self.kind == "full":
            return (q_pos >= 0) & (k_pos >= 0)  # every pair; written so numpy and jnp both work
        if self.kind == "causal":
            return k_pos <= q_pos
        if self.kind == "block_causal":
            return k_pos // b <= q_pos // b
        half = kv_len // 2
        q_clean, k_clean = q_pos >= half, k_pos >= half
        q_block, k_block = (q_pos % half) // b, (k_pos % half) // b
        noisy_to_noisy = ~q_clean & ~k_clean & (q_block == k_block)
        noisy_to_clean = ~q_clean & k_clean & (q_block > k_block)
        clean_to_clean = q_clean & k_clean & (q_block >= k_block)
        return noisy_to_noisy | noisy_to_clean | clean_to_clean

    def dense(self, q_len: int, kv_len: int, q_offset: int = 0) -> np.ndarray:
        """Returns the mask as a host numpy bool array [q_len, kv_len]; True = may attend."""
        self.check_lengths(q_len, kv_len, q_offset)
        q_pos = q_offset + np.arange(q_len)[:, None]
        k_pos = np.arange(kv_len)[None, :]
        return np.broadcast_to(self.allows(q_pos, k_pos, kv_len), (q_len, kv_len)).copy()


def as_mask_spec(value: "MaskSpec | str") -> MaskSpec:
    """Returns `value` as a MaskSpec, parsing strings such as 'block_causal:16'."""
    if isinstance(value, MaskSpec):
        return value
    if isinstance(value, str):
        return MaskSpec.parse(value)
    raise ValueError(f"expected a MaskSpec or a mask string, got {value!r}")
