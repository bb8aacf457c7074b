"""Official evaluation: the export path (LiDAR-frame Detections -> global JSON -> DetectionEval), its pitfalls,
the `aqrcmt evaluate` CLI and the robustness evaluation."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from nuscenes.eval.detection.utils import category_to_detection_name
from pyquaternion import Quaternion

from aqrcmt.structures import CAMERA_NAMES, CLASS_NAMES
from aqrcmt.data.splits import conditions_of, sample_tokens_of_split
from aqrcmt.eval.nuscenes_eval import (
    EvaluationError, attribute_name, detections_to_results, evaluate_detections, evaluate_results_file,
    format_metrics, write_results,
)
from aqrcmt.eval.robustness import ModalityDrop, evaluate_robustness, format_robustness, standard_drops
from aqrcmt.structures import Batch, Detections, SampleMeta, transform_boxes

VERSION, SPLIT = "v1.0-mini", "mini_val"


def _pose(record: dict) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = Quaternion(record["rotation"]).rotation_matrix, record["translation"]
    return t


@pytest.fixture(scope="module")
def ground_truth(synthetic_root: Path) -> tuple[list[Detections], list[SampleMeta]]:
    """The val split's annotations as perfect Detections (:func:`_perfect_detections`)."""
    nusc = NuScenes(VERSION, str(synthetic_root), verbose=False)
    return _perfect_detections(nusc, sample_tokens_of_split(nusc, SPLIT))


def _perfect_detections(nusc: NuScenes, tokens: list[str]) -> tuple[list[Detections], list[SampleMeta]]:
    """The annotations of the samples `tokens` as perfect Detections in each key frame's LiDAR frame
    (aqrcmt.structures). Annotations without LiDAR points are left out: the devkit drops them from the GT."""
    detections, metas = [], []
    for token in tokens:
        sd = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
        lidar2global = _pose(nusc.get("ego_pose", sd["ego_pose_token"])) @ _pose(
            nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]))
        _, boxes, _ = nusc.get_sample_data(sd["token"])
        rows, labels = [], []
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] == 0:
                continue
            velocity = lidar2global[:3, :3].T @ nusc.box_velocity(box.token)
            w, l, h = box.wlh
            rows.append([*box.center, l, w, h, box.orientation.yaw_pitch_roll[0], velocity[0], velocity[1]])
            labels.append(CLASS_NAMES.index(name))
        detections.append(Detections(torch.tensor(rows, dtype=torch.float32), torch.ones(len(rows)),
                                     torch.tensor(labels)))
        metas.append(SampleMeta(sample_token=token, lidar2global=torch.from_numpy(lidar2global)))
    return detections, metas


def test_ground_truth_through_the_export_scores_one(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    detections, metas = ground_truth
    metrics = evaluate_detections(detections, metas, synthetic_root, VERSION, SPLIT, tmp_path)
    assert metrics["mAP"] > 0.99 and metrics["NDS"] > 0.99
    assert all(metrics[f"AP/{c}"] > 0.99 for c in CLASS_NAMES)
    assert metrics["mAAE"] < 0.01          # the default-attribute rule agrees with the synthetic attributes
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["NDS"] == metrics["NDS"]
    assert json.loads((tmp_path / "results_nusc.json").read_text())["meta"]["use_lidar"] is True
    assert "car" in format_metrics(metrics)


def test_lidar_frame_boxes_without_conversion_score_zero(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    detections, metas = ground_truth
    unconverted = [SampleMeta(m.sample_token, torch.eye(4, dtype=torch.float64)) for m in metas]
    metrics = evaluate_detections(detections, unconverted, synthetic_root, VERSION, SPLIT, tmp_path)
    assert metrics["mAP"] < 0.05


def test_random_boxes_score_low(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    _, metas = ground_truth
    random = []
    for _ in metas:
        n = 100
        boxes = torch.cat([torch.rand(n, 2, generator=generator) * 80 - 40,       # x, y within 40 m
                           torch.rand(n, 1, generator=generator) - 1,             # z
                           torch.rand(n, 3, generator=generator) * 3 + 0.5,       # dx, dy, dz
                           torch.rand(n, 1, generator=generator) * 2 * math.pi,   # yaw
                           torch.randn(n, 2, generator=generator)], dim=1)        # vx, vy
        random.append(Detections(boxes, torch.rand(n, generator=generator).sort(descending=True).values,
                                 torch.randint(0, 10, (n,), generator=generator)))
    metrics = evaluate_detections(random, metas, synthetic_root, VERSION, SPLIT, tmp_path)
    assert metrics["mAP"] < 0.05 and metrics["NDS"] < 0.1


def test_all_empty_predictions_give_zero_not_a_crash(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    _, metas = ground_truth
    empty = [Detections(torch.zeros(0, 9), torch.zeros(0), torch.zeros(0, dtype=torch.int64)) for _ in metas]
    metrics = evaluate_detections(empty, metas, synthetic_root, VERSION, SPLIT, tmp_path)
    assert metrics["mAP"] == 0.0 and metrics["NDS"] == 0.0 and metrics["empty_predictions"] is True


def test_export_frames_sizes_velocity_and_cap() -> None:
    """A LiDAR frame rotated +90 deg about z and shifted: centre, yaw and velocity move with it; size is (w, l, h)."""
    lidar2global = torch.eye(4, dtype=torch.float64)
    lidar2global[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lidar2global[:3, 3] = torch.tensor([100.0, 200.0, 1.0])
    n = 600
    boxes = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.3, 3.0, 0.0]]).repeat(n, 1)
    scores = torch.linspace(1.0, 0.0, n)
    results = detections_to_results([Detections(boxes, scores, torch.zeros(n, dtype=torch.int64))],
                                    [SampleMeta("tok", lidar2global)])
    entries = results["tok"]
    assert len(entries) == 500 and entries[-1]["detection_score"] == pytest.approx(scores[499].item())
    first = entries[0]
    assert first["translation"] == pytest.approx([98.0, 201.0, 1.5])
    assert first["size"] == pytest.approx([2.0, 4.0, 1.5])
    assert Quaternion(first["rotation"]).yaw_pitch_roll[0] == pytest.approx(0.3 + math.pi / 2)
    assert first["velocity"] == pytest.approx([0.0, 3.0], abs=1e-9)
    assert first["attribute_name"] == "vehicle.moving"


def _rigid(yaw: float, pitch: float, roll: float, translation: tuple[float, float, float]) -> torch.Tensor:
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = torch.from_numpy(Quaternion(axis=(0.0, 0.0, 1.0), radians=yaw).rotation_matrix
                                      @ Quaternion(axis=(0.0, 1.0, 0.0), radians=pitch).rotation_matrix
                                      @ Quaternion(axis=(1.0, 0.0, 0.0), radians=roll).rotation_matrix)
    matrix[:3, 3] = torch.tensor(translation)
    return matrix


def _boxes(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 3, generator=generator) * 20, torch.rand(n, 3, generator=generator) * 4 + 0.5,
                      (torch.rand(n, 1, generator=generator) * 2 - 1) * math.pi,
                      torch.randn(n, 2, generator=generator) * 5], dim=1).double()


def test_box_round_trips_lidar_global_lidar() -> None:
    """An upright box moved LiDAR -> global -> LiDAR by a pose that turns about z comes back unchanged."""
    boxes = _boxes(50, seed=1)
    lidar2global = _rigid(2.5, 0.0, 0.0, (600.0, 1600.0, 2.0))
    back = transform_boxes(transform_boxes(boxes, lidar2global), torch.linalg.inv(lidar2global))
    torch.testing.assert_close(back[:, :6], boxes[:, :6])
    torch.testing.assert_close(back[:, 7:], boxes[:, 7:])
    torch.testing.assert_close(torch.remainder(back[:, 6] - boxes[:, 6] + math.pi, 2 * math.pi) - math.pi,
                               torch.zeros(50, dtype=torch.float64))


def test_export_yaw_is_the_devkit_yaw_of_the_rotated_box() -> None:
    """With ego pitch and roll, the exported yaw is the yaw the devkit reads from the box rotated in 3-D
    (Quaternion(R) * Rz(yaw)), and the centre and velocity are R p + t and (R v)_xy."""
    from nuscenes.eval.common.utils import quaternion_yaw

    boxes = _boxes(20, seed=2)
    lidar2global = _rigid(-1.0, 0.03, -0.02, (400.0, 1100.0, 1.0))
    rotation = lidar2global[:3, :3].numpy()
    entries = detections_to_results([Detections(boxes.float(), torch.linspace(1, 0, 20),
                                                torch.zeros(20, dtype=torch.int64))],
                                    [SampleMeta("tok", lidar2global.float())])["tok"]
    for box, entry in zip(boxes.float().double().numpy(), entries):
        rotated = Quaternion(matrix=rotation) * Quaternion(axis=(0.0, 0.0, 1.0), radians=box[6])
        yaw_difference = quaternion_yaw(Quaternion(entry["rotation"])) - quaternion_yaw(rotated)
        assert math.remainder(yaw_difference, 2 * math.pi) == pytest.approx(0.0, abs=1e-6)
        assert entry["translation"] == pytest.approx(rotation @ box[:3] + lidar2global[:3, 3].numpy(), abs=1e-3)
        assert entry["velocity"] == pytest.approx((rotation @ [box[7], box[8], 0.0])[:2], abs=1e-5)


@pytest.mark.parametrize("name, speed, expected", [
    ("car", 1.0, "vehicle.moving"), ("car", 0.0, "vehicle.parked"), ("bus", 0.1, "vehicle.stopped"),
    ("bicycle", 2.0, "cycle.with_rider"), ("motorcycle", 0.0, "cycle.without_rider"),
    ("pedestrian", 1.0, "pedestrian.moving"), ("pedestrian", 0.1, "pedestrian.standing"),
    ("barrier", 3.0, ""), ("traffic_cone", 0.0, ""),
])
def test_default_attribute_rule(name: str, speed: float, expected: str) -> None:
    assert attribute_name(name, speed) == expected


def test_bad_inputs_give_clear_errors(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    detections, metas = ground_truth
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_detections(detections, metas, tmp_path / "nowhere", VERSION, SPLIT, tmp_path)
    with pytest.raises(EvaluationError, match="v1.0-trainval.*not found.*v1.0-mini"):
        evaluate_detections(detections, metas, synthetic_root, "v1.0-trainval", "val", tmp_path)
    with pytest.raises(EvaluationError, match="needs a trainval version"):
        evaluate_detections(detections, metas, synthetic_root, VERSION, "val", tmp_path)
    with pytest.raises(EvaluationError, match="unknown nuScenes split"):
        evaluate_detections(detections, metas, synthetic_root, VERSION, "everything", tmp_path)
    with pytest.raises(EvaluationError, match="1 missing"):
        evaluate_detections(detections[1:], metas[1:], synthetic_root, VERSION, SPLIT, tmp_path)
    with pytest.raises(EvaluationError, match="appears twice"):
        detections_to_results(detections[:1] * 2, metas[:1] * 2)
    bad = Detections(torch.full((1, 9), float("nan")), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(EvaluationError, match="non-finite"):
        detections_to_results([bad], metas[:1])
    no_meta = tmp_path / "no_meta.json"
    no_meta.write_text(json.dumps({"results": {}}))
    with pytest.raises(EvaluationError, match="'meta'"):
        evaluate_results_file(no_meta, synthetic_root, VERSION, SPLIT, tmp_path)


def test_custom_split_file(ground_truth, synthetic_root: Path, tmp_path: Path) -> None:
    """devkit 1.2.0 custom splits: ROOT/<version>/splits.json (a copy of the root, the fixture stays untouched)."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(synthetic_root / VERSION, root / VERSION)
    shutil.copytree(synthetic_root / "maps", root / "maps")
    nusc = NuScenes(VERSION, str(synthetic_root), verbose=False)
    val_scene = next(s["name"] for s in nusc.scene if s["name"] in ("scene-0103", "scene-0916"))
    (root / VERSION / "splits.json").write_text(json.dumps({"synthetic_val": [val_scene]}))
    detections, metas = ground_truth
    metrics = evaluate_detections(detections, metas, root, VERSION, "synthetic_val", tmp_path / "out")
    assert metrics["mAP"] > 0.99


def test_evaluate_cli_on_a_results_file(ground_truth, synthetic_root: Path, tmp_path: Path, capsys) -> None:
    from aqrcmt.cli import main

    detections, metas = ground_truth
    path = write_results(detections_to_results(detections, metas), tmp_path / "res.json", True, True)
    assert main(["evaluate", "--results", str(path), "--root", str(synthetic_root), "--version", VERSION,
                 "--split", SPLIT]) == 0
    assert json.loads((tmp_path / "res_eval" / "metrics.json").read_text())["mAP"] > 0.99
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"{len(metas)} samples of {SPLIT} scored; metrics: {tmp_path / 'res_eval' / 'metrics.json'}"
    assert main(["evaluate", "--results", str(path), "--root", str(synthetic_root), "--version", "v1.0-trainval",
                 "--eval-set", "val"]) == 2


# --------------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------------
def _batch(images: bool = True) -> Batch:
    return Batch(points=[torch.randn(50, 5), torch.randn(30, 5)],
                 images=torch.randn(2, 6, 3, 32, 64) if images else None,
                 lidar2img=torch.eye(4, dtype=torch.float64).expand(2, 6, 4, 4).clone() if images else None,
                 img_shape=(32, 64), gt_boxes=[torch.zeros(0, 9)] * 2,
                 gt_labels=[torch.zeros(0, dtype=torch.int64)] * 2,
                 metas=[SampleMeta("a", torch.eye(4)), SampleMeta("b", torch.eye(4))])


def test_modality_drop_blanks_only_the_chosen_inputs() -> None:
    from aqrcmt.data.transforms import IMAGE_MEAN_BGR, IMAGE_STD_BGR

    batch = _batch()
    dropped = ModalityDrop("x", cameras=("CAM_BACK",))(batch)
    back = CAMERA_NAMES.index("CAM_BACK")
    black = torch.as_tensor(-IMAGE_MEAN_BGR / IMAGE_STD_BGR).view(3, 1, 1)
    assert torch.allclose(dropped.images[:, back], black.expand(2, 3, 32, 64))
    others = [i for i in range(6) if i != back]
    assert torch.equal(dropped.images[:, others], batch.images[:, others])
    assert all(torch.equal(a, b) for a, b in zip(dropped.points, batch.points))
    no_lidar = ModalityDrop("y", lidar=True)(batch)
    assert all(p.shape == q.shape and not p.any() for p, q in zip(no_lidar.points, batch.points))
    assert torch.equal(no_lidar.images, batch.images)
    assert [d.name for d in standard_drops(True, True)][:3] == ["clean", "no LiDAR", "no cameras"]
    assert len(standard_drops(True, False)) == 1 and len(standard_drops(False, True)) == 7
    with pytest.raises(ValueError, match="unknown camera"):
        ModalityDrop("z", cameras=("CAM_TOP",))
    with pytest.raises(ValueError, match="no images"):
        ModalityDrop("w", cameras=("CAM_BACK",))(_batch(images=False))


class _OracleModel(torch.nn.Module):
    """Returns the batch's ground truth as detections, or nothing when the LiDAR input is blank."""

    def predict(self, batch: Batch) -> list[Detections]:
        out = []
        for points, boxes, labels in zip(batch.points, batch.gt_boxes, batch.gt_labels):
            keep = slice(None) if points.abs().sum() > 0 else slice(0, 0)
            out.append(Detections(boxes[keep].float(), torch.ones(len(boxes))[keep], labels[keep]))
        return out


def test_robustness_with_the_dataset_and_an_oracle(synthetic_root: Path, tmp_path: Path) -> None:
    """The dataset's GT (LiDAR frame, batch convention) scores 1 through the export; without LiDAR, 0."""
    from aqrcmt.presets import load_config
    from aqrcmt.data import build_dataloader

    cfg = load_config("tiny", [f"data.root={synthetic_root}", "data.load_images=false"])
    loader = build_dataloader(cfg, SPLIT, train=False)
    drops = [ModalityDrop("clean"), ModalityDrop("no LiDAR", lidar=True)]
    table = evaluate_robustness(_OracleModel(), loader, synthetic_root, VERSION, SPLIT, tmp_path, drops=drops)
    assert table["clean"]["mAP"] > 0.99 and table["clean"]["NDS"] > 0.99
    assert table["no LiDAR"]["mAP"] == 0.0
    assert (tmp_path / "no_LiDAR" / "metrics.json").is_file()
    row = format_robustness(table).splitlines()[2].split()
    assert row[:2] == ["no", "LiDAR"] and row[4] == f"{-table['clean']['mAP']:+.4f}"
    with pytest.raises(ValueError, match="pass `drops`"):      # the oracle has no cfg saying what it uses
        evaluate_robustness(_OracleModel(), loader, synthetic_root, VERSION, SPLIT, tmp_path)


# --------------------------------------------------------------------------------------------------
# `aqrcmt evaluate --checkpoint`
# --------------------------------------------------------------------------------------------------
def test_evaluate_cli_rejects_bad_checkpoints(tmp_path: Path, capsys) -> None:
    from aqrcmt.checkpoint.io import save_safetensors_atomic
    from aqrcmt.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    pth = tmp_path / "official.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, pth)
    assert main(["evaluate", "--checkpoint", str(pth)]) == 2
    assert "aqrcmt convert" in capsys.readouterr().err
    save_safetensors_atomic({"w": torch.zeros(1)}, tmp_path / "bare.safetensors", {})
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bare.safetensors")]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_on_a_checkpoint(tmp_path: Path) -> None:
    """An untrained tiny model, saved as a training checkpoint would be, evaluates end to end (and with drops)."""
    from aqrcmt.checkpoint.io import save_safetensors_atomic
    from aqrcmt.cli import main
    from aqrcmt.presets import load_config
    from aqrcmt.data.synthetic import make_synthetic_nuscenes
    from aqrcmt.models import build_model

    root = make_synthetic_nuscenes(tmp_path / "data", scenes=2, samples_per_scene=2)   # 2 val samples: 1 batch
    cfg = load_config("tiny", [f"data.root={root}"])
    save_safetensors_atomic(build_model(cfg.model).state_dict(), tmp_path / "model.safetensors",
                            {"config": cfg.to_json()})
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--robustness", "--out", str(tmp_path / "eval")]) == 0
    table = json.loads((tmp_path / "eval" / "robustness.json").read_text())
    assert list(table)[:3] == ["clean", "no LiDAR", "no cameras"] and len(table) == 9
    assert all(0.0 <= m["NDS"] <= 1.0 for m in table.values())


# --------------------------------------------------------------------------------------------------
# `--condition`: the scenes whose description names night, rain, fog (or none: clear)
# --------------------------------------------------------------------------------------------------
TRAIN = "mini_train"      # the default synthetic root's split with two scenes


@pytest.fixture
def night_root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic root (its sensor folders linked) whose first mini_train scene is described as
    nuScenes describes a night drive in the rain."""
    root = tmp_path / "night_root"
    shutil.copytree(synthetic_root / VERSION, root / VERSION)
    for folder in ("maps", "samples", "sweeps"):
        (root / folder).symlink_to(synthetic_root / folder)
    scenes = json.loads((root / VERSION / "scene.json").read_text())
    train = sample_tokens_of_split(NuScenes(VERSION, str(synthetic_root), verbose=False), TRAIN)
    assert len(train) > 0 and all(scene["description"].startswith("synthetic") for scene in scenes)
    night = next(scene for scene in scenes if scene["first_sample_token"] in train)
    night["description"] = "Night, RAIN, parked cars"
    (root / VERSION / "scene.json").write_text(json.dumps(scenes))
    return root


def _scene_tokens(nusc: NuScenes, scene_name: str) -> list[str]:
    return [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] == scene_name]


def test_condition_words_of_descriptions() -> None:
    assert conditions_of("Night, rain, parked cars") == {"night", "rain"}
    assert conditions_of("FOG at the harbour") == {"fog"}
    assert conditions_of("Nightlife district, rainy-ish, sunny") == {"clear"}      # whole words only
    assert conditions_of("synthetic (train), seed 0") == {"clear"}


def test_condition_selects_the_scenes_its_description_names(night_root: Path) -> None:
    from aqrcmt.data.splits import scenes_with_condition

    nusc = NuScenes(VERSION, str(night_root), verbose=False)
    night_scene = next(s["name"] for s in nusc.scene if s["description"].startswith("Night"))
    other = [s["name"] for s in nusc.scene if s["name"] != night_scene and _scene_tokens(nusc, s["name"])[0]
             in sample_tokens_of_split(nusc, TRAIN)]
    assert len(other) == 1
    assert sample_tokens_of_split(nusc, TRAIN, "night") == _scene_tokens(nusc, night_scene)
    assert sample_tokens_of_split(nusc, TRAIN, "rain") == _scene_tokens(nusc, night_scene)
    assert sample_tokens_of_split(nusc, TRAIN, "clear") == _scene_tokens(nusc, other[0])
    assert sample_tokens_of_split(nusc, TRAIN, "fog") == [] and sample_tokens_of_split(nusc, SPLIT, "night") == []
    with pytest.raises(ValueError, match="unknown condition 'dusk'; known: night, rain, fog, clear"):
        scenes_with_condition(nusc, [night_scene], "dusk")


def test_conditions_need_a_description_naming_one(synthetic_root: Path) -> None:
    from aqrcmt.data.files import DatasetError

    nusc = NuScenes(VERSION, str(synthetic_root), verbose=False)
    with pytest.raises(DatasetError, match=f"no scene description of {synthetic_root}.* names a condition"):
        sample_tokens_of_split(nusc, SPLIT, "night")
    assert sample_tokens_of_split(nusc, SPLIT, "clear") == sample_tokens_of_split(nusc, SPLIT)   # the whole split


def test_a_condition_is_scored_alone(night_root: Path, tmp_path: Path) -> None:
    """Perfect detections of the night samples score 1: the other scene's GT is not counted as missed."""
    from aqrcmt.data import build_dataloader
    from aqrcmt.presets import load_config

    nusc = NuScenes(VERSION, str(night_root), verbose=False)
    night = sample_tokens_of_split(nusc, TRAIN, "night")
    detections, metas = _perfect_detections(nusc, night)
    metrics = evaluate_detections(detections, metas, night_root, VERSION, TRAIN, tmp_path / "night",
                                  condition="night")
    assert metrics["mAP"] > 0.99 and metrics["num_samples"] == len(night) < len(sample_tokens_of_split(nusc, TRAIN))
    with pytest.raises(EvaluationError, match=f"must cover exactly the {len(night)} samples of 'mini_train' "
                                              r"\(night\): 0 missing, [1-9]"):
        evaluate_detections(*_perfect_detections(nusc, sample_tokens_of_split(nusc, TRAIN)), night_root, VERSION,
                            TRAIN, tmp_path / "all", condition="night")
    cfg = load_config("tiny", [f"data.root={night_root}", "data.load_images=false"])
    loader = build_dataloader(cfg, TRAIN, train=False, samples=night)
    assert [info["token"] for info in loader.dataset.infos] == night
    table = evaluate_robustness(_OracleModel(), loader, night_root, VERSION, TRAIN, tmp_path / "oracle",
                                drops=[ModalityDrop("clean")], condition="night")
    assert table["clean"]["mAP"] > 0.99 and table["clean"]["num_samples"] == len(night)


def test_evaluate_cli_condition_errors(night_root: Path, synthetic_root: Path, tmp_path: Path, capsys) -> None:
    from aqrcmt.checkpoint.io import save_safetensors_atomic
    from aqrcmt.cli import main
    from aqrcmt.models import build_model
    from aqrcmt.presets import load_config

    cfg = load_config("tiny", [f"data.root={synthetic_root}"])
    save_safetensors_atomic(build_model(cfg.model).state_dict(), tmp_path / "model.safetensors",
                            {"config": cfg.to_json()})
    with pytest.raises(SystemExit) as exit_info:                       # argparse: usage + one error line
        main(["evaluate", "--checkpoint", str(tmp_path), "--condition", "dusk"])
    assert exit_info.value.code == 2 and "--condition: invalid choice: 'dusk'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--condition", "night", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"no scene description of {synthetic_root}" in err and "names a condition" \
        in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--condition", "fog", "--root", str(night_root),
                 "--split", TRAIN, "--corruptions", "lidar_drop", "--out", str(tmp_path / "o")]) == 2
    assert "--condition fog: no scene of split 'mini_train'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
