"""Local cross-attention (tiny config): the same attention as the dense prior restricted to each query's key set,
computed tile by tile; every token within the window is kept; the head's two paths agree (also camera-only); the
config rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqrcmt.config import ConfigError
from aqrcmt.models import local_attention
from aqrcmt.models.local_attention import LocalAttention
from aqrcmt.models.locality import NOT_VISIBLE, cross_attention_locality_bias
from aqrcmt.presets import load_config
from test_head import IMG_SHAPE, ring_cameras, tiny_head, tiny_inputs

PC_RANGE = (-38.4, -38.4, -5.0, 38.4, 38.4, 3.0)
BEV_SIZE = (40, 48)                       # not a multiple of the tile: edge tiles are partial
FEATURE = (IMG_SHAPE[0] // 16, IMG_SHAPE[1] // 16)
PRIOR = dict(pc_range=PC_RANGE, sigma_bev=4.0, sigma_camera=2.0, img_shape=IMG_SHAPE, camera_feature_size=FEATURE)


def _local(batch: int = 2, queries: int = 150, window: float = 3.0) -> tuple[LocalAttention, torch.Tensor]:
    reference = torch.rand(batch, queries, 3, generator=torch.Generator().manual_seed(0))
    lidar2img = ring_cameras(batch)
    return LocalAttention(reference, bev_size=BEV_SIZE, window=window, lidar2img=lidar2img, **PRIOR), reference


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(local_attention, "TILE_CELLS", 16)      # 3 x 3 tiles on the 40 x 48 map


def test_tiles_compute_the_dense_attention_restricted_to_the_key_sets():
    local, _ = _local()
    tokens = BEV_SIZE[0] * BEV_SIZE[1] + 6 * FEATURE[0] * FEATURE[1]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g).requires_grad_() for n in (150, tokens, tokens))
    # the projections' token-major layout, as PackedAttention hands them over
    q_, k_, v_ = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    tiled = local.attend(q_, k_, v_)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=local.dense_bias())
    torch.testing.assert_close(tiled, dense, atol=2e-6, rtol=0)
    weights = torch.randn_like(dense)
    for a, b in zip(torch.autograd.grad((tiled * weights).sum(), (q_, k_, v_)),
                    torch.autograd.grad((dense * weights).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert len(local._groups[0].query_counts) > 3                # several tiles were used


def test_key_sets_hold_every_cell_within_the_window_and_the_views_that_see_the_query():
    local, reference = _local()
    bias = local.dense_bias()[:, 0]                               # (B, Q, M)
    prior = cross_attention_locality_bias(reference, bev_size=BEV_SIZE, lidar2img=ring_cameras(2), **PRIOR)[:, 0]
    kept = torch.isfinite(bias)
    assert torch.equal(bias[kept], prior[kept])                   # the prior itself on the kept tokens
    cells = BEV_SIZE[0] * BEV_SIZE[1]
    within = prior[..., :cells] >= -(3.0 ** 2) / 2                # within 3 sigmas of the reference
    assert within.any() and kept[..., :cells][within].all()
    assert 0.1 < kept[..., :cells].float().mean() < 0.6           # and the far cells are dropped
    camera_prior = prior[..., cells:].unflatten(-1, (6, -1))
    seen = camera_prior.amax(-1) > NOT_VISIBLE                    # (B, Q, V) views that see the query
    camera_kept = kept[..., cells:].unflatten(-1, (6, -1))
    assert seen.any() and camera_kept.all(-1)[seen].all()
    assert (camera_kept.any(-1) == camera_kept.all(-1)).all()     # a view is kept or dropped whole
    assert not camera_kept.all()                                  # some views are dropped


@pytest.mark.parametrize("with_lidar", [True, False], ids=["fusion", "camera_only"])
def test_head_outputs_equal_with_tiles_and_with_the_dense_form(with_lidar):
    head, cfg = tiny_head(with_lidar=with_lidar, local_attention_sigmas=3.0)
    head.eval()
    inputs = tiny_inputs(head)
    with torch.no_grad():
        tiled = head(**inputs)
        original = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: True                 # the branch torch.compile and export take
        try:
            dense = head(**inputs)
        finally:
            torch.compiler.is_compiling = original
    for key in ("center", "dim", "rot", "cls_logits"):
        torch.testing.assert_close(tiled[key], dense[key], atol=1e-4, rtol=1e-5)     # centres are metres


def test_local_attention_changes_the_head_less_than_the_prior_floor():
    head, cfg = tiny_head(local_attention_sigmas=3.0)
    inputs = tiny_inputs(head)
    head.eval()
    with torch.no_grad():
        local = head(**inputs)["center"]
        cfg.local_attention_sigmas = 0.0
        dense = head(**inputs)["center"]
    difference = (local - dense).abs().max().item()
    assert 0 < difference < 0.5                                    # metres: the dropped tokens weigh little


def test_config_needs_the_prior():
    local = ["model.head.local_attention_sigmas=3"]
    assert load_config("tiny_aqr_recommended", local).model.head.local_attention_sigmas == 3.0
    with pytest.raises(ConfigError, match="model.head.local_attention_sigmas"):
        load_config("tiny", [*local, "model.head.locality_sigma_bev=0", "model.head.locality_sigma_camera=0"])
    load_config("tiny", [*local, "model.lidar.enabled=false"])               # camera only: camera keys only
    with pytest.raises(ConfigError, match="model.head.local_attention_sigmas"):
        load_config("tiny", ["model.head.local_attention_sigmas=-1"])
    assert load_config("cmt_voxel0100_r50_800x320_cbgs").model.head.local_attention_sigmas == 0   # the release
    assert load_config("tiny").model.head.local_attention_sigmas == 3.0                            # the CPU step
