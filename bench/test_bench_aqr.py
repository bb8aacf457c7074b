"""Cost of AQR in the CMT head: forward + backward with AQR off / on (the fork's final settings / recommended).

Run: `python -m pytest bench/test_bench_aqr.py --benchmark-only -m ''` (CPU: the tiny head; on a GPU host the
`slow` test also times the full-size head: 180 x 180 BEV, 6 x 40 x 100 camera maps, 900 queries + DN).
Results: bench/results/aqr_cpu.md.
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.models.aqr.diagnose import ring_lidar2img
from aqrcmt.models.cmt_head import CmtHead
from aqrcmt.models.denoising import prepare_denoising
from aqrcmt.presets import get_preset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = {"off": None, "fork_final": "cmt_aqr_voxel0075_vov_1600x640_cbgs",
            "recommended": "cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs"}


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _train_step(preset: str, variant: str, batch: int):
    """A closure running one head forward + loss + backward for `preset`'s model with AQR `variant`."""
    model = get_preset(preset).model
    aqr = None if VARIANTS[variant] is None else get_preset(VARIANTS[variant]).model.aqr
    if aqr is not None and preset == "tiny":
        aqr.generator = get_preset("tiny_aqr").model.aqr.generator
    torch.manual_seed(0)
    head = CmtHead(model.head, pc_range=model.lidar.voxel.point_cloud_range, bev_size=model.bev_size,
                   with_lidar=True, with_camera=True, aqr=aqr).to(DEVICE).train()
    img_h, img_w = model.camera.image_size
    g = torch.Generator().manual_seed(1)
    bev = torch.randn(batch, model.head.in_channels, *model.bev_size, generator=g).to(DEVICE)
    img = torch.randn(batch * 6, model.head.hidden_dim, img_h // 16, img_w // 16, generator=g).to(DEVICE)
    lidar2img = ring_lidar2img((img_h, img_w), batch).to(DEVICE)
    boxes = [torch.cat([(torch.rand(20, 2, generator=g) - 0.5) * 80, torch.zeros(20, 1), torch.full((20, 3), 2.0),
                        torch.zeros(20, 3)], 1).to(DEVICE) for _ in range(batch)]
    labels = [torch.randint(0, 10, (20,), generator=g).to(DEVICE) for _ in range(batch)]

    def step() -> None:
        head.zero_grad(set_to_none=True)
        dn = prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range)
        outputs = head(bev, img, lidar2img, (img_h, img_w), dn=dn)
        sum(head.loss(outputs, boxes, labels).values()).backward()
        _synchronize()

    return step


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_head_train_step(benchmark, variant):
    """The tiny preset's head at its own sizes (BEV map, camera maps, queries + DN, hidden 64), batch 2."""
    benchmark.group = "aqr-tiny-head"
    benchmark(_train_step("tiny", variant, batch=2))


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cuda", reason="the full-size head takes minutes per step on a CPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_head_train_step(benchmark, variant):
    """Released vov head (180 x 180 BEV, 6 x 40 x 100 camera maps, 900 queries + DN), batch 2, CUDA."""
    benchmark.group = "aqr-full-head"
    step = _train_step("cmt_voxel0075_vov_1600x640_cbgs", variant, batch=2)
    benchmark.pedantic(step, rounds=10, warmup_rounds=3)
