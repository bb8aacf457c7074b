"""Training-step time of the tiny config: eager vs torch.compile, AQR on (`tiny_aqr`) vs off (`tiny`).

One step = loss forward + backward + clip + AdamW step on one collated batch (2 samples, the demo's batch)
of the synthetic nuScenes, data loading excluded. The compiled variant is timed after its warm-up rounds
(which include compilation). On a GPU host the same benchmarks time CUDA.
Run: `python -m pytest bench/bench_train.py --benchmark-only -m ''`. Results: bench/results/train_cpu.md.
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.presets import load_config
from aqrcmt.data import build_dataloader
from aqrcmt.models import build_model
from aqrcmt.training.loop import LossModel
from aqrcmt.training.optim import freeze_and_build_optimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory):
    from aqrcmt.data.synthetic import make_synthetic_nuscenes

    return make_synthetic_nuscenes(tmp_path_factory.mktemp("synthetic_nuscenes"), version="v1.0-mini")


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("preset", ["tiny", "tiny_aqr"], ids=["aqr_off", "aqr_on"])
def test_tiny_train_step(benchmark, synthetic_root, preset: str, compiled: bool) -> None:
    cfg = load_config(preset, [f"data.root={synthetic_root}", "data.augment.enabled=false"])
    batch = next(iter(build_dataloader(cfg, cfg.data.train_split, train=True))).to(DEVICE)
    torch.manual_seed(0)
    detector = build_model(cfg.model).to(DEVICE).train()
    optimizer = freeze_and_build_optimizer(detector, cfg.optim)    # what the training loop does
    if compiled:
        detector.compile_dense()          # what train/main.py --compile does
    model = LossModel(detector)

    def step() -> None:
        loss = sum(model(batch).losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=2 if compiled else 1)
