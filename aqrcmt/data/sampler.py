"""Which sample indices each process reads per epoch: class-balanced grouping (CBGS) and process shards.

CBGS (Zhu et al. 2019, mmdet3d CBGSDataset): with n_c the number of samples that contain class c and
N = sum_c n_c, class c contributes ``int(n_c * (1/C) / (n_c / N))`` draws with replacement from its samples,
so every class ends up in about N/C drawn samples. Classes absent from the split contribute nothing. The
draws are repeated every epoch (mmdet3d draws once); the epoch length is the same every time.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from aqrcmt.data.files import DatasetError


def _samples_by_class(class_sets: Sequence[set[int]]) -> list[list[int]]:
    """For each class present in some sample (ascending class index), the indices of its samples."""
    by_class: dict[int, list[int]] = {}
    for index, classes in enumerate(class_sets):
        for c in classes:
            by_class.setdefault(c, []).append(index)
    if not by_class:
        raise DatasetError("CBGS needs samples with GT boxes; no sample of this split has any")
    return [by_class[c] for c in sorted(by_class)]


def _draws_per_class(samples_per_class: list[int]) -> list[int]:
    """int(n_c * (1 / C) / (n_c / N)) for each class c (the CBGS formula)."""
    total, fraction = sum(samples_per_class), 1.0 / len(samples_per_class)
    return [int(n * fraction / (n / total)) for n in samples_per_class]


def cbgs_indices(class_sets: Sequence[set[int]], rng: np.random.Generator) -> np.ndarray:
    """(M,) int64 resampled indices; class_sets[i] = class indices present in sample i."""
    by_class = _samples_by_class(class_sets)
    draws = _draws_per_class([len(v) for v in by_class])
    return np.concatenate([rng.choice(v, k) for v, k in zip(by_class, draws)]).astype(np.int64)


def cbgs_length(class_sets: Sequence[set[int]]) -> int:
    """Number of indices :func:`cbgs_indices` returns (it does not depend on the random draws)."""
    return sum(_draws_per_class([len(v) for v in _samples_by_class(class_sets)]))


class ShardedSampler(Sampler[int]):
    """This process's indices of an epoch.

    num_samples: dataset length; shuffle: a new permutation per epoch (seeded by seed + epoch, identical on
    every process); class_sets: per-sample class sets to resample with CBGS first (None: no CBGS);
    pad: repeat indices from the front so every process gets the same count (training with DDP); without it
    process p gets every P-th index starting at p. The epoch advances by one after every full pass unless
    :meth:`set_epoch` pins it.
    """

    def __init__(self, num_samples: int, *, shuffle: bool, class_sets: Optional[Sequence[set[int]]] = None,
                 num_processes: int = 1, process_index: int = 0, seed: int = 0, pad: bool = False) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, num_processes={num_processes})")
        if class_sets is not None and len(class_sets) != num_samples:
            raise ValueError(f"class_sets has {len(class_sets)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.class_sets = class_sets
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self._epoch_length = cbgs_length(class_sets) if class_sets is not None else num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self._epoch_length / self.num_processes)
        return len(range(self.process_index, self._epoch_length, self.num_processes))

    def epoch_indices(self) -> np.ndarray:
        """All processes' indices of the current epoch, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = cbgs_indices(self.class_sets, rng) if self.class_sets is not None else np.arange(self.num_samples)
        if self.shuffle:
            indices = indices[rng.permutation(len(indices))]
        if self.pad:
            total = math.ceil(len(indices) / self.num_processes) * self.num_processes
            indices = np.resize(indices, total)   # repeats from the front
        return indices

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()[self.process_index::self.num_processes]
        self.epoch += 1
        return iter(indices.tolist())
