"""One error path for every command: a bad input ends as exactly one `error: ...` line on stderr naming the
file/field/value and exit status 2, no traceback; `--debug` shows the traceback instead."""
from __future__ import annotations

import errno
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from aqrcmt.checkpoint.io import CheckpointError, save_safetensors_atomic
from aqrcmt.cli import main as cli_main
from aqrcmt.tools.errors import EXIT_ERROR, describe_os_error

ROOT = Path(__file__).resolve().parents[1]


def _script_main(script: str):
    """`main` of train/<script>.py (the training entry point, the main job)."""
    spec = importlib.util.spec_from_file_location(f"train_{script}", ROOT / "train" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _case(tmp: Path, name: str) -> tuple[str, list[str], str]:
    """(entry point, argv, text the error line must hold) of a bad-input case, its files written under `tmp`."""
    garbage = tmp / "garbage.bin"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    (tmp / "used").mkdir()
    (tmp / "used" / "keep.txt").write_text("keep")
    (tmp / "bad.json").write_text('{"meta": {}, "results": {"tok": [{"size": [1, 1, -1]}]}}')
    (tmp / "list.json").write_text("[1, 2]")
    unfit = tmp / "unfit.safetensors"
    save_safetensors_atomic({"w": torch.zeros(2)}, unfit, {})
    cases = {
        "synthetic over a used root": ("aqrcmt", ["make-synthetic-nuscenes", "--out", str(tmp / "used")],
                                       f"{tmp / 'used'} exists and is not empty"),
        "synthetic bad scenes": ("aqrcmt", ["make-synthetic-nuscenes", "--out", str(tmp / "new"), "--scenes", "1"],
                                 "scenes must be >= 2"),
        "synthetic bad share": ("aqrcmt", ["make-synthetic-nuscenes", "--out", str(tmp / "new"), "--rain-share", "1.5"],
                                "the rain share must lie in [0, 1], got 1.5"),
        "gt database missing root": ("aqrcmt", ["build-gt-database", "--config", "tiny", "--root", str(tmp / "nowhere"),
                                                "--split", "mini_val"], f"nuScenes root {tmp / 'nowhere'}"),
        "create-infos missing root": ("aqrcmt", ["create-infos", "--root", str(tmp / "nowhere"), "--version",
                                                 "v1.0-mini"], str(tmp / "nowhere")),
        "evaluate bad results": ("aqrcmt", ["evaluate", "--results", str(tmp / "bad.json"), "--root", str(tmp),
                                            "--version", "v1.0-mini", "--split", "mini_val"],
                                 "sample tok box 0 lacks the field(s)"),
        "evaluate missing checkpoint": ("aqrcmt", ["evaluate", "--checkpoint", str(tmp / "none.safetensors")],
                                        "does not exist"),
        "evaluate bad config": ("aqrcmt", ["evaluate", "--checkpoint", str(garbage), "--config", "nope"],
                                "not a safetensors file"),
        "convert garbage": ("aqrcmt", ["convert", str(garbage), str(tmp / "out.safetensors"), "--config",
                                       "cmt_lidar_voxel0075_cbgs"],
                            str(garbage)),
        "inspect garbage": ("aqrcmt", ["inspect", str(garbage)], str(garbage)),
        "inspect depth": ("aqrcmt", ["inspect", str(garbage), "--depth", "0"], "--depth must be >= 1, got 0"),
        "diagnose unknown preset": ("aqrcmt", ["diagnose", "--config", "no_such_preset"], "'no_such_preset'"),
        "diagnose lone checkpoint": ("aqrcmt", ["diagnose", "--config", "tiny_aqr", "--checkpoint", "x"],
                                     "--checkpoint and --root go together"),
        "diagnose bad query count": ("aqrcmt", ["diagnose", "--config", "tiny_aqr", "--num-queries", "0"],
                                     "--num-queries and --batch must be >= 1"),
        "diagnose unfit checkpoint": ("aqrcmt", ["diagnose", "--config", "tiny_aqr", "--checkpoint", str(unfit),
                                                 "--root", str(tmp)], f"{unfit}: does not fit the model"),
        "train unknown preset": ("train", ["--config", "no_such_preset"], "'no_such_preset'"),
        "train bad override": ("train", ["--config", "tiny", "--set", "optim.lr=fast"], "optim.lr"),
        "train config not an object": ("train", ["--config", str(tmp / "list.json")], "expected a JSON object"),
        "train eval-only without weights": ("train", ["--config", "tiny", "--eval-only"], "--eval-only needs weights"),
        "train unknown failure": ("train", ["--config", "tiny", "--set", f"train.output_dir={tmp / 'run'}",
                                            'data.augment.failures={"sensor_fire": 0.1}'],
                                  "data.augment.failures.sensor_fire"),
        "train failure probability": ("train", ["--config", "tiny", "--set", f"train.output_dir={tmp / 'run'}",
                                                'data.augment.failures={"lidar_drop": 1.5}'], "got 1.5"),
        "train router without AQR": ("train", ["--config", "tiny", "--set", f"train.output_dir={tmp / 'run'}",
                                               "model.aqr.router_loss_weight=1.0"], "model.aqr.router_loss_weight"),
        "train identity start of a sum kernel": ("train", ["--config", "tiny_aqr", "--set",
                                                           f"train.output_dir={tmp / 'run'}",
                                                           "model.aqr.identity_start=true"],
                                                 "model.aqr.render.kernel_norm"),
        "aqrcmt train bad override": ("aqrcmt", ["train", "--config", "tiny", "--set", "optim.lr=fast"], "optim.lr"),
        "aqrcmt train eval-only without weights": ("aqrcmt", ["train", "--config", "tiny", "--eval-only"],
                                                   "--eval-only needs weights"),
        "configs unknown preset": ("aqrcmt", ["configs", "no_such_preset"], "'no_such_preset'"),
        "configs set without a name": ("aqrcmt", ["configs", "--set", "optim.lr=1"], "--set needs a config NAME"),
        "inspect missing directory": ("aqrcmt", ["inspect", str(tmp / "used")], str(tmp / "used" / "model.safetensors")),
        "demo no steps": ("demo", ["--steps", "0", "--out", str(tmp / "run"), "--root", str(tmp / "data")],
                          "--steps must be >= 1, got 0"),
        "demo negative threads": ("demo", ["--threads", "-1", "--out", str(tmp / "run"), "--root", str(tmp / "data")],
                                  "--threads must be >= 0, got -1"),
        "demo bad override": ("demo", ["--out", str(tmp / "run"), "--data", str(tmp / "data"), "--set",
                                       "optim.lr=fast"], "optim.lr"),
        "demo batch across processes": ("demo", ["--processes", "2", "--out", str(tmp / "run"), "--root",
                                                 str(tmp / "data"), "--set", "data.batch_size=3"],
                                        "--processes 2: data.batch_size=3 does not split evenly"),
    }
    return cases[name]


CASES = ["synthetic over a used root", "synthetic bad scenes", "synthetic bad share", "gt database missing root",
         "create-infos missing root", "evaluate bad results", "evaluate missing checkpoint", "evaluate bad config", "convert garbage",
         "inspect garbage", "inspect depth", "diagnose unknown preset", "diagnose lone checkpoint",
         "diagnose bad query count", "diagnose unfit checkpoint",
         "train unknown preset", "train bad override", "train config not an object",
         "train eval-only without weights", "train unknown failure", "train failure probability",
         "train router without AQR", "train identity start of a sum kernel", "aqrcmt train bad override",
         "aqrcmt train eval-only without weights", "configs unknown preset", "configs set without a name",
         "inspect missing directory", "demo no steps", "demo negative threads", "demo bad override",
         "demo batch across processes"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_error_line_and_exit_2(tmp_path: Path, capsys, name: str) -> None:
    entry, argv, expected = _case(tmp_path, name)
    main = cli_main if entry == "aqrcmt" else _script_main("main" if entry == "train" else entry)
    capsys.readouterr()
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert "--allow-missing" not in err or "train" in (entry, argv[0])   # no command suggests an option it lacks
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()   # a refused demo writes nothing
    assert not (tmp_path / "new").exists()                                         # nor a refused generator


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="garbage.bin"):
        cli_main(["--debug", "inspect", str(garbage)])
    with pytest.raises(CheckpointError, match="garbage.bin"):
        cli_main(["inspect", str(garbage), "--debug"])


def test_os_errors_name_the_file_and_say_disk_full() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors")
    assert describe_os_error(full) == "/data/run/model.safetensors: No space left on device (disk full)"
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/infos.pkl")
    assert describe_os_error(denied) == "/data/infos.pkl: Permission denied"
    assert describe_os_error(FileNotFoundError("info pkl x.pkl does not exist")) == "info pkl x.pkl does not exist"


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    import aqrcmt.tools.inspect_checkpoint as inspect_command

    monkeypatch.setattr(inspect_command, "run", lambda args: [][0])
    with pytest.raises(IndexError):
        cli_main(["inspect", "x"])


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "aqrcmt.cli", "inspect", str(tmp_path / "missing.pth")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == EXIT_ERROR and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.pth" in done.stderr


def test_evaluate_a_checkpoint_of_other_shapes_says_does_not_fit(tmp_path: Path, capsys) -> None:
    from aqrcmt.models import build_model
    from aqrcmt.presets import get_preset

    tensors = build_model(get_preset("tiny").model).state_dict()
    name = next(k for k, v in tensors.items() if v.ndim == 4)
    tensors[name] = tensors[name][:1].clone()
    save_safetensors_atomic(tensors, tmp_path / "model.safetensors", {})
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "model.safetensors"), "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and f"1 wrong shapes ['{name}: file (1," in err
    assert "Traceback" not in err
