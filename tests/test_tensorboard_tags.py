"""TensorBoard tags of a monitored training step: every AQR signal and the AQR maps' picture in one section
(``aqr/...``), apart from the loss terms and the optimizer's scalars."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aqrcmt.data.synthetic_batch import synthetic_batch
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.training.loop import ThroughputWindow, log_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_monitored_step_logs_every_aqr_signal_and_the_maps_under_aqr(tmp_path: Path) -> None:
    cfg = load_config("tiny_aqr", ["train.tracker=tensorboard"])
    torch.manual_seed(0)
    detector = build_model(cfg.model)
    output = detector.loss(synthetic_batch(cfg.model, batch_size=1, num_boxes=(3,)), monitor=True)
    scalars, images = {}, {}
    writer = SimpleNamespace(add_image=lambda tag, picture, step, dataformats: images.update({tag: picture}))
    accelerator = SimpleNamespace(is_main_process=True, reduce=lambda value, op: value,
                                  log=lambda values, step: scalars.update(values),
                                  get_tracker=lambda name, unwrap: writer)
    run = SimpleNamespace(accelerator=accelerator, cfg=cfg, progress=SimpleNamespace(step=1), total_steps=1,
                          schedule=SimpleNamespace(lr_factor=lambda: 1.0), detector=detector, run_dir=tmp_path)
    log_step(run, output, torch.tensor(1.0), ThroughputWindow(), SimpleNamespace(set_postfix=lambda **_: None))

    aqr = {tag for tag in scalars if tag.startswith("aqr/")}
    assert aqr == {f"aqr/{name}" for name in output.monitor}
    for signal in ("lidar_weight_mean", "camera_weight_std", "bev_map_mean", "camera_map_max", "cam_front_map_mean",
                   "cam_back_left_map_max", "bev_relative_change", "camera_energy_retention", "bev_modulated_rms"):
        assert f"aqr/{signal}" in aqr
    others = set(scalars) - aqr
    assert others == {f"loss/{k}" for k in output.losses} | {"loss/total", "lr", "grad_norm", "samples_per_s"}
    assert not any(name in tag for tag in others for name in output.monitor)   # no AQR signal outside the section
    assert list(images) == ["aqr/maps"] and images["aqr/maps"].dtype == np.uint8 and images["aqr/maps"].ndim == 3
    assert (tmp_path / "aqr_maps" / "step_00000001.png").is_file()
