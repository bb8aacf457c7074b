"""`aqrcmt diagnose` reproduces the fork training report's observation (map mean ~0.01) and writes the map images."""
import pytest
import torch

from aqrcmt.cli import main
from aqrcmt.models.aqr.diagnose import measure, random_scene, reference_settings, ring_lidar2img
from aqrcmt.presets import get_preset


@pytest.fixture(scope="module")
def vov_scene():
    cfg = get_preset("cmt_aqr_voxel0075_vov_1600x640_cbgs")
    return cfg, random_scene(cfg, num_queries=900, batch=1, weight_mean=0.45, weight_std=0.1, seed=0,
                             device=torch.device("cpu"))


def test_fork_clamp_settings_render_a_map_mean_of_about_001(vov_scene):
    cfg, scene = vov_scene
    settings = {stem: (render, modulate) for _, stem, render, modulate in reference_settings(cfg)}
    clamped = measure(scene, *settings["fork_clamp"])[0]
    fix = measure(scene, *settings["report_clamp_fix"])[0]
    assert abs(clamped["lidar_weight_mean"] - 0.45) < 0.01
    assert 0.008 < clamped["bev_map_mean"] < 0.012                    # the report's 0.008 - 0.020
    assert 0.008 < fix["bev_map_mean"] < 0.013                        # sigma 1 + clamp does not fix it
    assert clamped["bev_relative_change"] > 0.25                      # out ~ x (w + 0.7): a global attenuation
    recommended = get_preset("cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs").model.aqr
    rec = measure(scene, recommended.render, recommended.modulate)[0]
    assert abs(rec["bev_map_mean"] - rec["lidar_weight_mean"]) < 0.05  # the map keeps the weights' magnitude
    assert rec["bev_map_max"] <= 1.0 + 1e-5


def test_invisible_queries_piled_at_origin_explain_large_camera_maxima(vov_scene):
    """Each query no camera sees adds its kernel peak (0.0399 w at sigma 2) to pixel (0, 0) of view 0."""
    cfg, scene = vov_scene
    settings = {stem: (render, modulate) for _, stem, render, modulate in reference_settings(cfg)}
    piled = measure(scene, *settings["fork_piled_at_origin"])
    skipped = measure(scene, *settings["fork_clamp"])
    invisible = ~scene.cameras.valid.any(-1)
    peak = 1.0 / float(torch.exp(-torch.arange(-6.0, 7.0) ** 2 / (2 * 2.0 ** 2)).sum()) ** 2   # 13x13 unit-mass, sigma 2
    expected = float((scene.camera_weights * invisible).sum()) * peak
    assert invisible.sum() > 10
    assert abs(piled[2][0, 0, 0, 0].item() - expected) < 0.05 * expected + 0.05
    assert piled[0]["camera_map_max"] > 2 * skipped[0]["camera_map_max"]


def test_ring_cameras_see_most_queries(vov_scene):
    _, scene = vov_scene
    assert ring_lidar2img((640, 1600), 2).shape == (2, 6, 4, 4)
    assert scene.cameras.valid.any(-1).float().mean() > 0.9


def test_cli_prints_the_table_and_writes_pngs(tmp_path, capsys):
    assert main(["diagnose", "--config", "tiny_aqr", "--out", str(tmp_path), "--num-queries", "100"]) == 0
    text = capsys.readouterr().out
    assert "fork clamped: sum, s2, thr .01, clamp 1.5" in text and "normalized s2 convex" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["maps_config.png", "maps_fork_clamp.png", "maps_fork_max_normalized.png",
                     "maps_fork_piled_at_origin.png", "maps_report_clamp_fix.png"]
    capsys.readouterr()
    assert main(["diagnose", "--config", "tiny_aqr", "--checkpoint", "x.safetensors"]) == 2
    assert "error: --checkpoint and --root go together" in capsys.readouterr().err


def test_cli_applies_set_overrides_and_prints_the_alarms_of_the_settings(tmp_path, capsys):
    common = ["diagnose", "--config", "tiny_aqr", "--out", str(tmp_path), "--num-queries", "100", "--no-sweep"]
    assert main(common) == 0       # 100 queries x 0.45 on a 64 x 64 map with a unit-mass kernel: mean ~0.01
    assert "alarm: bev_map_mean = " in capsys.readouterr().out
    assert main([*common, "--set", "model.aqr.monitor.map_mean_min=0.001", "model.aqr.monitor.map_mean_band=none"]) == 0
    assert "bev_map_mean" not in capsys.readouterr().out.split("health checks")[1]
    assert main([*common, "--set", "model.aqr.render.sigma=2"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'model.aqr.render.sigma'")


@pytest.mark.slow
def test_cli_with_a_checkpoint_and_data(synthetic_root, tmp_path, capsys):
    """Real queries: the AQR step's inputs are captured from the model on a synthetic sample."""
    from safetensors.torch import save_file

    from aqrcmt.models import build_model

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(get_preset("tiny").model).state_dict().items()}, weights)
    assert main(["diagnose", "--config", "tiny_aqr", "--checkpoint", str(weights), "--root", str(synthetic_root),
                 "--out", str(tmp_path / "maps"), "--no-sweep"]) == 0
    text = capsys.readouterr().out
    assert f"model: {weights}" in text and "AQR tensors are not in" in text
    assert (tmp_path / "maps" / "maps_config.png").exists()
