"""Cost of a corrupted evaluation per sample, against a clean one: what `aqrcmt evaluate --corruptions` adds.

One evaluated sample = load (6 JPEGs, sweeps), [corruption], test pipeline, collate, tiny-model predict on the
CPU, as the evaluation loop runs it with no DataLoader workers. Every corruption at severity 3 (the costliest:
most points touched, longest blur kernel). The clean per-sample time is measured once, the same way; each
corrupted benchmark then asserts its fastest round costs at most OVERHEAD_BUDGET more than the fastest clean
round (minima: the least disturbed by other load on the machine). The full-size data path (1600x900 images
through the vov test pipeline, no model) is timed too, with no budget: it shows what each corruption costs on
its own, which a GPU evaluation hides behind the forward pass and the DataLoader workers.
Run: `python -m pytest bench/bench_corruptions.py --benchmark-only -m ''` on a quiet machine.
"""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from aqrcmt.data import build_dataset
from aqrcmt.data.collate import collate
from aqrcmt.data.corruptions import CORRUPTIONS, SensorCorruption
from aqrcmt.data.synthetic import FULL_IMAGE_SIZE, make_synthetic_nuscenes
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset, load_config

OVERHEAD_BUDGET = 0.05          # a corrupted evaluated sample costs at most 5 % more than a clean one
SEVERITY = 3
ROUNDS = 12


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory):
    """(dataset, step): `step()` evaluates the next sample of the tiny config's val split."""
    root = make_synthetic_nuscenes(tmp_path_factory.mktemp("nuscenes"), version="v1.0-mini")
    cfg = load_config("tiny", [f"data.root={root}"])
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    indices = itertools.cycle(range(len(dataset)))

    def step():
        with torch.no_grad():
            return model.predict(collate([dataset[next(indices)]]))
    return dataset, step


@pytest.fixture(scope="module")
def clean_seconds(evaluation) -> float:
    dataset, step = evaluation
    dataset.set_corruption(None)
    step()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def test_clean_evaluated_sample(benchmark, evaluation) -> None:
    dataset, step = evaluation
    dataset.set_corruption(None)
    assert len(benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)) == 1


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_evaluated_sample(benchmark, evaluation, clean_seconds: float, name: str) -> None:
    dataset, step = evaluation
    dataset.set_corruption(SensorCorruption(name, SEVERITY))
    try:
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    finally:
        dataset.set_corruption(None)
    overhead = benchmark.stats.stats.min / clean_seconds - 1.0
    benchmark.extra_info["overhead"] = overhead
    assert overhead <= OVERHEAD_BUDGET, f"{name}: {overhead:+.1%} over the clean {clean_seconds * 1e3:.1f} ms"


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
