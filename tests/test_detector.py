"""CmtDetector: official state_dict layout for the four released configs, the tiny config end to end
(train step, prediction, degenerate inputs, overfitting one sample), and torch.compile of the dense part.
"""
from __future__ import annotations

import copy

import pytest
import torch

from aqrcmt.checkpoint.manifest import load_manifest
from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.eval.visualize import render_aqr, save_png
from aqrcmt.models import CmtDetector, build_model
from aqrcmt.presets import get_preset
from aqrcmt.structures import Batch

RELEASED = ["cmt_voxel0075_vov_1600x640_cbgs", "cmt_voxel0100_r50_800x320_cbgs", "cmt_lidar_voxel0075_cbgs",
            "cmt_camera_vov_1600x640_cbgs"]     # presets named as their official configs and shipped manifests
OVERFIT_STEPS = 150


@pytest.fixture(scope="module")
def tiny_cfg():
    return get_preset("tiny").model


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg) -> CmtDetector:
    torch.manual_seed(0)
    return build_model(tiny_cfg)


def _check_detections(detections, batch_size: int, num_classes: int = 10) -> None:
    assert len(detections) == batch_size
    for det in detections:
        n = det.boxes.shape[0]
        assert det.boxes.shape == (n, 9) and det.scores.shape == (n,) and det.labels.shape == (n,)
        assert torch.isfinite(det.boxes).all() and torch.isfinite(det.scores).all()
        assert ((det.scores >= 0) & (det.scores <= 1)).all()
        assert (det.scores[:-1] >= det.scores[1:]).all()
        assert ((det.labels >= 0) & (det.labels < num_classes)).all()


# ------------------------------------------------------------------------------------------------------
# Official layout
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", RELEASED)
def test_state_dict_and_parameter_counts_match_official(preset):
    manifest = load_manifest(preset)
    with torch.device("meta"):                     # shapes only: no memory for the 86 M parameters
        model = build_model(get_preset(preset).model)
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    official = {e.key: (e.shape, e.dtype) for e in manifest.entries}
    for module_name in dict.fromkeys(key.split(".")[0] for key in official):
        prefix = module_name + "."
        ours_module = {k: v for k, v in ours.items() if k.startswith(prefix)}
        official_module = {k: v for k, v in official.items() if k.startswith(prefix)}
        assert ours_module == official_module, f"{preset}: {module_name} keys/shapes/dtypes differ"
        params = sum(p.numel() for p in getattr(model, module_name).parameters())
        assert params == manifest.num_parameters(prefix), f"{preset}: {module_name} has {params} parameters"
    assert list(ours) == list(official), f"{preset}: state_dict order differs from the official one"
    assert sum(p.numel() for p in model.parameters()) == manifest.num_parameters()


# ------------------------------------------------------------------------------------------------------
# Tiny config end to end
# ------------------------------------------------------------------------------------------------------
def test_tiny_train_step_and_predict(tiny_model, tiny_cfg):
    model = copy.deepcopy(tiny_model).train()
    batch = synthetic_batch(tiny_cfg, num_boxes=(5, 3), seed=1)
    losses = model.loss(batch).losses
    assert {"loss_cls", "loss_bbox", "dn_loss_cls", "dn_loss_bbox"} <= set(losses)
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("pts_middle_encoder.conv_input.0.weight", "pts_backbone.blocks.0.0.weight",
                 "pts_neck.deblocks.1.0.weight", "img_backbone.conv1.weight", "img_neck.fpn_convs.0.conv.weight",
                 "pts_bbox_head.reference_points.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"

    model.eval()
    with torch.no_grad():
        detections = model.predict(batch)
    _check_detections(detections, batch.batch_size)


def test_grid_mask_only_in_training(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.camera.grid_mask, cfg.camera.grid_mask_prob = True, 1.0
    model = build_model(cfg)
    images = torch.ones(1, 6, 3, *cfg.camera.image_size)
    model.eval()
    with torch.no_grad():
        eval_feat = model.extract_img_feat(images)
        assert torch.equal(eval_feat, model.extract_img_feat(images))
        model.train()
        model.img_backbone.eval()                # keep BN statistics fixed: only the mask differs
        model.img_neck.eval()
        torch.manual_seed(0)
        assert not torch.allclose(model.extract_img_feat(images), eval_feat)
    assert eval_feat.shape == (6, cfg.camera.neck_out_channels, *(s // 16 for s in cfg.camera.image_size))


def test_degenerate_inputs_do_not_crash(tiny_model, tiny_cfg):
    model = tiny_model.eval()
    base = synthetic_batch(tiny_cfg, num_boxes=(3, 2), seed=2)
    no_points_one = Batch(**{**vars(base), "points": [torch.zeros(0, 5), base.points[1]]})
    no_points_all = Batch(**{**vars(base), "points": [torch.zeros(0, 5), torch.zeros(0, 5)]})
    zero_images = Batch(**{**vars(base), "images": torch.zeros_like(base.images)})
    no_images = Batch(**{**vars(base), "images": None})
    outputs = {}
    with torch.no_grad():
        for name, batch in [("no_points_one", no_points_one), ("no_points_all", no_points_all),
                            ("zero_images", zero_images), ("no_images", no_images)]:
            outputs[name] = model(batch)
            _check_detections(model.pts_bbox_head.decode(outputs[name]), batch.batch_size)
        # No cameras is the camera-drop augmentation: identical to all-zero images.
        torch.testing.assert_close(outputs["no_images"]["cls_logits"], outputs["zero_images"]["cls_logits"])
        # A sample without points sees an all-zero BEV.
        assert model.sparse_bev(no_points_one.points)[0].abs().sum() == 0

    train_model = copy.deepcopy(tiny_model).train()
    no_gt = Batch(**{**vars(no_points_all), "gt_boxes": [torch.zeros(0, 9)] * 2,
                     "gt_labels": [torch.zeros(0, dtype=torch.long)] * 2})
    losses = train_model.loss(no_gt).losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    with pytest.raises(ValueError, match="lidar2img"):
        model.predict(Batch(**{**vars(base), "lidar2img": None}))


def test_loss_returns_the_aqr_monitor_signals_only_when_asked(tiny_model, tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny_aqr").model).train()
    batch = synthetic_batch(tiny_cfg, num_boxes=(3, 2), seed=2)
    plain = model.loss(batch)
    assert plain.monitor is None and {"loss_cls", "loss_bbox"} <= set(plain.losses)
    monitored = model.loss(batch, monitor=True)
    assert len(monitored.monitor) == 40 and all(isinstance(v, float) and v == v for v in monitored.monitor.values())
    assert 0.0 < monitored.monitor["bev_map_mean"] and monitored.losses.keys() == plain.losses.keys()
    assert not model.pts_bbox_head.aqr.monitor_this_step      # the next forward (e.g. an evaluation) is not monitored
    assert save_png(render_aqr(model.pts_bbox_head.aqr.monitor.last_view), tmp_path / "maps.png").is_file()
    assert copy.deepcopy(tiny_model).train().loss(batch, monitor=True).monitor is None   # no AQR: nothing to monitor


def test_frozen_modules_keep_their_batchnorm_in_eval_through_train(tiny_cfg):
    model = build_model(tiny_cfg)
    model.freeze(["img_backbone", "pts_backbone"])
    model.eval()
    model.train()
    frozen_bn = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 and n.startswith(("img_backbone.", "pts_backbone."))]
    other_bn = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                and n.startswith(("img_neck.", "pts_neck."))]
    assert frozen_bn and other_bn and not any(m.training for m in frozen_bn) and all(m.training for m in other_bn)
    assert not any(p.requires_grad for p in model.img_backbone.parameters())
    assert all(p.requires_grad for p in model.img_neck.parameters())
    before = [m.running_mean.clone() for m in frozen_bn]
    model.loss(synthetic_batch(tiny_cfg, num_boxes=(2, 1), seed=5))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen_bn, before))
    assert any(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in other_bn)


@pytest.mark.parametrize("branch", ["lidar", "camera"])
def test_single_modality_tiny_models(tiny_cfg, branch):
    cfg = copy.deepcopy(tiny_cfg)
    if branch == "lidar":
        cfg.camera.enabled, cfg.head.final_kernel = False, 3
    else:
        cfg.lidar.enabled = False
    model = build_model(cfg)
    names = {name for name, _ in model.named_children()}
    assert ("pts_middle_encoder" in names) == (branch == "lidar")
    assert ("img_backbone" in names) == (branch == "camera")
    batch = synthetic_batch(cfg, num_boxes=(2, 0), seed=4)
    model.train()
    losses = model.loss(batch).losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        _check_detections(model.predict(batch), 2)
        if branch == "lidar":
            empty = Batch(**{**vars(batch), "points": [torch.zeros(0, 5), torch.zeros(0, 5)]})
            _check_detections(model.predict(empty), 2)


@pytest.mark.slow
def test_tiny_overfits_one_sample(tiny_cfg, capsys):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).train()
    batch = synthetic_batch(tiny_cfg, batch_size=1, num_boxes=(4,), seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(OVERFIT_STEPS):
        total = sum(model.loss(batch).losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    with capsys.disabled():
        print(f"\n  overfit: total loss {history[0]:.2f} -> {min(history[-5:]):.3f} in {OVERFIT_STEPS} steps", end="")
    assert all(torch.isfinite(torch.tensor(history)))
    assert min(history[-5:]) < history[0] / 10, f"loss {history[0]:.3f} -> {history[-1]:.3f}: did not fall 10x"


# ------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------
def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_compiled_lidar_dense_part_matches_eager_without_recompiling(tiny_model, tiny_cfg):
    """SECOND + SECONDFPN compiled in place; two batches with different voxel counts reuse one graph."""
    torch._dynamo.reset()
    model = copy.deepcopy(tiny_model).eval()
    eager_backbone, eager_neck = copy.deepcopy(model.pts_backbone), copy.deepcopy(model.pts_neck)
    model.pts_backbone.compile()
    model.pts_neck.compile()
    batches = [synthetic_batch(tiny_cfg, num_boxes=(5, 3), seed=5),
               synthetic_batch(tiny_cfg, num_boxes=(1, 8), num_ground_points=300, seed=6)]
    graphs = []
    with torch.no_grad():
        for batch in batches:
            bev = model.sparse_bev(batch.points)
            compiled = model.pts_neck(model.pts_backbone(bev))
            torch.testing.assert_close(compiled, eager_neck(eager_backbone(bev)), atol=1e-4, rtol=1e-4)
            graphs.append(_compiled_graphs())
    assert graphs[0] >= 1 and graphs[1] == graphs[0], f"recompiled: graph counts {graphs}"
    assert list(model.state_dict()) == list(tiny_model.state_dict())   # in-place compile keeps the keys


@pytest.mark.slow
def test_compile_dense_whole_detector_trains_without_recompiling(tiny_cfg):
    """compile_dense() on the tiny fusion model: eager == compiled, and batches with different voxel and GT
    counts (same GT bucket) reuse the compiled graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(tiny_cfg).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_dense()
    batches = [synthetic_batch(tiny_cfg, num_boxes=(5, 3), seed=7),
               synthetic_batch(tiny_cfg, num_boxes=(2, 7), num_ground_points=300, seed=8)]
    graphs = []
    for batch in batches:
        torch.manual_seed(1)                     # same denoising noise (drawn eagerly, outside the graphs)
        expected = eager.loss(batch).losses
        torch.manual_seed(1)
        actual = compiled.loss(batch).losses
        graphs.append(_compiled_graphs())
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-3, rtol=1e-3,
                                       msg=lambda message: f"{name}: {message}")
    assert graphs[1] == graphs[0], f"recompiled: graph counts {graphs}"
