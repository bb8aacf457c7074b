"""Cost of a corrupted evaluation per sample, against a clean one: what `aqrcmt evaluate --corruptions` adds.

One evaluated sample = load (6 JPEGs, sweeps), [corruption], test pipeline, collate, tiny-model predict on the
CPU, as the evaluation loop runs it with no DataLoader workers. Every corruption at severity 3 (the costliest:
most points touched, longest blur kernel). Each round evaluates the same SAMPLES of the val split, clean or
corrupted, and times two parts of it apart:
- the data path (load, corrupt, pipeline, collate): what the corruption code costs. Budget: the corrupted data
  path costs at most OVERHEAD_BUDGET of the clean evaluated sample more than the clean data path;
- the model on the corrupted input: a corruption that pulls returns towards the sensor (snow, fog back-scatter)
  packs voxels densely there, and the sparse convolutions' cost follows their rulebooks, the (input, output)
  voxel pairs they multiply (LiDAR fog: fewer voxels, yet more pairs and more time; the measured growths are in
  bench/results/corruptions_cpu.md and docs/robustness.md). Budget: the model's time grows at most by the
  rulebooks' growth plus OVERHEAD_BUDGET (a slower model on a denser input is the input, not the corruption's code).
Times are the minima over ROUNDS (the least disturbed by other load on the machine). The full-size data path
(1600x900 images through the vov test pipeline, no model) is timed too, with no budget: it shows what each
corruption costs on its own, which a GPU evaluation hides behind the forward pass and the DataLoader workers.
Run: `python -m pytest bench/bench_corruptions.py --benchmark-only -m ''` on a quiet machine.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from spconv.pytorch.conv import SparseConvolution

from aqrcmt.data import build_dataset
from aqrcmt.data.collate import collate
from aqrcmt.data.corruptions import CORRUPTIONS, SensorCorruption
from aqrcmt.data.synthetic import FULL_IMAGE_SIZE, make_synthetic_nuscenes
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset, load_config

OVERHEAD_BUDGET = 0.05          # a corrupted evaluated sample costs at most 5 % more than a clean one
SEVERITY = 3
ROUNDS = 8
SAMPLES = 4                     # val samples evaluated per round, the same ones clean and corrupted


@dataclass
class PartTimes:
    """Fastest round's seconds per sample of the data path and of the model, and sparse-conv pairs per sample."""
    data: float
    model: float
    pairs: float

    @property
    def total(self) -> float:
        return self.data + self.model


class Evaluation:
    """Evaluates the first SAMPLES samples of the tiny config's val split, timing the data path and the model."""

    def __init__(self, root) -> None:
        cfg = load_config("tiny", [f"data.root={root}"])
        self.dataset = build_dataset(cfg, cfg.data.val_split, train=False)
        self.indices = list(range(min(SAMPLES, len(self.dataset))))
        torch.manual_seed(0)
        self.model = build_model(cfg.model).eval()
        self.times: list[tuple[float, float]] = []

    @torch.no_grad()
    def round(self) -> None:
        """One round: every sample through data path and model; appends (data, model) seconds per sample."""
        data = model = 0.0
        for index in self.indices:
            start = time.perf_counter()
            batch = collate([self.dataset[index]])
            loaded = time.perf_counter()
            self.model.predict(batch)
            data, model = data + loaded - start, model + time.perf_counter() - loaded
        n = len(self.indices)
        self.times.append((data / n, model / n))

    @torch.no_grad()
    def pairs_per_sample(self) -> float:
        """Rulebook entries per sample the sparse encoder computes (with the dataset's current corruption): each
        sparse conv's (input, output) voxel pairs, summed over the convs (those sharing an indice key share one)."""
        encoder = self.model.pts_middle_encoder
        convs_per_key = Counter(m.indice_key for m in encoder.modules() if isinstance(m, SparseConvolution))
        captured = {}
        hook = encoder.conv_out.register_forward_hook(lambda module, args, out: captured.update(out=out))
        total = 0
        try:
            for index in self.indices:
                self.model.sparse_bev(collate([self.dataset[index]]).points)
                for key, pairs in captured["out"].indice_dict.items():
                    total += convs_per_key[key] * int(pairs.indice_pair_num.sum())
        finally:
            hook.remove()
        return total / len(self.indices)

    def measure(self, corruption: SensorCorruption | None, benchmark=None) -> PartTimes:
        """PartTimes of ROUNDS rounds (after one warm-up) with `corruption` applied (None: clean)."""
        self.dataset.set_corruption(corruption)
        self.times = []
        try:
            if benchmark is None:
                for _ in range(ROUNDS + 1):
                    self.round()
            else:
                benchmark.pedantic(self.round, rounds=ROUNDS, warmup_rounds=1)
            pairs = self.pairs_per_sample()
        finally:
            self.dataset.set_corruption(None)
        rounds = self.times[-ROUNDS:]
        return PartTimes(min(d for d, _ in rounds), min(m for _, m in rounds), pairs)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    return Evaluation(make_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes"), version="v1.0-mini"))


@pytest.fixture(scope="module")
def clean(evaluation: Evaluation) -> PartTimes:
    return evaluation.measure(None)


def test_clean_evaluated_sample(benchmark, evaluation: Evaluation) -> None:
    times = evaluation.measure(None, benchmark)
    benchmark.extra_info.update(data_ms=times.data * 1e3, model_ms=times.model * 1e3, pairs=times.pairs)
    assert times.pairs > 0


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_evaluated_sample(benchmark, evaluation: Evaluation, clean: PartTimes, name: str) -> None:
    times = evaluation.measure(SensorCorruption(name, SEVERITY), benchmark)
    corruption_cost = (times.data - clean.data) / clean.total       # the corruption's code, share of a sample
    pair_growth = times.pairs / clean.pairs - 1.0
    model_growth = times.model / clean.model - 1.0
    benchmark.extra_info.update(
        total_overhead=times.total / clean.total - 1.0, corruption_cost=corruption_cost,
        pair_growth=pair_growth, model_growth=model_growth, data_ms=times.data * 1e3, model_ms=times.model * 1e3)
    assert corruption_cost <= OVERHEAD_BUDGET, (
        f"{name}: the corrupted data path costs {corruption_cost:+.1%} of a clean evaluated sample "
        f"({times.data * 1e3:.1f} vs {clean.data * 1e3:.1f} ms)")
    assert model_growth <= max(pair_growth, 0.0) + OVERHEAD_BUDGET, (
        f"{name}: the model costs {model_growth:+.1%} more on the corrupted input, its sparse-conv pairs grew "
        f"{pair_growth:+.1%}")


@pytest.fixture(scope="module")
def full_size_dataset(tmp_path_factory: pytest.TempPathFactory):
    root = make_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes_full"), version="v1.0-mini",
                                   image_size=FULL_IMAGE_SIZE)
    cfg = get_preset("cmt_voxel0075_vov_1600x640_cbgs")
    cfg.data.root, cfg.data.version, cfg.data.val_split = str(root), "v1.0-mini", "mini_val"
    return build_dataset(cfg, "mini_val", train=False)


@pytest.mark.parametrize("name", ["clean", *CORRUPTIONS])
def test_full_size_data_path(benchmark, full_size_dataset, name: str) -> None:
    full_size_dataset.set_corruption(None if name == "clean" else SensorCorruption(name, SEVERITY))
    indices = itertools.cycle(range(len(full_size_dataset)))
    try:
        sample = benchmark.pedantic(lambda: full_size_dataset[next(indices)], rounds=6, warmup_rounds=1)
    finally:
        full_size_dataset.set_corruption(None)
    assert sample.images.shape == (6, 3, 640, 1600)
