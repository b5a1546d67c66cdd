"""Pallas block-sparse flash attention for the mask specs of `dlm.models.masks`."""

from pallas_kernels.api import TileVisits, block_sparse_attention, tile_visits
from pallas_kernels.config import BACKENDS, BlockSizes
from pallas_kernels.tiles import EMPTY, FULL, PARTIAL, TilePlan, make_plan

__all__ = [
    "BACKENDS",
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockSizes",
    "TilePlan",
    "TileVisits",
    "block_sparse_attention",
    "make_plan",
    "tile_visits",
]
