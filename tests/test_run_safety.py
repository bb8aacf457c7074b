"""Run-directory safety and the checked resume: nothing of a run is lost or silently replaced.

A tiny 2-step run (mid-epoch end, evaluated at the end) is trained once per module; tests that change it work
on a copy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint.io import CheckpointError, torch_save_atomic
from aqrcmt.presets import load_config
from aqrcmt.training import checkpointing as ckpt
from aqrcmt.training import loop
from aqrcmt.training.loop import NonFiniteTrainingError, TrainOptions, ValidationSplitError, train
from aqrcmt.training.run_dir import RunDirectoryError, config_differences

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none",
         "train.eval_every_epochs=0", "train.keep_last=0", "data.batch_size=2", "train.max_steps=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"train.output_dir={out}", *SMALL, *extra]


def _config(root: Path, out: Path, *extra: str):
    return load_config("tiny", _overrides(root, out, *extra))


def _tree(root: Path) -> dict[str, str]:
    """Every file (relative path -> sha256) and directory under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _train_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("train_main", REPO / "train" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = train(_config(synthetic_root, out), TrainOptions())
    assert result.progress.step == 2 and (result.last_checkpoint / "metrics.json").is_file()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_a_relaunch_into_a_used_directory_is_refused_and_changes_nothing(finished_run, synthetic_root, capsys):
    before = _tree(finished_run)
    with pytest.raises(RunDirectoryError, match=r"already holds a run .*--resume.*--overwrite"):
        train(_config(synthetic_root, finished_run), TrainOptions())
    code = _train_main(["--config", "tiny", "--no-compile", "--set", *_overrides(synthetic_root, finished_run)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.output_dir") and "already holds a run" in err[-1]
    with pytest.raises(RunDirectoryError, match="contradict"):
        train(_config(synthetic_root, finished_run), TrainOptions(resume="latest", overwrite=True))
    assert _tree(finished_run) == before


def test_a_resume_with_a_changed_training_field_is_refused_naming_it(finished_run, synthetic_root):
    before = _tree(finished_run)
    with pytest.raises(RunDirectoryError, match=r"data\.batch_size: 2 -> 1; optim\.lr: 0\.001 -> 0\.5\. Fields"):
        train(_config(synthetic_root, finished_run, "optim.lr=0.5", "data.batch_size=1", "train.max_steps=4"),
              TrainOptions(resume="latest"))
    assert _tree(finished_run) == before       # config.json included


def test_fields_that_may_change_on_resume_are_allowed_and_the_rest_listed():
    base = load_config("tiny", ["optim.lr_mults.img_neck=0.1"])
    changed = load_config("tiny", ["optim.lr_mults.img_neck=0.5", "train.epochs=99", "model.aqr.monitor.interval=3"])
    assert config_differences(base, changed) == ["model.aqr.monitor.interval", "optim.lr_mults.img_neck",
                                                 "train.epochs"]


def test_a_corrupted_resume_file_is_refused_naming_it(run_copy, synthetic_root):
    latest = ckpt.resolve_resume(run_copy, "latest")
    state_file = latest / "training_state.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    before = _tree(run_copy)
    with pytest.raises(CheckpointError, match=r"training_state\.pt: sha256 differs"):
        train(_config(synthetic_root, run_copy, "train.max_steps=4"), TrainOptions(resume="latest"))
    assert _tree(run_copy) == before
    (latest / ckpt.rng_file_name(0)).unlink()
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: listed in checksums\.json but missing"):
        ckpt.verify_checkpoint(latest)
    (latest / ckpt.CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match="no checksums.json; not a checkpoint of this aqrcmt version"):
        ckpt.read_checkpoint(latest)


def test_a_resume_state_that_would_run_code_is_refused(tmp_path):
    """weights_only=True: a pickle that names a callable is not loaded, even with valid checksums."""
    path = ckpt.write_checkpoint(tmp_path, model_state={"w": torch.zeros(1)}, training_state={}, config_json="{}",
                                 progress=ckpt.TrainingProgress(step=1), keep_last=0)
    torch_save_atomic({"progress": {}, "hook": shutil.rmtree}, path / "training_state.pt")
    ckpt._write_checksums(path, num_processes=0)
    with pytest.raises(CheckpointError, match=r"training_state\.pt: not a loadable training state"):
        ckpt.read_checkpoint(path)


def test_a_bad_val_split_is_refused_before_training_even_with_overwrite(run_copy, synthetic_root, tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(ValidationSplitError, match=r"data\.val_split 'mini_vall' cannot be evaluated: unknown"):
        train(_config(synthetic_root, fresh, "data.val_split=mini_vall"), TrainOptions())
    assert not fresh.exists()                  # nothing written, not even config.json
    before = _tree(run_copy)
    with pytest.raises(ValidationSplitError):
        train(_config(synthetic_root, run_copy, "data.val_split=mini_vall"), TrainOptions(overwrite=True))
    assert _tree(run_copy) == before and not list(tmp_path.glob("run.replaced-*"))


def test_overwrite_moves_the_old_run_aside_after_the_checks(run_copy, synthetic_root, tmp_path):
    before = _tree(run_copy)
    result = train(_config(synthetic_root, run_copy, "train.max_steps=1"), TrainOptions(overwrite=True))
    assert result.progress.step == 1
    (moved,) = tmp_path.glob("run.replaced-*")
    assert _tree(moved) == before
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_the_checkpoint_is_saved_before_evaluation_and_a_resume_evaluates_it(synthetic_root, tmp_path, monkeypatch):
    def failing_evaluation(*args, **kwargs):
        raise FileNotFoundError("a validation file is missing")
    out = tmp_path / "run"
    cfg = _config(synthetic_root, out, "train.max_steps=1")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", failing_evaluation)
        with pytest.raises(FileNotFoundError):
            train(cfg, TrainOptions())
    saved = ckpt.resolve_resume(out, "latest")
    assert saved.name == "step_00000001" and not (saved / "metrics.json").exists()
    result = train(cfg, TrainOptions(resume="latest"))
    assert result.metrics is not None and (saved / "metrics.json").is_file()
    assert [entry["step"] for entry in result.progress.history] == [1] and (out / "best").is_dir()


def test_after_a_resume_the_non_finite_guard_names_the_resumed_checkpoint(run_copy, synthetic_root, monkeypatch):
    from aqrcmt.models.detector import CmtDetector

    real_loss = CmtDetector.loss

    def nan_loss(self, batch, monitor=False):
        output = real_loss(self, batch, monitor)
        output.losses["loss_cls"] = output.losses["loss_cls"] * float("nan")
        return output
    monkeypatch.setattr(CmtDetector, "loss", nan_loss)
    cfg = _config(synthetic_root, run_copy, "train.max_steps=4", "train.max_nonfinite_steps=1")
    with pytest.raises(NonFiniteTrainingError, match=r"this run resumed from .*step_00000002"):
        train(cfg, TrainOptions(resume="latest"))
    assert "\"max_steps\": 4" in (run_copy / "config.json").read_text()   # the allowed change was recorded
