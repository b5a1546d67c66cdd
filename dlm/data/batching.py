"""Global batches split by process, as grain datasets with checkpointable iterators.

Global batch b holds the packed sequences ``b * G .. (b + 1) * G - 1`` of the (shuffled)
order, and process p reads only the contiguous rows ``[p * G / P, (p + 1) * G / P)``, so a
global batch is the same whatever the number of processes. The iterator of the returned
dataset is a grain ``DatasetIterator``: ``get_state`` / ``set_state`` save and restore its
position exactly.
"""

from __future__ import annotations

import grain
import jax


class _ProcessRows(grain.MapDataset):
    """Element j of process p is row ``p * B + j % B`` of global batch ``j // B``."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._per_process = global_batch // process_count
        self._global, self._offset = global_batch, process_index * self._per_process
        self._len = len(parent) // global_batch * self._per_process

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"ProcessRows(offset={self._offset}, rows={self._per_process})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._per_process)
        return self._parent[batch * self._global + self._offset + row]


def check_batch_size(batch_size: int, key: str, num_devices: int | None = None) -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over all devices."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    if batch_size < 1 or batch_size % num_devices:
        raise ValueError(f"{key}={batch_size} is not divisible by the number of devices "
                         f"({num_devices}); pick a multiple of {num_devices}")


def process_batches(source, global_batch: int, key: str, split: str, *, shuffle_seed=None,
                    repeat: bool, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """Returns this process's batches of a random-access ``source`` as a grain MapDataset.

    Elements are dicts of arrays [G / P, ...]. With ``shuffle_seed`` every epoch is shuffled
    differently (and deterministically); with ``repeat`` the dataset is endless; otherwise
    the tail that does not fill a global batch is left out. ``key`` names the config key of
    ``global_batch`` and ``split`` the split, for error messages.
    """
    check_batch_size(global_batch, key)
    if len(source) < global_batch:
        raise ValueError(f"split {split!r} has {len(source)} sequences, fewer than one batch "
                         f"({key}={global_batch}); lower {key} or data.seq_len")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
        ds = ds.repeat()
    ds = _ProcessRows(ds, global_batch, process_index, process_count)
    return ds.batch(global_batch // process_count, drop_remainder=True)
