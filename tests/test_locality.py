"""The cross-attention locality prior: its formula, the camera visibility rule, and that it makes fresh
queries attend near their reference points (the release's head does not)."""
from __future__ import annotations

import math

import pytest
import torch

from aqrcmt.config import ConfigError
from aqrcmt.models import transformer
from aqrcmt.models.locality import NOT_VISIBLE, cross_attention_locality_bias
from aqrcmt.presets import load_config
from test_head import tiny_head, tiny_inputs

PC_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)


def test_bev_bias_is_the_log_gaussian_of_the_distance_in_metres():
    reference = torch.tensor([[[0.125, 0.125, 0.5], [0.5, 0.5, 0.5]]])   # centre of cell (0, 0); a cell corner
    bias = cross_attention_locality_bias(reference, pc_range=PC_RANGE, sigma_bev=10.0, sigma_camera=1.0,
                                         bev_size=(4, 4))                # cells 27 m apart
    assert bias.shape == (1, 1, 2, 16)
    assert bias[0, 0, 0, 0] == 0.0
    assert math.isclose(bias[0, 0, 0, 1].item(), -27.0 ** 2 / 200, rel_tol=1e-6)
    assert math.isclose(bias[0, 0, 1, 5].item(), -2 * 13.5 ** 2 / 200, rel_tol=1e-6)
    assert bias.min() >= NOT_VISIBLE


def test_camera_bias_peaks_at_the_projection_and_hides_views_that_do_not_see_the_query():
    from test_head import IMG_SHAPE, ring_cameras

    lidar2img = ring_cameras(1)
    reference = torch.tensor([[[(10.0 + 54) / 108, 0.5, (0.0 + 5) / 8]]])          # 10 m ahead of the LiDAR
    feature = (IMG_SHAPE[0] // 16, IMG_SHAPE[1] // 16)
    bias = cross_attention_locality_bias(reference, pc_range=PC_RANGE, sigma_bev=1.0, sigma_camera=2.0,
                                         lidar2img=lidar2img, img_shape=IMG_SHAPE, camera_feature_size=feature)
    per_view = bias.view(6, *feature)
    seen = [v for v in range(6) if per_view[v].max() > NOT_VISIBLE]
    assert seen and len(seen) < 6
    for v in set(range(6)) - set(seen):
        assert (per_view[v] == NOT_VISIBLE).all()
    assert per_view[seen[0]].max() > -0.5                                           # a cell next to the projection


def test_config_needs_both_sigmas_for_a_fusion_model():
    load_config("tiny", ["model.head.locality_sigma_bev=6", "model.head.locality_sigma_camera=2"])
    load_config("tiny", ["model.head.locality_sigma_bev=0", "model.head.locality_sigma_camera=0",      # off
                         "model.head.local_attention_sigmas=0"])
    with pytest.raises(ConfigError, match="model.head.locality_sigma_camera"):
        load_config("tiny", ["model.head.locality_sigma_bev=6", "model.head.locality_sigma_camera=0"])
    with pytest.raises(ConfigError, match="model.head.locality_sigma_bev"):
        load_config("tiny", ["model.head.locality_sigma_bev=-1"])


def _cross_attention_near_share(head, radius_m: float) -> float:
    """Share of the first cross-attention's BEV attention within `radius_m` of each learned query's reference."""
    captured = []
    original = transformer.F.scaled_dot_product_attention

    def capture(q, k, v, attn_mask=None, dropout_p=0.0):
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else logits + attn_mask
        captured.append(logits.softmax(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

    transformer.F.scaled_dot_product_attention = capture
    try:
        head.eval()
        with torch.no_grad():
            head(**tiny_inputs(head))
    finally:
        transformer.F.scaled_dot_product_attention = original
    cells = head.bev_coords.shape[0]
    attention = next(a for a in captured if a.shape[-1] > cells)[0].mean(0)[:, :cells]   # (Q, HW), mean of heads
    distance = torch.cdist(head.reference_points.weight[:, :2], head.bev_coords) * 108
    near = (attention * (distance < radius_m)).sum(1) / attention.sum(1)
    return float(near.mean())


def test_locality_prior_makes_fresh_queries_attend_near_their_reference():
    release, _ = tiny_head(locality_sigma_bev=0.0, locality_sigma_camera=0.0, local_attention_sigmas=0.0)
    local, _ = tiny_head(locality_sigma_bev=6.0, locality_sigma_camera=2.0, local_attention_sigmas=0.0)
    uniform_share = float((torch.cdist(release.reference_points.weight[:, :2], release.bev_coords) * 108 < 10)
                          .float().mean())
    assert abs(_cross_attention_near_share(release, 10.0) - uniform_share) < 0.05
    assert _cross_attention_near_share(local, 10.0) > 0.5
