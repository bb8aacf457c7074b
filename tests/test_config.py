"""Config validation: every out-of-range value is a ConfigError naming its full dotted key."""
from __future__ import annotations

import json
import re

import pytest

from aqrcmt.config import ConfigError, HeadConfig
from aqrcmt.presets import get_preset, list_presets, load_config

BAD_VALUES = [
    ("train.log_every_steps", "0"),
    ("train.checkpoint_every_steps", "-1"),
    ("train.eval_every_epochs", "-1"),
    ("train.epochs", "0"),
    ("train.max_steps", "-1"),
    ("train.keep_last", "-1"),
    ("train.max_nonfinite_steps", "0"),
    ("data.num_workers", "-1"),
    ("data.batch_size", "0"),
    ("data.sweeps", "0"),
    ("data.augment.global_rot_range", "[0.5, -0.5]"),
    ("data.augment.global_scale_range", "[1.1, 0.9]"),
    ("data.augment.global_scale_range", "[0.0, 0.0]"),
    ("data.augment.image_resize_range", "[-0.2, 0.3]"),
    ("data.augment.global_translation_std", "-0.1"),
    ("data.augment.gt_paste_until_epoch", "-1"),
    ("model.head.dropout", "1.0"),
    ("model.head.dropout", "-0.1"),
    ("model.head.num_query", "0"),
    ("model.head.num_layers", "0"),
    ("model.head.num_heads", "0"),
    ("model.head.hidden_dim", "0"),
    ("model.head.hidden_dim", "66"),              # not divisible by num_heads = 4
    ("model.head.focal_alpha", "1.5"),
    ("model.head.code_weights", "[1, 1]"),
    ("model.head.final_kernel", "2"),
    ("model.head.heading_axis_weight", "-1"),
    ("model.head.bev_heading_weight", "-0.5"),
    ("model.lidar.voxel.voxel_size", "[0.1, 0.0, 0.2]"),
    ("model.lidar.voxel.point_cloud_range", "[54, -54, -5, -54, 54, 3]"),
    ("model.lidar.voxel.max_points_per_voxel", "0"),
    ("model.lidar.sparse_shape", "[41, 0, 160]"),
    ("model.camera.image_size", "[100, 352]"),
    ("model.camera.grid_mask_prob", "1.5"),
    ("optim.lr", "0"),
    ("optim.betas", "[0.9, 1.0]"),
    ("optim.betas", "[-0.1, 0.999]"),
    ("optim.weight_decay", "-0.01"),
    ("optim.grad_clip", "-1"),
    ("optim.grad_accumulation", "0"),
    ("optim.warmup_steps", "-1"),
    ("optim.min_lr_ratio", "2"),
    ("optim.cyclic_step_ratio_up", "1.0"),
    ("optim.lr_mults.img_backbone", "-1"),
    ("model.aqr.monitor.interval", "0"),
    ("model.aqr.monitor.image_interval", "0"),
    ("model.aqr.monitor.map_mean_min", "-0.1"),
    ("train.health.loss_max", "-1"),
    ("train.health.loss_window_steps", "-1"),
    ("train.health.on_alarm", "pause"),
    ("model.aqr.render.clamp_max", "0"),
    ("model.aqr.render.sigma_bev", "0"),
    ("model.aqr.render.threshold", "-0.01"),
    ("model.aqr.generator.dropout", "1.0"),
    ("model.aqr.generator.num_heads", "0"),
    ("model.aqr.generator.camera_window", "4"),
    ("model.aqr.modulate.residual_weight", "-0.5"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_out_of_range_value_names_its_full_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config("tiny_aqr", [f"{key}={value}"])


def test_convex_residual_weight_must_lie_in_0_1():
    with pytest.raises(ConfigError, match=r"'model\.aqr\.modulate\.residual_weight'"):
        load_config("tiny_aqr", ["model.aqr.modulate.residual_form=convex", "model.aqr.modulate.residual_weight=1.5"])
    additive = load_config("tiny_aqr", ["model.aqr.modulate.residual_weight=1.5"])  # x*w + 1.5x is allowed
    assert additive.model.aqr.modulate.residual_weight == 1.5


def test_switch_off_values_stay_valid():
    cfg = load_config("tiny", ["train.keep_last=0", "train.eval_every_epochs=0", "train.checkpoint_every_steps=0",
                               "train.max_steps=0", "optim.grad_clip=0", "model.aqr.render.clamp_max=none",
                               "data.augment.global_rot_range=[0, 0]"])
    assert cfg.train.keep_last == 0 and cfg.model.aqr.render.clamp_max is None


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    assert get_preset(name).name == name


def test_section_validated_on_its_own_names_its_default_path():
    with pytest.raises(ConfigError, match=r"'model\.head\.dropout'"):
        HeadConfig(dropout=1.0).validate()


def test_json_file_that_is_not_an_object_names_the_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: expected a JSON object, got list")):
        load_config(str(path))


def test_json_file_with_a_bad_value_names_the_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"log_every_steps": 0}}))
    with pytest.raises(ConfigError, match=r"'train\.log_every_steps'"):
        load_config(str(path))


def test_health_levels_moved_to_train_health_and_the_old_keys_name_the_new_ones(tmp_path):
    cfg = load_config("tiny", ["train.health.loss_max=5", "train.health.on_alarm=stop"])
    assert cfg.train.health.loss_max == 5.0 and cfg.train.health.on_alarm == "stop"
    with pytest.raises(ConfigError, match=r"'model\.aqr\.monitor\.loss_max' moved to 'train\.health\.loss_max'"):
        load_config("tiny", ["model.aqr.monitor.loss_max=5"])
    old = get_preset("tiny").to_dict()
    old["model"]["aqr"]["monitor"]["on_alarm"] = old["train"].pop("health")["on_alarm"]
    path = tmp_path / "old_config.json"
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"'model\.aqr\.monitor\.on_alarm' moved to 'train\.health\.on_alarm'"):
        load_config(str(path))
