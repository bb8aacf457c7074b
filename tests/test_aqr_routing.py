"""AQR that can route: identity start, sensor states from failures, router targets and loss, failure-aware
training data, training AQR alone."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aqrcmt.config import ConfigError
from aqrcmt.data.corruptions import SensorCorruption, draw_failure
from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.data.transforms import Sample, rot_scale_trans_matrix, transform_3d
from aqrcmt.models import build_model
from aqrcmt.models.aqr.routing import QueryRouting, RoutingEvidence, router_loss, routing_targets
from aqrcmt.presets import load_config
from aqrcmt.structures import (SENSOR_DEGRADED, SENSOR_DROPPED, SENSOR_INTACT, SensorState, SensorStates)

IDENTITY = ["model.aqr.identity_start=true"]


# ------------------------------------------------------------------------------------------------
# Identity start
# ------------------------------------------------------------------------------------------------
def test_identity_start_predicts_exactly_what_the_cmt_it_starts_from_predicts():
    torch.manual_seed(0)
    plain = build_model(load_config("tiny").model).eval()
    with_aqr = build_model(load_config("tiny_aqr_recommended", IDENTITY).model).eval()
    missing, unexpected = with_aqr.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("pts_bbox_head.aqr.") for k in missing)
    batch = synthetic_batch(load_config("tiny").model, seed=3)
    with torch.no_grad():
        expected, got = plain(batch), with_aqr(batch)
        for key in ("center", "height", "dim", "rot", "vel", "cls_logits"):
            assert (got[key] - expected[key]).abs().max() <= 1e-6, key
        assert torch.equal(got["aqr_routing"].lidar_weight, torch.ones_like(got["aqr_routing"].lidar_weight))
        # without identity start the same weights change the output (the comparison is not vacuous)
        other = build_model(load_config("tiny_aqr_recommended").model).eval()
        other.load_state_dict(plain.state_dict(), strict=False)
        assert (other(batch)["cls_logits"] - expected["cls_logits"]).abs().max() > 1e-4


def test_identity_start_generator_receives_gradient():
    cfg = load_config("tiny_aqr_recommended", IDENTITY)
    model = build_model(cfg.model).train()
    output = model.loss(synthetic_batch(cfg.model, seed=1))
    sum(output.losses.values()).backward()
    grad = model.pts_bbox_head.aqr.weight_generator.weight_predictor.weight.grad
    assert grad is not None and grad.abs().max() > 0


@pytest.mark.parametrize("override, key", [
    ("model.aqr.render.kernel_norm=sum", "model.aqr.render.kernel_norm"),
    ("model.aqr.modulate.residual_form=additive", "model.aqr.modulate.residual_form"),
    ("model.aqr.generator.activation=tanh", "model.aqr.generator.activation"),
    ("model.aqr.render.normalize=max_per_map", "model.aqr.render.normalize"),
    ("model.aqr.render.fill=0.5", "model.aqr.render.fill"),
])
def test_identity_start_refuses_a_renderer_it_cannot_make_the_identity(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_aqr_recommended", [*IDENTITY, override])


def test_router_supervision_and_identity_start_need_aqr():
    with pytest.raises(ConfigError, match=r"model\.aqr\.router_loss_weight"):
        load_config("tiny", ["model.aqr.router_loss_weight=1.0"])
    with pytest.raises(ConfigError, match=r"model\.aqr\.identity_start"):
        load_config("tiny", IDENTITY)
    with pytest.raises(ConfigError, match=r"optim\.train_only_aqr"):
        load_config("tiny", ["optim.train_only_aqr=true"])


# ------------------------------------------------------------------------------------------------
# Router targets and loss
# ------------------------------------------------------------------------------------------------
def _routing(xy: list[tuple[float, float]], visible: list[list[bool]], weight: float = 0.5) -> QueryRouting:
    q = len(xy)
    return QueryRouting(torch.full((1, q), weight), torch.full((1, q), weight), torch.tensor([xy]),
                        torch.tensor([visible]))


def _states(**kwargs) -> SensorStates:
    return SensorStates.stack([SensorState(**kwargs)])


def test_targets_of_a_dropped_lidar_and_a_narrowed_field_of_view():
    routing = _routing([(0.0, 20.0), (20.0, 0.0), (0.0, -20.0)], [[True] + [False] * 5] * 3)
    intact = routing_targets(routing, _states())
    assert intact.lidar.tolist() == [[1, 1, 1]] and intact.lidar_known.all()
    dropped = routing_targets(routing, _states(lidar=SENSOR_DROPPED))
    assert dropped.lidar.tolist() == [[0, 0, 0]] and dropped.lidar_known.all()
    front = routing_targets(routing, _states(lidar_fov=math.radians(60)))     # front +y, +-60 deg
    assert front.lidar.tolist() == [[1, 0, 0]]
    degraded = routing_targets(routing, _states(lidar=SENSOR_DEGRADED))
    assert not degraded.lidar_known.any()


def test_targets_of_dropped_views_touch_only_their_queries():
    visible = [[True, False, False, False, False, False],     # only view 0
               [True, True, False, False, False, False],      # views 0 and 1
               [False] * 6]                                   # no camera
    routing = _routing([(0.0, 10.0)] * 3, visible)
    views = np.zeros(6, np.int8)
    views[0] = SENSOR_DROPPED
    targets = routing_targets(routing, _states(views=views))
    assert targets.camera.tolist() == [[0, 1, 0]] and targets.camera_known.tolist() == [[True, True, False]]
    all_dropped = routing_targets(routing, _states(views=np.full(6, SENSOR_DROPPED, np.int8)))
    assert all_dropped.camera.tolist() == [[0, 0, 0]] and all_dropped.camera_known.all()


def test_router_loss_and_evidence():
    routing = _routing([(0.0, 10.0)] * 2, [[True] + [False] * 5] * 2, weight=0.25)
    assert router_loss(routing, _states()) == pytest.approx(0.75 ** 2)
    assert router_loss(routing, _states(lidar=SENSOR_DROPPED, views=np.full(6, SENSOR_DROPPED, np.int8))) == \
        pytest.approx(0.25 ** 2)
    evidence = RoutingEvidence()
    evidence.add(routing, _states(lidar=SENSOR_DROPPED))
    evidence.add(_routing([(0.0, 10.0)], [[True] + [False] * 5], weight=0.75), _states())
    summary = evidence.summary()
    assert summary["lidar_failed"] == pytest.approx(0.25) and summary["lidar_intact"] == pytest.approx(0.75)
    assert summary["camera_failed"] is None and summary["camera_intact_count"] == 3


def test_router_loss_is_a_training_term_only_when_configured():
    cfg = load_config("tiny_aqr_recommended", ["model.aqr.router_loss_weight=2.0"])
    batch = synthetic_batch(cfg.model, seed=2)
    batch.sensors = SensorStates.stack([SensorState(lidar=SENSOR_DROPPED), SensorState()])
    losses = build_model(cfg.model).train().loss(batch).losses
    assert losses["loss_router"] > 0
    assert "loss_router" not in build_model(load_config("tiny_aqr_recommended").model).train().loss(batch).losses


# ------------------------------------------------------------------------------------------------
# Sensor states from failures, and the 3-D augmentations
# ------------------------------------------------------------------------------------------------
def _sample(images: bool = True) -> Sample:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(-30, 30, (500, 3)), np.zeros((500, 2))], axis=1).astype(np.float32)
    sample = Sample(token="t", points=points, gt_boxes=np.zeros((0, 9)), gt_labels=np.zeros(0, np.int64),
                    lidar2global=np.eye(4))
    if images:
        sample.images = np.full((6, 8, 8, 3), 100, np.uint8)
        sample.intrinsics, sample.lidar2cam = np.tile(np.eye(4), (6, 1, 1)), np.tile(np.eye(4), (6, 1, 1))
    return sample


def test_failures_record_what_failed():
    lidar = SensorCorruption("lidar_drop", 1)(_sample(), frames=None)
    assert lidar.sensors.lidar == SENSOR_DROPPED and not (lidar.sensors.views != SENSOR_INTACT).any()
    views = SensorCorruption("view_drop", 3)(_sample(), frames=None)
    dropped = views.sensors.views == SENSOR_DROPPED
    assert dropped.sum() == 3 and not views.images[dropped].any() and views.images[~dropped].all()
    fov = SensorCorruption("limited_fov", 2)(_sample(), frames=None)
    assert fov.sensors.lidar == SENSOR_INTACT and fov.sensors.lidar_fov == pytest.approx(math.radians(60))
    weather = SensorCorruption("points_reduction", 1)(_sample(), frames=None)
    assert weather.sensors.lidar == SENSOR_DEGRADED


def test_the_lidar_front_turns_with_the_sample():
    sample = _sample(images=False)
    transform_3d(sample, rot_scale_trans_matrix(math.pi / 2, 1.05, np.zeros(3)))   # +y turns to -x
    assert np.allclose(sample.sensors.lidar_front, [-1.0, 0.0])


def test_draw_failure_honours_the_probabilities():
    rng = np.random.default_rng(0)
    draws = [draw_failure({"lidar_drop": 0.3, "view_drop": 0.2}, rng) for _ in range(4000)]
    names = [d.name if d else None for d in draws]
    assert abs(names.count("lidar_drop") / 4000 - 0.3) < 0.03 and abs(names.count("view_drop") / 4000 - 0.2) < 0.03
    assert {d.severity for d in draws if d} == {1, 2, 3}
    assert draw_failure({}, rng) is None


@pytest.mark.parametrize("override, match", [
    ("data.augment.failures={\"sensor_fire\": 0.1}", r"data\.augment\.failures\.sensor_fire.*unknown"),
    ("data.augment.failures={\"lidar_drop\": 1.5}", r"data\.augment\.failures\.lidar_drop.*\[0, 1\]"),
    ("data.augment.failures={\"lidar_drop\": 0.6, \"view_drop\": 0.6}", r"data\.augment\.failures.*sum"),
])
def test_failure_probabilities_are_validated(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_failure_aware_training_data_carries_the_sensor_state(synthetic_root: Path):
    from aqrcmt.data import build_dataloader

    cfg = load_config("tiny", [f"data.root={synthetic_root}", "data.augment.failures={\"view_drop\": 1.0}",
                               "data.batch_size=2"])
    batch = next(iter(build_dataloader(cfg, cfg.data.train_split, train=True)))
    dropped = batch.sensors.views == SENSOR_DROPPED
    assert dropped.any(dim=1).all() and (batch.sensors.lidar == SENSOR_INTACT).all()
    black = batch.images[dropped].flatten(2)                                       # (n, 3, H * W)
    assert torch.allclose(black.std(dim=2), torch.zeros(len(black), 3), atol=1e-5)  # one colour per channel


# ------------------------------------------------------------------------------------------------
# Training AQR alone
# ------------------------------------------------------------------------------------------------
def test_train_only_aqr_freezes_everything_else():
    from aqrcmt.training.optim import freeze_and_build_optimizer

    cfg = load_config("tiny_aqr_recommended", ["optim.train_only_aqr=true"])
    model = build_model(cfg.model)
    optimizer = freeze_and_build_optimizer(model, cfg.optim)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in trained) == name.startswith("pts_bbox_head.aqr."), name
    model.train()
    norms = [m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
