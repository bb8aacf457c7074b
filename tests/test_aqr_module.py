"""AQRModulation inside the CMT head: identity setting = plain CMT, gradients, DN queries, monitoring."""
import dataclasses

import pytest
import torch

from aqrcmt.config import AQRModulateConfig, AQRRenderConfig, HeadConfig
from aqrcmt.eval.visualize import render_aqr
from aqrcmt.models.aqr.diagnose import ring_lidar2img
from aqrcmt.models.aqr.module import AQRModulation
from aqrcmt.models.cmt_head import CmtHead
from aqrcmt.models.denoising import prepare_denoising
from aqrcmt.presets import get_preset

IMG_SHAPE = (128, 352)


def heads(aqr_cfg):
    """(plain CMT head, the same head with AQR) from the tiny preset, sharing every CMT weight."""
    model = get_preset("tiny_aqr").model
    kwargs = dict(pc_range=model.lidar.voxel.point_cloud_range, bev_size=model.bev_size, with_lidar=True,
                  with_camera=True)
    torch.manual_seed(0)
    plain = CmtHead(model.head, **kwargs)
    with_aqr = CmtHead(model.head, aqr=aqr_cfg, **kwargs)
    missing, unexpected = with_aqr.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("aqr.") for k in missing)
    return plain, with_aqr


def inputs(head: CmtHead, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(bev_feat=torch.randn(batch, head.cfg.in_channels, *head.bev_size, generator=g),
                img_feat=torch.randn(batch * 6, head.cfg.hidden_dim, IMG_SHAPE[0] // 16, IMG_SHAPE[1] // 16,
                                     generator=g),
                lidar2img=ring_lidar2img(IMG_SHAPE, batch), img_shape=IMG_SHAPE)


def gt(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    boxes = [torch.cat([(torch.rand(4, 2, generator=g) - 0.5) * 60, torch.zeros(4, 1), torch.full((4, 3), 2.0),
                        torch.zeros(4, 3)], 1) for _ in range(batch)]
    return boxes, [torch.randint(0, 10, (4,), generator=g) for _ in range(batch)]


def test_identity_setting_reproduces_plain_cmt():
    """Normalized kernel with fill 1, weights forced to 1 and the convex residual: AQR must be a no-op."""
    aqr_cfg = get_preset("tiny_aqr").model.aqr
    aqr_cfg.render = AQRRenderConfig(kernel_norm="normalized", threshold=0.0, clamp_max=None, fill=1.0)
    aqr_cfg.modulate = AQRModulateConfig(residual_form="convex", residual_weight=0.5)
    plain, with_aqr = heads(aqr_cfg)
    torch.nn.init.zeros_(with_aqr.aqr.weight_generator.weight_predictor.weight)
    torch.nn.init.constant_(with_aqr.aqr.weight_generator.weight_predictor.bias, 30.0)   # sigmoid -> 1.0
    plain.eval(), with_aqr.eval()
    with torch.no_grad():
        expected, got = plain(**inputs(plain)), with_aqr(**inputs(with_aqr))
        for key in ("center", "height", "dim", "rot", "vel", "cls_logits"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
        # the fork's sum kernel on the same weights do change the output (the test above is not vacuous)
        with_aqr.aqr.cfg.render = AQRRenderConfig(kernel_norm="sum", sigma_bev=2.0, sigma_camera=2.0)
        assert (with_aqr(**inputs(with_aqr))["cls_logits"] - expected["cls_logits"]).abs().max() > 1e-3


def test_generator_gets_gradients_through_the_rendered_maps():
    _, head = heads(get_preset("tiny_aqr").model.aqr)
    head.train()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    boxes, labels = gt()
    generator = head.aqr.weight_generator
    for step in range(2):
        optimizer.zero_grad()
        head.aqr.monitor_this_step = step == 1
        outputs = head(**inputs(head), dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
        assert outputs["dn"] is not None
        sum(head.loss(outputs, boxes, labels).values()).backward()
        for name, p in generator.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        for name in ("encoder.layers.0.attentions.0.attn.in_proj_weight", "encoder.layers.0.ffns.0.layers.1.weight",
                     "weight_predictor.weight", "weight_predictor.bias", "bev_type_embed"):
            assert generator.get_parameter(name).grad.abs().sum() > 0, name
        optimizer.step()
    stats = head.aqr.last_stats
    assert len(stats) == 40 and all(isinstance(v, float) and v == v for v in stats.values())


def small_module(render_dn: bool) -> AQRModulation:
    cfg = get_preset("tiny_aqr").model.aqr
    cfg = dataclasses.replace(cfg, render_dn_queries=render_dn,
                              generator=dataclasses.replace(cfg.generator, ffn_dim=16, dropout=0.0))
    torch.manual_seed(0)
    return AQRModulation(cfg, head_cfg=HeadConfig(hidden_dim=16, num_heads=4), pc_range=(-54, -54, -5, 54, 54, 3),
                         bev_size=(12, 12)).eval()


def small_call(module: AQRModulation, reference: torch.Tensor, num_dn: int):
    g = torch.Generator().manual_seed(3)
    b, q = reference.shape[:2]
    return module(torch.randn(b, 16, 12, 12, generator=g), torch.randn(b * 6, 16, 8, 22, generator=g),
                  query_pos=torch.randn(b, q, 16, generator=g), bev_pos=torch.randn(144, 16, generator=g),
                  rv_pos=torch.randn(b * 6, 8, 22, 16, generator=g), reference_points=reference,
                  lidar2img=ring_lidar2img(IMG_SHAPE, b), img_shape=IMG_SHAPE, num_dn=num_dn)


@pytest.mark.parametrize("render_dn", [False, True])
def test_denoising_queries_are_not_rendered_by_default(render_dn):
    module = small_module(render_dn)
    reference = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(4))
    moved = reference.clone()
    moved[:, :10] = torch.rand(2, 10, 3, generator=torch.Generator().manual_seed(5))      # other noised GT
    with torch.no_grad():
        first, second = small_call(module, reference, 10), small_call(module, moved, 10)
    same = all(torch.equal(a, b) for a, b in zip(first[:2], second[:2]))   # the features
    assert same != render_dn


def test_monitor_only_when_asked():
    module = small_module(False)
    reference = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        small_call(module, reference, 0)
        assert module.last_stats == {} and module.monitor.last_view is None
        module.monitor_this_step = True
        small_call(module, reference, 0)
    stats = module.last_stats
    assert 0 < stats["bev_map_mean"] < stats["bev_map_max"] and 0 < stats["camera_weight_mean"] < 1
    assert module.monitor.last_view.camera_maps.shape == (6, 8, 22)
    assert render_aqr(module.monitor.last_view).ndim == 3
    with pytest.raises(ValueError, match="bev_size"):
        module(torch.zeros(2, 16, 10, 10), torch.zeros(12, 16, 8, 22), query_pos=None, bev_pos=None, rv_pos=None,
               reference_points=reference, lidar2img=ring_lidar2img(IMG_SHAPE, 2), img_shape=IMG_SHAPE)
