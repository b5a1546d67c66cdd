"""Host-side block sparsity: which (query tile, key tile) pairs a mask spec leaves non-empty.

As in JAX's splash attention, each tile of the [q_len, kv_len] mask is classified on the host
from the `MaskSpec` predicate (the same one the reference attention and the kernels evaluate):

- EMPTY:   no real query may see any real key of the tile; the kernels never visit it.
- PARTIAL: some pairs are allowed; the kernels evaluate the mask elementwise.
- FULL:    every pair is allowed and the tile holds no padding key; no mask arithmetic.

The kernels read compacted per-row lists: for query tile i, the key tiles to visit, PARTIAL
ones first, then FULL ones. The transposed plan (rows = key tiles, listing query tiles) drives
the dk/dv kernel. Padded positions (lengths rounded up to the tile) count as follows: padded
keys are never allowed; padded queries are ignored when classifying (their rows are sliced
off by the caller).
"""

import dataclasses
import functools

import numpy as np

from dlm.models.masks import MaskSpec

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TileLists:
    """Compacted non-empty tiles per row, as int32 arrays the kernels read.

    Attributes:
      index_RM: [rows, max_steps] column tile indices, PARTIAL tiles first then FULL ones;
        entries past a row's count repeat its last index (0 for an empty row), so a
        pipelined TPU kernel that maps a skipped step to the same block issues no new copy.
      num_partial_R: [rows] how many leading entries are PARTIAL.
      num_total_R: [rows] how many entries are non-empty (PARTIAL + FULL).
    """

    index_RM: np.ndarray
    num_partial_R: np.ndarray
    num_total_R: np.ndarray

    @property
    def max_steps(self) -> int:
        return self.index_RM.shape[1]


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tile kinds of one (mask, lengths, tile sizes) and the row lists built from them.

    Attributes:
      kinds_QK: int8 [num_q_tiles, num_kv_tiles], EMPTY / PARTIAL / FULL.
      by_query: lists over key tiles for each query tile (forward and dq kernels).
      by_key: lists over query tiles for each key tile (dk/dv kernel).
    """

    kinds_QK: np.ndarray
    by_query: TileLists
    by_key: TileLists

    @property
    def num_nonempty(self) -> int:
        return int(np.count_nonzero(self.kinds_QK))


def classify_tiles(mask: MaskSpec, q_len: int, kv_len: int, q_padded: int, kv_padded: int,
                   block_q: int, block_kv: int, q_offset: int = 0) -> np.ndarray:
    """Returns int8 [q_padded // block_q, kv_padded // block_kv] of EMPTY/PARTIAL/FULL.

    `q_len`/`kv_len` are the real lengths, `q_padded`/`kv_padded` the kernel's (multiples of
    the tiles); a tile holding only padding is EMPTY. Works one query tile at a time, so
    memory is block_q x kv_padded.
    """
    mask.check_lengths(q_len, kv_len, q_offset)
    if q_padded % block_q or kv_padded % block_kv or q_padded < q_len or kv_padded < kv_len:
        raise ValueError(f"padded lengths ({q_padded}, {kv_padded}) must cover ({q_len}, "
                         f"{kv_len}) in whole tiles of ({block_q}, {block_kv})")
    num_q, num_kv = q_padded // block_q, kv_padded // block_kv
    k_pos = np.arange(kv_padded)[None, :]
    kinds = np.zeros((num_q, num_kv), np.int8)
    for i in range(num_q):
        rows = np.arange(i * block_q, min((i + 1) * block_q, q_len))
        if not len(rows):
            continue  # only padded queries: EMPTY
        allowed = np.broadcast_to(mask.allows(q_offset + rows[:, None], k_pos, kv_len),
                                  (len(rows), kv_padded))
        allowed = allowed & (k_pos < kv_len)
        per_tile = allowed.reshape(len(rows), num_kv, block_kv)
        any_allowed = per_tile.any(axis=(0, 2))
        all_allowed = per_tile.all(axis=(0, 2))
        kinds[i] = np.where(all_allowed, FULL, np.where(any_allowed, PARTIAL, EMPTY))
    return kinds


def row_lists(kinds_RC: np.ndarray) -> TileLists:
    """Compacts each row of a tile-kind matrix into PARTIAL-then-FULL column indices."""
    rows = kinds_RC.shape[0]
    per_row = [np.concatenate([np.flatnonzero(r == PARTIAL), np.flatnonzero(r == FULL)])
               for r in kinds_RC]
    max_steps = max(1, max(len(cols) for cols in per_row))
    index = np.zeros((rows, max_steps), np.int32)
    for r, cols in enumerate(per_row):
        if len(cols):
            index[r, :len(cols)] = cols
            index[r, len(cols):] = cols[-1]
    num_partial = np.count_nonzero(kinds_RC == PARTIAL, axis=1).astype(np.int32)
    num_total = np.count_nonzero(kinds_RC, axis=1).astype(np.int32)
    return TileLists(index, num_partial, num_total)


@functools.lru_cache(maxsize=256)
def make_plan(mask: MaskSpec, q_len: int, kv_len: int, q_padded: int, kv_padded: int,
              block_q: int, block_kv: int, q_offset: int = 0) -> TilePlan:
    """Returns the (cached) TilePlan; the arguments are static, hashable values."""
    kinds = classify_tiles(mask, q_len, kv_len, q_padded, kv_padded, block_q, block_kv,
                           q_offset)
    kinds.setflags(write=False)
    return TilePlan(kinds, row_lists(kinds), row_lists(kinds.T))
