"""Camera-branch speed: tiny backbone + CP-FPN forward/backward (the CPU demo batch), VoVNet-99 inference.

Run: `python -m pytest bench/test_bench_camera.py --benchmark-only -m ''` (on a GPU host the same tests time CUDA).
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.config import CameraConfig
from aqrcmt.models.camera import build_image_backbone, build_image_neck

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def test_tiny_camera_branch_train_step(benchmark):
    """One training step's camera work for the tiny preset: 2 samples x 6 views at 128x352."""
    cfg = CameraConfig(backbone="tiny", backbone_out_channels=(64, 128), neck_out_channels=64,
                       image_size=(128, 352), frozen_bn=False)
    backbone, neck = build_image_backbone(cfg).to(DEVICE).train(), build_image_neck(cfg).to(DEVICE).train()
    images = torch.randn(12, 3, *cfg.image_size, device=DEVICE)

    def step() -> None:
        level0, level1 = neck(list(backbone(images)))
        (level0.mean() + level1.mean()).backward()
        _synchronize()

    benchmark(step)


@pytest.mark.slow
def test_vovnet99_inference_one_view_640x1600(benchmark):
    """VoVNet-99-eSE + CP-FPN, eval, one 640x1600 view."""
    cfg = CameraConfig()
    backbone, neck = build_image_backbone(cfg).to(DEVICE).eval(), build_image_neck(cfg).to(DEVICE).eval()
    images = torch.randn(1, 3, *cfg.image_size, device=DEVICE)

    @torch.no_grad()
    def forward() -> None:
        neck(list(backbone(images)))
        _synchronize()

    benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
