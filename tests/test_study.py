"""`aqrcmt study --quick` end to end: every arm, the report, the plot; a rerun resumes; bad inputs are refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from aqrcmt.cli import main
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset
from aqrcmt.study import ARM_NAMES, StudyPlan, pretrained_metrics


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--out", str(out), "--quick"]) == 0
    return out


def test_quick_study_writes_the_report_for_every_arm(quick_study: Path):
    report = (quick_study / "report.md").read_text()
    for arm in ARM_NAMES:
        assert f"| {arm} |" in report
        assert (quick_study / "arms" / arm / "arm_result.json").is_file()
    assert "| fork_original | 0 | bev |" in report and "| recommended | 4 | camera |" in report
    control = json.loads((quick_study / "arms" / "control" / "arm_result.json").read_text())
    pretrained = pretrained_metrics(StudyPlan.quick(quick_study))
    assert control["evaluations"][0]["mAP"] == pytest.approx(pretrained["mAP"])   # the converted weights score alike
    assert f"Pretrained model on val: mAP {pretrained['mAP']:.4f}" in report
    assert Image.open(quick_study / "map_vs_step.png").size[0] > 100
    assert (quick_study / "pretrained" / "cmt_tiny_official.pth").is_file()
    assert list((quick_study / "arms" / "recommended" / "maps").glob("step_*.png"))


def test_rerun_resumes_finished_arms(quick_study: Path, capsys):
    stamps = {arm: os.stat(quick_study / "arms" / arm / "arm_result.json").st_mtime_ns for arm in ARM_NAMES}
    assert main(["study", "--out", str(quick_study), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "reusing the pretrained model" in out and out.count("finished earlier") == len(ARM_NAMES)
    assert stamps == {arm: os.stat(quick_study / "arms" / arm / "arm_result.json").st_mtime_ns for arm in ARM_NAMES}


def test_unknown_arm_is_refused(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--quick", "--arms", "control", "no_such_arm"]) == 2
    err = capsys.readouterr().err
    assert "no_such_arm" in err and "recommended" in err and not (tmp_path / "s").exists()


def test_unwritable_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["study", "--out", str(blocker / "study"), "--quick"]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_pretrained_weights_of_another_config_are_refused(quick_study: Path, tmp_path, capsys):
    out = tmp_path / "study"
    (out / "pretrained").mkdir(parents=True)
    (out / "pretrain").mkdir()
    (out / "pretrain" / "config.json").write_text((quick_study / "pretrain" / "config.json").read_text())
    other = build_model(get_preset("cmt_lidar_voxel0075_cbgs").model).state_dict()
    wrong = out / "pretrained" / "cmt_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in list(other.items())[:20]}, wrong)
    assert main(["study", "--out", str(out), "--quick", "--arms", "control"]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "does not fit" in err
    assert not (out / "arms").exists()
