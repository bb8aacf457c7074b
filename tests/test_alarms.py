"""Training-health alarms: loss and mAP checks on scripted histories, AQR checks on the report's and the
recommended settings, delivery, and a tiny run that stops on the map-mean alarm and resumes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from aqrcmt.config import AQRModulateConfig, AQRMonitorConfig, AQRRenderConfig, HealthConfig
from aqrcmt.models.aqr.diagnose import measure, random_scene, reference_settings
from aqrcmt.presets import load_config
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.alarms import (AlarmDelivery, LossTrend, check_aqr_signals, check_evaluations, read_alarms)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.log_every_steps=1",
         "train.eval_every_epochs=0", "train.keep_last=0", "data.batch_size=2", "train.tracker=none"]


def test_loss_above_its_level_and_not_decreasing_over_the_window():
    trend = LossTrend(HealthConfig(loss_max=10.0, loss_window_steps=8))
    falling = [trend.check(step, 9.0 - 0.5 * step) for step in range(1, 13)]
    assert all(a == [] for a in falling)
    flat = [a for step in range(13, 25) for a in trend.check(step, 3.0 + 0.01 * (step % 2))]
    # steps 12..20: the loss fell to 3.0 at step 12 and stayed there; one verdict, then a new window starts
    assert [a.meaning for a in flat] == ["loss not decreasing"] and flat[0].step == 20
    assert [a.signal for a in trend.check(25, 12.5)] == ["loss/total"]                     # 12.5 > 10
    assert LossTrend(HealthConfig(loss_max=None, loss_window_steps=0)).check(1, 1e6) == []


def test_map_and_nds_alarms_on_evaluation_histories():
    cfg = HealthConfig()
    history = [{"step": 100, "epoch": 1, "mAP": 0.30, "NDS": 0.40}]
    assert check_evaluations(history, cfg) == []                   # mAP 0.30 before epoch 3: no alarm
    history.append({"step": 200, "epoch": 2, "mAP": 0.135, "NDS": 0.31})   # the report's epoch 2
    assert [(a.signal, a.step) for a in check_evaluations(history, cfg)] == [("val/NDS", 200)]
    history.append({"step": 300, "epoch": 3, "mAP": 0.35, "NDS": 0.45})
    alarms = check_evaluations(history, cfg)
    assert [a.signal for a in alarms] == ["val/mAP"] and "0.35 < 0.4" in alarms[0].line()
    history.append({"step": 500, "epoch": 5, "mAP": 0.62, "NDS": 0.66})
    assert check_evaluations(history, cfg) == []
    assert check_evaluations(history[:3], dataclasses.replace(cfg, val_map_min=None, val_nds_must_rise=False)) == []


def test_the_reports_clamp_settings_raise_the_map_mean_alarm_and_the_recommended_ones_none():
    cfg = load_config("cmt_aqr_voxel0075_vov_1600x640_cbgs")     # the full-size maps: 900 queries on 180 x 180
    scene = random_scene(cfg, num_queries=900, batch=1, weight_mean=0.45, weight_std=0.1, seed=0,
                         device=torch.device("cpu"))
    monitor = AQRMonitorConfig()
    _, _, report_render, report_modulate = next(r for r in reference_settings(cfg) if r[1] == "report_clamp_fix")
    sick = check_aqr_signals(measure(scene, report_render, report_modulate)[0], monitor, step=1)
    assert {"bev_map_mean", "camera_map_mean", "cam_front_map_mean"} <= {a.signal for a in sick if a.level == "alarm"}
    recommended = load_config("tiny_aqr_recommended").model.aqr
    assert recommended.render == AQRRenderConfig(kernel_norm="normalized", sigma_bev=2.0, sigma_camera=2.0,
                                                 threshold=0.0, clamp_max=None, fill=1.0)
    assert recommended.modulate == AQRModulateConfig(residual_form="convex", residual_weight=0.5)
    stats = measure(scene, recommended.render, recommended.modulate)[0]
    assert abs(stats["camera_modulated_mean"]) < 0.01          # signed features: the old mean criterion would fire
    assert [a for a in check_aqr_signals(stats, monitor, step=1) if a.level == "alarm"] == []


def test_delivery_prints_one_line_writes_jsonl_and_counts(tmp_path):
    alarms = check_aqr_signals({"bev_map_mean": 0.01, "bev_relative_change": 0.4}, AQRMonitorConfig(), step=7)
    lines, scalars, texts = [], [], []
    delivery = AlarmDelivery(tmp_path / "alarms.jsonl", active=True, print_line=lines.append,
                             log_scalars=lambda v, s: scalars.append((v, s)), log_text=lambda t, x, s: texts.append(s))
    delivery.deliver(alarms)
    assert lines == ["alarm at step 7: bev_map_mean = 0.01 < 0.2 (weight map too weak: features mostly scaled by "
                     "the residual)",
                     "notice at step 7: bev_relative_change = 0.4 outside [0.15, 0.3] (relative change left the "
                     "report's healthy band)"]
    assert read_alarms(tmp_path / "alarms.jsonl") == alarms
    assert scalars == [({"health/alarms": 1.0, "health/notices": 1.0}, 7)] and texts == [7]
    silent = AlarmDelivery(tmp_path / "other.jsonl", active=False, print_line=lines.append)
    silent.deliver(alarms)
    assert len(lines) == 2 and not (tmp_path / "other.jsonl").exists()


def test_a_notice_prints_once_per_signal_and_epoch_an_alarm_every_time(tmp_path):
    """The notice rule: a signal outside its band prints at its first step in an epoch; alarms.jsonl keeps all."""
    lines = []
    delivery = AlarmDelivery(tmp_path / "alarms.jsonl", active=True, print_line=lines.append)
    for epoch, step in [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5)]:
        delivery.deliver(check_aqr_signals({"bev_map_mean": 0.01, "bev_relative_change": 0.4,
                                            "camera_relative_change": 0.5}, AQRMonitorConfig(), step=step), epoch)
    notices = [line for line in lines if line.startswith("notice")]
    assert [line.split(":")[0] for line in notices] == ["notice at step 1", "notice at step 1", "notice at step 4",
                                                        "notice at step 4"]
    assert notices[0].endswith("; not printed again in epoch 0 (all in alarms.jsonl)")
    assert sum(line.startswith("alarm") for line in lines) == 5
    assert len(read_alarms(tmp_path / "alarms.jsonl")) == 15


def _train_main(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(REPO / "train" / "main.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_the_map_mean_alarm_stops_a_run_at_its_first_monitored_step_and_resume_continues(synthetic_root, tmp_path):
    from train.main import main
    from aqrcmt.training.loop import TrainOptions, train

    run = tmp_path / "run"
    overrides = [f"data.root={synthetic_root}", f"train.output_dir={run}", *SMALL, "train.epochs=1",
                 "train.max_steps=2", "model.aqr.monitor.interval=1"]
    code = main(["--config", "tiny_aqr", "--set", *overrides, "train.health.on_alarm=stop"])
    assert code == 3
    alarms = read_alarms(run / "alarms.jsonl")
    assert any(a.signal == "bev_map_mean" and a.level == "alarm" and a.step == 1 for a in alarms)
    saved = run / "checkpoints" / ckpt.checkpoint_name(1)
    assert ckpt.resolve_resume(run, "latest") == saved
    resumed = train(load_config("tiny_aqr", overrides), TrainOptions(resume=str(saved)))
    assert resumed.progress.step == 2


def test_stop_message_names_the_alarm_step_and_checkpoint(synthetic_root, tmp_path):
    """Through the command line, and with 2 processes: each alarm line once, the stop reported once."""
    run = tmp_path / "run"
    args = ["--config", "tiny_aqr", "--no-compile", "--set", f"data.root={synthetic_root}",
            f"train.output_dir={run}", *SMALL, "data.batch_size=1", "train.epochs=1", "train.max_steps=2",
            "model.aqr.monitor.interval=1", "train.health.on_alarm=stop"]
    proc = _train_main(args, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("alarm at step", "notice at step"))]
    assert lines and len(lines) == len(set(lines)) == len(read_alarms(run / "alarms.jsonl"))
    assert any(line.startswith("alarm at step 1: bev_map_mean") for line in lines)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: training stopped")]
    assert len(errors) == 1 and "at step 1" in errors[0] and str(run / "checkpoints" / "step_00000001") in errors[0]
    assert json.loads((run / "alarms.jsonl").read_text().splitlines()[0])["step"] == 1
