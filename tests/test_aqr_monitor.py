"""Health-monitor signals on known inputs, alarm messages and map images."""
import torch

from aqrcmt.config import AQRModulateConfig, AQRMonitorConfig
from aqrcmt.eval.visualize import render_aqr, save_png
from aqrcmt.models.aqr.modulate import modulate_features
from aqrcmt.models.aqr.monitor import (AQRView, HealthMonitor, camera_map_signals, map_signals, modulation_signals,
                                       weight_signals)
from aqrcmt.training.alarms import check_aqr_signals


def find_alarms(stats, cfg):
    """The alarm lines (level "alarm") of one step's signals."""
    return [a.line() for a in check_aqr_signals(stats, cfg, step=1) if a.level == "alarm"]


def test_signals_on_known_inputs():
    x = torch.full((2, 3, 4, 5), 2.0)
    w = torch.full((2, 4, 5), 0.5)
    out, stats = modulate_features(x, w, AQRModulateConfig(residual_form="additive", residual_weight=0.7),
                                   return_stats=True)
    signals = {k: float(v) for k, v in modulation_signals("bev", x, stats, out).items()}
    # out = 2 * (0.5 + 0.7) = 2.4 everywhere
    assert abs(signals["bev_relative_change"] - 0.2) < 1e-6
    assert abs(signals["bev_energy_retention"] - 1.44) < 1e-5
    assert abs(signals["bev_modulated_mean"] - 2.4) < 1e-5
    assert signals["bev_modulated_std"] < 1e-3
    assert abs(signals["bev_modulated_rms"] - 2.4) < 1e-5 and abs(signals["bev_mean_change"] - 0.4) < 1e-5
    assert abs(signals["bev_modulated_min"] - 2.4) < 1e-5 and abs(signals["bev_modulated_max"] - 2.4) < 1e-5
    weights = {k: float(v) for k, v in weight_signals("lidar", torch.tensor([[0.2, 0.4], [0.6, 0.8]])).items()}
    assert abs(weights["lidar_weight_mean"] - 0.5) < 1e-6 and abs(weights["lidar_weight_std"] - 0.05 ** 0.5) < 1e-6
    assert abs(weights["lidar_weight_min"] - 0.2) < 1e-6 and abs(weights["lidar_weight_max"] - 0.8) < 1e-6
    maps = {k: float(v) for k, v in map_signals("camera", torch.tensor([[0.0, 3.0], [1.0, 0.0]])).items()}
    assert maps == {"camera_map_mean": 1.0, "camera_map_max": 3.0}
    views = torch.full((1, 6, 2, 2), 0.4)
    views[:, 2] = 0.0                                   # one dark view is seen, not averaged away
    per_view = {k: float(v) for k, v in camera_map_signals(views).items()}
    assert per_view["cam_front_left_map_mean"] == 0.0 and abs(per_view["camera_map_mean"] - 1 / 3) < 1e-6
    assert abs(per_view["cam_back_right_map_max"] - 0.4) < 1e-6 and len(per_view) == 2 + 6 * 2


def test_alarms_name_signal_and_value():
    cfg = AQRMonitorConfig()
    healthy = {"bev_map_mean": 0.9, "bev_map_max": 1.0, "bev_relative_change": 0.1, "bev_modulated_rms": 0.3,
               "lidar_weight_mean": 0.8, "camera_weight_mean": 0.8}
    assert find_alarms(healthy, cfg) == []
    sick = dict(healthy, bev_map_mean=0.0101, bev_map_max=8.78, camera_relative_change=0.83,
                camera_modulated_rms=0.004, lidar_weight_mean=0.15, camera_modulated_mean=-0.001)
    alarms = find_alarms(sick, cfg)
    assert len(alarms) == 5
    assert any("bev_map_mean = 0.0101 < 0.2" in a for a in alarms)
    assert any("bev_map_max = 8.78 > 2" in a for a in alarms)
    assert any("camera_relative_change = 0.83 > 0.5" in a for a in alarms)
    assert any("camera_modulated_rms = 0.004 < 0.01" in a for a in alarms)   # the mean of signed features: no alarm
    assert any("lidar_weight_mean = 0.15 < 0.2" in a for a in alarms)


def test_record_and_images(tmp_path):
    monitor = HealthMonitor()
    bev, cams = torch.rand(2, 12, 12) * 0.1, torch.rand(2, 6, 4, 10)
    stats = monitor.record({**map_signals("bev", bev), **map_signals("camera", cams)}, bev, cams)
    assert set(stats) == {"bev_map_mean", "bev_map_max", "camera_map_mean", "camera_map_max"}
    assert all(isinstance(v, float) for v in stats.values())
    assert any("bev_map_mean" in a for a in find_alarms(stats, AQRMonitorConfig()))
    path = save_png(render_aqr(monitor.last_view), tmp_path / "step_00000010.png")
    assert path.suffix == ".png" and path.stat().st_size > 1000
    assert save_png(render_aqr(AQRView(bev[0], cams[0]), title="t"), tmp_path / "b.png").exists()
