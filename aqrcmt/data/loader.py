"""DataLoaders of a split: the dataset built from a config (index, augmentations, GT paste) and a loader whose
epoch pins the sampler's order, the dataset's epoch and the worker seeds."""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from aqrcmt.config import Config, ConfigError, DataConfig
from aqrcmt.data.collate import collate
from aqrcmt.data.dataset import NuScenesDataset
from aqrcmt.data.gt_database import default_database
from aqrcmt.data.gt_paste import GTPaster
from aqrcmt.data.index import load_info_pkl, load_or_build_infos
from aqrcmt.data.sampler import ShardedSampler
from aqrcmt.data.transforms import Pipeline


def _split_infos(data: DataConfig, split: str) -> list[dict]:
    pkl = data.info_pkl_train if split == data.train_split else data.info_pkl_val if split == data.val_split \
        else None
    if pkl:
        return load_info_pkl(pkl)
    return load_or_build_infos(data.root, data.version, split, data.sweeps, data.index_cache_dir)[0]


def build_dataset(cfg: Config, split: str, train: bool, samples: Optional[Collection[str]] = None) -> NuScenesDataset:
    """The dataset of `split`: an official split, a custom split of the root's splits.json (see
    :mod:`aqrcmt.data.splits`), or cfg.data.train_split/val_split read from its info pkl; only the samples whose
    tokens are in `samples` when given (e.g. a condition's: :func:`aqrcmt.data.splits.sample_tokens_of_split`).

    Training applies cfg.data.augment (GT paste when augment.gt_paste, from augment.gt_paste_database).
    Images are produced at cfg.model.camera.image_size; points are cut to the model's voxel range.
    """
    data = cfg.data
    paste = None
    if train and data.augment.enabled and data.augment.gt_paste:
        database = Path(data.augment.gt_paste_database or default_database(data.root))
        if not database.is_file():
            raise ConfigError(f"data.augment.gt_paste: no GT database at {database}; build it with `aqrcmt "
                              f"build-gt-database --config {cfg.name or 'CONFIG'} --root {data.root} --version "
                              f"{data.version}` (or pass --set data.augment.gt_paste=false)")
        paste = GTPaster(database)
    pipeline = Pipeline(data.augment, cfg.model.lidar.voxel.point_cloud_range, cfg.model.camera.image_size,
                        train=train, paste=paste)
    infos = _split_infos(data, split)
    if samples is not None:
        infos = [info for info in infos if info["token"] in samples]
    return NuScenesDataset(infos, data.root, pipeline, sweeps=data.sweeps,
                           load_images=data.load_images, train=train, on_bad_sample=data.on_bad_sample,
                           gt_paste_until_epoch=data.augment.gt_paste_until_epoch)


class EpochDataLoader(DataLoader):
    """A DataLoader whose :meth:`set_epoch` pins everything an epoch's batches depend on.

    seed, process_index: of the run and of this process (they seed the worker generator per epoch).
    """

    def __init__(self, *args: Any, seed: int, process_index: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.process_index = process_index

    def set_epoch(self, epoch: int) -> None:
        """The sampler's order, the dataset's epoch (GT paste fade-out) and the worker seeds of `epoch`.

        They depend only on (seed, epoch, process), so a resumed run sees the same batches as an
        uninterrupted one.
        """
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.generator.manual_seed(int(np.random.SeedSequence([self.seed, self.process_index, epoch])
                                       .generate_state(1)[0]))


def build_dataloader(cfg: Config, split: str, train: bool, *, num_processes: int = 1, process_index: int = 0,
                     seed: int = 0, samples: Optional[Collection[str]] = None) -> EpochDataLoader:
    """A DataLoader of Batches for this process's shard of `split` (of its `samples` only, when given).

    Training: shuffled every epoch (CBGS resampling when cfg.data.cbgs), shards padded to equal length.
    Evaluation: in index order, process p gets samples p, p + P, ... (shards may differ by one sample).
    The sampler advances its epoch on every pass; ``loader.set_epoch(e)`` pins it (and the dataset's epoch
    and the worker seeds).
    """
    dataset = build_dataset(cfg, split, train, samples)
    sampler = ShardedSampler(len(dataset), shuffle=train, class_sets=dataset.class_sets() if train and cfg.data.cbgs
                             else None, num_processes=num_processes, process_index=process_index, seed=seed,
                             pad=train)
    generator = torch.Generator().manual_seed(seed * 1000 + process_index)   # worker seeds -> augmentation draws
    return EpochDataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=cfg.data.num_workers, drop_last=train, persistent_workers=False,
                           pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), generator=generator,
                           seed=seed, process_index=process_index)
