"""Static kernel configuration: tile sizes, backend choice and the hashable per-call config."""

import dataclasses

import jax

from dlm.models.masks import MaskSpec

BACKENDS = ("auto", "gpu", "tpu", "interpret", "tpu_interpret")

# Per-backend default tiles (block_q, block_kv, block_q_bwd, block_kv_bwd), untuned: Triton
# keeps the backward tiles smaller (register pressure of the dk/dv accumulators); Mosaic TPU
# wants 128-multiples for the MXU and lanes; interpret mode only needs small, correct tiles.
_DEFAULT_TILES = {
    "gpu": (128, 64, 64, 64),
    "tpu": (128, 128, 128, 128),
    "interpret": (16, 16, 16, 16),
    "tpu_interpret": (16, 16, 16, 16),
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query and key axes, for the forward and the two backward kernels.

    A size larger than the (padded) sequence is clipped to it. `None` backward sizes reuse
    the forward ones.
    """

    block_q: int = 64
    block_kv: int = 64
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    @classmethod
    def default(cls, backend: str) -> "BlockSizes":
        return cls(*_DEFAULT_TILES[backend])

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


def resolve_backend(backend: str) -> str:
    """Maps 'auto' onto the default platform: 'gpu', 'tpu', or 'interpret' (CPU and others)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown pallas backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "interpret"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one attention call; hashable (a custom_vjp nondiff argument).

    `q_len`/`kv_len` are the real lengths, `q_padded`/`kv_padded` the lengths the kernels
    see (multiples of every tile). `grid_driver` selects the TPU-style pipelined grid over
    compacted lists (scalar prefetch) instead of the in-kernel loop used on GPU.
    """

    mask: MaskSpec
    q_len: int
    kv_len: int
    q_padded: int
    kv_padded: int
    q_offset: int
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    sm_scale: float
    backend: str
    has_segments: bool
    debug: bool = False
    num_warps: int = 4
    num_stages: int = 2

    @property
    def interpret(self) -> bool:
        return self.backend in ("interpret", "tpu_interpret")

    @property
    def grid_driver(self) -> bool:
        return self.backend in ("tpu", "tpu_interpret")

    @property
    def lanes(self) -> int:
        """Minor-dim width of per-row vectors (lse, segment ids): lane-dense on TPU."""
        return 128 if self.grid_driver else 1

    @property
    def sublanes(self) -> int:
        """Second-minor width of per-column vectors on TPU (8 sublanes), else 1."""
        return 8 if self.grid_driver else 1


def compiler_params(cfg: KernelConfig, dimension_semantics: tuple[str, ...]):
    """Backend compiler parameters: Triton's on GPU (selected explicitly, since JAX 0.10
    lowers a bare `pallas_call` to Mosaic GPU), Mosaic TPU's on TPU, none when interpreted."""
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
    return None


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """An output shape for `pallas_call` that varies over the mesh axes its operands vary
    over, as `jax.shard_map(check_vma=True)` requires (empty outside shard_map)."""
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
