"""Optimizer grouping/freezing, schedules and crash-safe checkpoints (no model or data needed)."""
from __future__ import annotations

import math
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from aqrcmt.config import ConfigError, OptimConfig
from aqrcmt.models.freezing import FreezableModule
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training.optim import freeze_and_build_optimizer, frozen_module_prefixes, group_parameters
from aqrcmt.training.schedule import Schedule


def _toy_detector() -> FreezableModule:
    m = FreezableModule()
    m.img_backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m.img_neck = nn.Conv2d(4, 4, 1)
    m.pts_bbox_head = nn.Module()
    m.pts_bbox_head.transformer = nn.Linear(4, 4)
    m.pts_bbox_head.task_heads = nn.Linear(4, 2)
    return m


def test_longest_prefix_wins_and_unknown_key_is_an_error():
    model = _toy_detector()
    cfg = OptimConfig(lr_mults={"pts_bbox_head": 0.5, "pts_bbox_head.task_heads": 0.8}, decay_mults={})
    groups = group_parameters(model, cfg)
    by_name = {n: key for key, spec in groups.items() for n in spec.names}
    assert by_name["pts_bbox_head.task_heads.weight"] == (0.8, 1.0)
    assert by_name["pts_bbox_head.transformer.weight"] == (0.5, 1.0)
    assert by_name["img_neck.weight"] == (1.0, 1.0)
    with pytest.raises(ConfigError, match="img_backbone2"):
        group_parameters(model, OptimConfig(lr_mults={"img_backbone2": 0.0}))


def test_zero_multiplier_freezes_module_and_keeps_its_batchnorm_in_eval():
    model = _toy_detector()
    cfg = OptimConfig(lr=1e-3, lr_mults={"img_backbone": 0.0, "img_neck": 0.1}, decay_mults={"img_neck": 5.0})
    opt = freeze_and_build_optimizer(model, cfg)
    assert not any(p.requires_grad for p in model.img_backbone.parameters())
    assert not model.train().img_backbone[1].training and model.img_neck.training
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.img_backbone.parameters())
    neck_group = next(g for g in opt.param_groups if any(p is model.img_neck.weight for p in g["params"]))
    assert neck_group["lr"] == pytest.approx(1e-4) and neck_group["weight_decay"] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="frozen"):
        freeze_and_build_optimizer(_toy_detector(), OptimConfig(lr_mults={"img_backbone": 0, "img_neck": 0,
                                                                          "pts_bbox_head": 0}))


def test_batchnorm_eval_keeps_statistics_while_weights_train():
    model = _toy_detector()
    model.pts_bbox_head.shared_conv = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    opt = freeze_and_build_optimizer(model, OptimConfig(lr_mults={}, batchnorm_eval=("pts_bbox_head",)))
    norm = model.pts_bbox_head.shared_conv[1]
    assert not model.train().pts_bbox_head.shared_conv[1].training and model.img_backbone[1].training
    norm(torch.randn(2, 4, 3, 3) * 5 + 3)
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
    assert any(norm.weight is p for g in opt.param_groups for p in g["params"])      # its affine weights train
    with pytest.raises(ConfigError, match="'optim.batchnorm_eval': 'pts_head' names no module"):
        freeze_and_build_optimizer(_toy_detector(), OptimConfig(lr_mults={}, batchnorm_eval=("pts_head",)))


def test_frozen_prefixes_are_the_zero_multipliers_and_nothing_trains_inside_them():
    cfg = OptimConfig(lr_mults={"img_backbone": 0.0, "pts_backbone": 0, "img_neck": 0.1})
    assert frozen_module_prefixes(cfg) == ["img_backbone", "pts_backbone"]
    with pytest.raises(ConfigError, match="'img_backbone.stage4' = 0.5 lies inside the frozen 'img_backbone'"):
        frozen_module_prefixes(OptimConfig(lr_mults={"img_backbone": 0.0, "img_backbone.stage4": 0.5}))


def test_cyclic_schedule_matches_the_released_policy():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-4, "base_lr": 1e-4}], lr=1e-4)
    sched = Schedule(opt, OptimConfig(lr=1e-4), total_steps=1000)
    lrs, betas = [], []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)
    assert max(lrs) == pytest.approx(8e-4, rel=1e-3) and int(torch.tensor(lrs).argmax()) in (399, 400)
    assert 1e-8 <= lrs[-1] < 2e-8  # the last step is 1/600 short of the end value
    assert min(betas) == pytest.approx(0.9 * 0.85 / 0.95, rel=1e-4)   # the released momentum range 0.85-0.95
    assert betas[-1] == pytest.approx(0.9, rel=1e-3)
    restored = Schedule(opt, OptimConfig(lr=1e-4), total_steps=1000)
    restored.load_state_dict({"step_count": 400, "total_steps": 1000})
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[400])


def test_cosine_schedule_warms_up_then_decays():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0, "base_lr": 1.0}], lr=1.0)
    sched = Schedule(opt, OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.01), 110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.01, abs=1e-3)
    assert math.isclose(lrs[60], 0.505, rel_tol=0.02)


def _write(run_dir, step, value, keep_last=2):
    progress = ckpt.TrainingProgress(step=step)
    return ckpt.write_checkpoint(run_dir, model_state={"w": torch.full((4,), float(value))},
                                 training_state={"optimizer": {}}, config_json="{}", progress=progress,
                                 keep_last=keep_last)


def test_checkpoints_latest_and_pruning(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003"]
    latest = ckpt.resolve_resume(tmp_path, "latest")
    tensors, state = ckpt.read_checkpoint(latest)
    assert torch.equal(tensors["w"], torch.full((4,), 3.0)) and state["progress"]["step"] == 3


def test_failed_write_keeps_previous_latest(tmp_path, monkeypatch):
    _write(tmp_path, 1, 1.0)

    def explode(obj, path):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "torch_save_atomic", explode)
    with pytest.raises(OSError):
        _write(tmp_path, 2, 2.0)
    latest = ckpt.resolve_resume(tmp_path, "latest")
    assert latest.name == "step_00000001"
    assert torch.equal(ckpt.read_checkpoint(latest)[0]["w"], torch.ones(4))


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_resume(tmp_path, "latest")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint directory"):
        ckpt.resolve_resume(tmp_path, str(tmp_path))


def test_sigkill_while_writing_never_breaks_latest(tmp_path):
    """A writer process is killed at several moments while writing large checkpoints; 'latest' always loads."""
    script = textwrap.dedent(f"""
        import torch, pathlib
        from aqrcmt.training import checkpointing as ckpt
        run = pathlib.Path({str(tmp_path)!r})
        step = 0
        while True:
            step += 1
            ckpt.write_checkpoint(run, model_state={{"w": torch.full((4_000_000,), float(step))}},
                                  training_state={{"optimizer": {{"x": torch.zeros(1_000_000)}}}}, config_json="{{}}",
                                  progress=ckpt.TrainingProgress(step=step), keep_last=2)
    """)
    latest_file = tmp_path / "checkpoints" / ckpt.LATEST
    for delay in (0.0, 0.4, 0.9):   # seconds after the writer's first complete checkpoint (mid-write moments)
        latest_file.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 120
        while not latest_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = ckpt.resolve_resume(tmp_path, "latest")
        tensors, state = ckpt.read_checkpoint(latest)
        step = state["progress"]["step"]
        assert torch.equal(tensors["w"], torch.full((4_000_000,), float(step)))


def test_every_process_rng_state_is_inside_the_checkpoint_and_evaluation_keeps_the_streams(tmp_path):
    torch.manual_seed(1)
    states = [ckpt.rng_state()]
    torch.rand(3)
    states.append(ckpt.rng_state())
    path = ckpt.write_checkpoint(tmp_path, model_state={"w": torch.zeros(1)}, training_state={}, config_json="{}",
                                 progress=ckpt.TrainingProgress(step=1), keep_last=0, rng_states=states)
    for rank in (0, 1):
        ckpt.set_rng_state(ckpt.read_rng_state(path, rank))
        expected = (torch.rand(2), np.random.rand(2), random.random())
        ckpt.set_rng_state(states[rank])
        assert torch.equal(torch.rand(2), expected[0])
        assert (np.random.rand(2) == expected[1]).all() and random.random() == expected[2]
    with pytest.raises(ckpt.CheckpointError, match=r"rng_rank2.pt is missing: .* of 2 process\(es\)"):
        ckpt.read_rng_state(path, 2)
    before = torch.get_rng_state()
    with ckpt.preserved_rng():
        torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
