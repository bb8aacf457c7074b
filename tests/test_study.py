"""`aqrcmt study --quick` end to end: every arm, the report, identity start, routing evidence; a rerun resumes; bad
inputs are refused."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from aqrcmt.cli import main
from aqrcmt.models import build_model
from aqrcmt.presets import get_preset
from aqrcmt.study import ARM_NAMES, EVAL_FAILURES, best_aqr_arm, separation


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    """The quick study's folder; what it printed is in <folder>_stdout.txt beside it."""
    out = tmp_path_factory.mktemp("study")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["study", "--out", str(out), "--quick"]) == 0
    out.with_name(out.name + "_stdout.txt").write_text(printed.getvalue())
    return out


def test_quick_study_writes_the_report_for_every_arm(quick_study: Path):
    report = (quick_study / "report.md").read_text()
    results = json.loads((quick_study / "results.json").read_text())
    for arm in ARM_NAMES:
        assert f"| {arm} |" in report
        assert (quick_study / "arms" / arm / "seed_0" / "result.json").is_file()
    for _, _, label in EVAL_FAILURES:
        assert label in report
    pretrained = results["pretrained"]
    assert set(pretrained["failures"]) == {f"{n}_s{s}" for n, s, _ in EVAL_FAILURES}
    assert set(pretrained["conditions"]) == {"clean", "lidar_drop", "camera_drop"}
    runs = {r["arm"]: r for r in results["runs"]}
    # identity start: at step 0 the arm is the pretrained model, to the last digit
    for arm in ("recommended_identity", "supervised_frozen", "supervised_e2e"):
        assert runs[arm]["step0"]["mAP"] == pretrained["clean"]["mAP"]
        assert runs[arm]["step0"]["NDS"] == pretrained["clean"]["NDS"]
    # routing evidence: failed entries exist for both modalities in every AQR arm, and none for the control
    for arm in ARM_NAMES[1:]:
        routing = runs[arm]["routing"]
        assert routing["lidar_drop_s1"]["lidar_failed_count"] > 0 and routing["lidar_drop_s1"]["lidar_intact_count"] == 0
        assert routing["camera_drop_s1"]["camera_failed_count"] > 0
        assert routing["conditions_clean"]["lidar_intact_count"] > 0
    assert runs["control"]["routing"]["lidar_drop_s1"]["lidar_failed_count"] == 0
    assert results["best"] in ARM_NAMES[2:] and set(results["robustness"]) == {"control", results["best"]}
    assert (quick_study / "pretrained" / "cmt_tiny_official.pth").is_file()
    # the ModalMask3D pretraining starts from the camera-only model: all but the LiDAR-only tensors come from it
    with safe_open(quick_study / "pretrained" / "cmt_tiny_camera.safetensors", "pt") as camera:
        camera_keys = set(camera.keys())
    assert any(k.startswith("img_backbone.") for k in camera_keys)
    assert not any(k.startswith(("pts_middle_encoder.", "pts_bbox_head.shared_conv.")) for k in camera_keys)
    printed = quick_study.with_name(quick_study.name + "_stdout.txt").read_text()
    assert f"with ModalMask3D for 4 steps in {quick_study / 'pretrain'}, from " in printed
    assert "keep their initialisation" in printed and "starting from a camera-only `tiny` CMT of 4 steps" in report
    for name in ("lidar_drop", "view_drop"):
        assert Image.open(quick_study / f"maps_{results['best']}_{name}.png").size[0] > 100


def test_rerun_resumes_finished_runs(quick_study: Path, capsys):
    done = sorted(quick_study.glob("arms/*/seed_0/result.json"))
    stamps = {path: os.stat(path).st_mtime_ns for path in done}
    assert main(["study", "--out", str(quick_study), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "reusing the pretrained model" in out and out.count("finished earlier") == len(ARM_NAMES)
    assert stamps == {path: os.stat(path).st_mtime_ns for path in done} and len(done) == len(ARM_NAMES)


def test_separation_and_best_arm():
    assert separation([0.5, 0.6, 0.7], [0.2, 0.3, 0.4]) == pytest.approx(3.0)
    assert separation([0.5], [0.2]) is None
    runs = [{"arm": arm, "failures": {"lidar_drop_s1": {"NDS": nds}, "camera_drop_s1": {"NDS": nds}}}
            for arm, nds in (("control", 0.9), ("fork_original", 0.8), ("recommended", 0.3), ("supervised_e2e", 0.4))]
    assert best_aqr_arm(runs) == "supervised_e2e"          # the control and the fork's collapse are not candidates


def test_unknown_arm_is_refused(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--quick", "--arms", "control", "no_such_arm"]) == 2
    err = capsys.readouterr().err
    assert "no_such_arm" in err and "recommended" in err and not (tmp_path / "s").exists()


def test_repeated_seeds_are_refused(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "s"), "--quick", "--seeds", "1", "1"]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "s").exists()


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


@pytest.mark.parametrize("option, value", [("--finetune-steps", "0"), ("--camera-pretrain-steps", "-1"),
                                           ("--router-loss-weight", "-1"), ("--router-loss-weight", "nan"),
                                           ("--aqr-lr-mult", "0")])
def test_bad_plan_options_are_refused(tmp_path, capsys, option, value):
    assert main(["study", "--out", str(tmp_path / "s"), "--quick", option, value]) == 2
    err = capsys.readouterr().err
    assert option in err and value in err and not (tmp_path / "s").exists()


def test_plan_options_reach_the_plan(tmp_path, monkeypatch):
    import aqrcmt.tools.study as study_tool
    plans = []
    monkeypatch.setattr(study_tool, "run_study", lambda plan: plans.append(plan) or tmp_path / "report.md")
    assert main(["study", "--out", str(tmp_path / "s"), "--arms", "supervised_e2e", "--seeds", "0",
                 "--finetune-steps", "300", "--router-loss-weight", "5", "--aqr-lr-mult", "25",
                 "--no-corruptions", "--camera-pretrain-steps", "0"]) == 0
    (plan,) = plans
    assert (plan.arms, plan.seeds, plan.finetune_steps, plan.router_loss_weight, plan.aqr_lr_mult,
            plan.robustness_corruptions, plan.camera_pretrain_steps) == (("supervised_e2e",), (0,), 300, 5.0, 25.0,
                                                                          (), 0)
