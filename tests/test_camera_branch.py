"""Camera branch: VoVNet-99-eSE / ResNet-50 / tiny backbones, CP-FPN neck, GridMask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aqrcmt.checkpoint.manifest import load_manifest
from aqrcmt.config import CameraConfig, ConfigError
from aqrcmt.models.camera import build_image_backbone, build_image_neck
from aqrcmt.models.cpfpn import CPFPN
from aqrcmt.models.grid_mask import GridMask, grid_mask_pattern
from parity_bundle import fp32_state_dict, load_parity

VOV = CameraConfig(backbone="vovnet99", backbone_out_channels=(768, 1024))
R50 = CameraConfig(backbone="resnet50", backbone_out_channels=(1024, 2048), image_size=(320, 800))
TINY = CameraConfig(backbone="tiny", backbone_out_channels=(64, 128), neck_out_channels=64, image_size=(128, 352))


def _manifest_entries(name: str, prefixes: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    return [(e.key, e.shape) for e in load_manifest(name).entries if e.key.startswith(prefixes)]


def _entries(module: nn.Module, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def vovnet() -> nn.Module:
    return build_image_backbone(VOV).eval()


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return build_image_backbone(R50).eval()


# ------------------------------------------------------------------------------------------------
# Official state_dict layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg, manifest, backbone_params, neck_params", [
    ("vovnet", VOV, "cmt_voxel0075_vov_1600x640_cbgs", 69_523_520, 1_049_344),
    ("resnet50", R50, "cmt_voxel0100_r50_800x320_cbgs", 23_508_032, 1_377_024),
])
def test_state_dict_matches_official_manifest(request, name, cfg, manifest, backbone_params, neck_params):
    backbone, neck = request.getfixturevalue(name), build_image_neck(cfg)
    assert _num_params(backbone) == backbone_params
    assert _num_params(neck) == neck_params
    ours = _entries(backbone, "img_backbone.") + _entries(neck, "img_neck.")
    assert ours == _manifest_entries(manifest, ("img_backbone.", "img_neck."))


@pytest.mark.parity("neck")
def test_cpfpn_matches_official_parity_bundle():
    bundle = load_parity("neck")
    neck = CPFPN(in_channels=bundle["ctor"]["in_channels"], out_channels=bundle["ctor"]["out_channels"]).eval()
    state = {k.removeprefix("img_neck."): v for k, v in fp32_state_dict(bundle["state_dict"]).items()}
    neck.load_state_dict(state, strict=True)
    with torch.no_grad():
        outputs = neck(bundle["inputs"])
    assert len(outputs) == len(bundle["outputs"]) == 2
    for level, (ours, ref) in enumerate(zip(outputs, bundle["outputs"])):
        worst_rel = ((ours - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
        print(f"CPFPN level {level}: max abs err {(ours - ref).abs().max().item():.3e}, worst rel err {worst_rel:.3e}")
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Output shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg, expected", [
    ("vovnet", VOV, [(1, 768, 40, 100), (1, 1024, 20, 50)]),
    ("resnet50", R50, [(1, 1024, 20, 50), (1, 2048, 10, 25)]),
])
def test_backbone_and_neck_shapes_at_released_resolution(request, name, cfg, expected):
    backbone, neck = request.getfixturevalue(name), build_image_neck(cfg).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *cfg.image_size))
        levels = neck(list(features))
    assert [tuple(f.shape) for f in features] == expected
    assert [tuple(x.shape) for x in levels] == [(1, 256, *shape[2:]) for shape in expected]


def test_vovnet_pooling_rounds_up_odd_sizes(vovnet):
    with torch.no_grad():
        stride16, stride32 = vovnet(torch.randn(1, 3, 70, 150))
    # stem: 70x150 -> 35x75 -> 18x38; pools ceil((n - 3) / 2) + 1: 9x19, 4x9, 2x4 (floor mode: 8x18, 3x8, 1x3)
    assert stride16.shape == (1, 768, 4, 9) and stride32.shape == (1, 1024, 2, 4)


def test_tiny_backbone_trains_on_a_camera_batch():
    backbone, neck = build_image_backbone(TINY).train(), build_image_neck(TINY).train()
    images = torch.randn(12, 3, 128, 352, requires_grad=True)
    features = backbone(images)
    levels = neck(list(features))
    assert [tuple(f.shape) for f in features] == [(12, 64, 8, 22), (12, 128, 4, 11)]
    assert [tuple(x.shape) for x in levels] == [(12, 64, 8, 22), (12, 64, 4, 11)]
    (levels[0].square().mean() + levels[1].mean()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    for name, p in list(backbone.named_parameters()) + list(neck.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_builder_rejects_wrong_channels_for_pretrained_backbones():
    with pytest.raises(ConfigError, match="camera.backbone_out_channels"):
        build_image_backbone(CameraConfig(backbone="resnet50", backbone_out_channels=(768, 1024)))
    with pytest.raises(ValueError, match="level 1"):
        build_image_neck(TINY)([torch.zeros(1, 64, 4, 4), torch.zeros(1, 64, 2, 2)])


# ------------------------------------------------------------------------------------------------
# norm_eval (frozen BN statistics)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen_bn", [True, False])
def test_frozen_bn_keeps_running_statistics(frozen_bn):
    cfg = CameraConfig(backbone="tiny", backbone_out_channels=(64, 128), frozen_bn=frozen_bn)
    backbone = build_image_backbone(cfg).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    stride16, stride32 = backbone(torch.randn(2, 3, 64, 96) * 3 + 1)
    (stride16.mean() + stride32.mean()).backward()
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone.training and all(m.training != frozen_bn for m in norms)
    unchanged = all(torch.equal(before[k], v) for k, v in backbone.state_dict().items() if k in before)
    assert unchanged == frozen_bn
    assert all(m.weight.grad is not None for m in norms)  # affine parameters still train


# ------------------------------------------------------------------------------------------------
# GridMask
# ------------------------------------------------------------------------------------------------
def _official_pattern(height: int, width: int, period: int, stripe: int, shift_y: int, shift_x: int) -> np.ndarray:
    """The released algorithm written as loops over stripes (mode 1: stripes kept)."""
    canvas_h, canvas_w = int(1.5 * height), int(1.5 * width)
    mask = np.ones((canvas_h, canvas_w), np.float32)
    for i in range(canvas_h // period):
        mask[period * i + shift_y: min(period * i + shift_y + stripe, canvas_h), :] = 0
    for i in range(canvas_w // period):
        mask[:, period * i + shift_x: min(period * i + shift_x + stripe, canvas_w)] = 0
    top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
    return 1 - mask[top:top + height, left:left + width]


@pytest.mark.parametrize("height, width, period, shift_y, shift_x", [
    (128, 352, 2, 0, 1), (128, 352, 37, 5, 36), (64, 96, 63, 62, 0), (640, 1600, 100, 17, 99),
])
def test_grid_mask_pattern_equals_released_algorithm(height, width, period, shift_y, shift_x):
    stripe = min(max(int(period * 0.5 + 0.5), 1), period - 1)
    ours = grid_mask_pattern(height, width, period, stripe, shift_y, shift_x)
    np.testing.assert_array_equal(ours.numpy(), _official_pattern(height, width, period, stripe, shift_y, shift_x))


@pytest.mark.parametrize("period", [4, 9, 33, 60])
def test_grid_mask_zeroes_the_blocks_between_stripes(period):
    height, width = 640, 1600
    stripe = min(max(int(period * 0.5 + 0.5), 1), period - 1)
    mask = grid_mask_pattern(height, width, period, stripe, shift_y=period // 3, shift_x=period - 1)
    row_stripes, col_stripes = mask.bool().all(dim=1), mask.bool().all(dim=0)
    assert torch.equal(mask.bool(), row_stripes[:, None] | col_stripes[None, :])
    expected_zero_fraction = ((period - stripe) / period) ** 2
    assert abs((mask == 0).float().mean().item() - expected_zero_fraction) < 2 * period / height


def test_grid_mask_is_seeded_shared_and_random():
    grid_mask = GridMask(prob=1.0).train()
    images = torch.ones(4, 3, 32, 48)
    torch.manual_seed(3)
    first = grid_mask(images)
    torch.manual_seed(3)
    assert torch.equal(first, grid_mask(images))
    assert torch.equal(first, first[:1, :1].expand_as(first))  # one mask for every image and channel
    assert set(first.unique().tolist()) == {0.0, 1.0}
    masks = [grid_mask(images, generator=torch.Generator().manual_seed(s))[0, 0] for s in range(4)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def test_grid_mask_probability_and_identity_cases():
    images = torch.randn(2, 3, 16, 24)
    assert _grid_mask_is_identity(GridMask(prob=1.0).eval(), images)
    assert _grid_mask_is_identity(GridMask(prob=0.0).train(), images)
    generator = torch.Generator().manual_seed(0)
    grid_mask = GridMask(prob=0.7).train()
    applied = [not torch.equal(grid_mask(images, generator), images) for _ in range(400)]
    assert 0.62 < float(np.mean(applied)) < 0.78


def _grid_mask_is_identity(grid_mask: GridMask, images: torch.Tensor) -> bool:
    return all(torch.equal(grid_mask(images), images) for _ in range(20))
