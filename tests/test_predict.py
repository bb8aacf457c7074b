"""`aqrcmt predict`, the Python API (aqrcmt.inference.Predictor), and the pictures (aqrcmt.eval.visualize)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from aqrcmt.checkpoint.io import save_safetensors_atomic
from aqrcmt.cli import main
from aqrcmt.data.collate import collate
from aqrcmt.data.dataset import resolve_path
from aqrcmt.data.loader import build_dataset
from aqrcmt.eval.nuscenes_eval import detections_to_results
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.eval.visualize import draw_boxes, project_box_edges
from aqrcmt.inference import Predictor, load_detector_from_checkpoint
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.structures import CameraCalibration

HW = (120, 160)
K = np.array([[100.0, 0.0, 80.0], [0.0, 100.0, 60.0], [0.0, 0.0, 1.0]])
LIDAR2CAM = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
K4 = np.eye(4)
K4[:3, :3] = K
LIDAR2IMG = K4 @ LIDAR2CAM             # a camera at the LiDAR origin looking along +x

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _box(x: float, y: float = 0.0, size: float = 2.0, yaw: float = 0.3) -> np.ndarray:
    return np.array([[x, y, 0.0, size, size, size, yaw, 0.0, 0.0]])


def _project(points: np.ndarray) -> np.ndarray:
    projected = np.concatenate([points, np.ones((len(points), 1))], 1) @ LIDAR2IMG.T
    return projected[:, :2] / projected[:, 2:3]


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------
def test_drawn_box_pixels_lie_where_its_corners_project() -> None:
    from aqrcmt.data.box_geometry import box_corners

    box = _box(10.0)
    corners = _project(box_corners(box)[0])
    assert ((corners >= 0) & (corners < [HW[1], HW[0]])).all()        # the whole box is in view
    image = draw_boxes(np.zeros((*HW, 3), np.uint8), box, LIDAR2IMG, [(255, 0, 0)], width=1, front_cross=False)
    drawn = np.argwhere(image[..., 0] > 0)[:, ::-1]                     # (u, v) of every drawn pixel
    for u, v in np.rint(corners).astype(int):
        assert image[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2, 0].any(), (u, v)
    assert (drawn >= np.floor(corners.min(0)) - 1).all() and (drawn <= np.ceil(corners.max(0)) + 1).all()
    assert (image[..., 1:] == 0).all() and len(drawn) > 50


def test_a_box_behind_the_camera_draws_nothing_and_edges_stay_inside_the_image() -> None:
    blank = np.zeros((*HW, 3), np.uint8)
    assert len(project_box_edges(_box(-10.0), LIDAR2IMG, HW)[0]) == 0
    assert (draw_boxes(blank, _box(-10.0), LIDAR2IMG, [(255, 0, 0)]) == 0).all()
    for box in (_box(1.5, size=4.0), _box(10.0, y=7.0)):          # through the camera plane; across the border
        segments = project_box_edges(box, LIDAR2IMG, HW)[0]
        assert len(segments) > 0
        assert (segments[:, 0::2] >= 0).all() and (segments[:, 0::2] <= HW[1] - 1).all()
        assert (segments[:, 1::2] >= 0).all() and (segments[:, 1::2] <= HW[0] - 1).all()
    # a box from x = -0.5 to 3.5 keeps its front face (in view) and the four side edges up to the near plane;
    # the back face lies behind the camera
    segments = project_box_edges(_box(1.5, size=4.0, yaw=0.0), LIDAR2IMG, HW)[0]
    assert len(segments) == 8


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny_aqr weights with their config, as a training run stores them."""
    cfg = load_config("tiny_aqr", [f"data.root={synthetic_root}", "data.sweeps=1"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_safetensors_atomic(build_model(cfg.model).state_dict(), path, {"config": cfg.to_json()})
    return path


def _pngs(folder: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            image.load()                                               # decodes the whole file
            sizes[png.stem] = image.size
    return sizes


def test_predict_on_the_synthetic_split_writes_results_and_pictures(checkpoint: Path, tmp_path: Path,
                                                                    synthetic_root: Path) -> None:
    out = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(checkpoint), "--split", "mini_val", "--samples", "2",
                 "--score-threshold", "0", "--out", str(out)]) == 0
    submission = json.loads((out / "results.json").read_text())
    assert submission["meta"]["use_camera"] and len(submission["results"]) == 2
    for token, boxes in submission["results"].items():
        assert boxes and all(b["sample_token"] == token for b in boxes)
        sizes = _pngs(out / token)
        assert set(sizes) == {"bev", "cameras", "aqr"}
        assert sizes["cameras"] == (3 * 352 * 2, 2 * 128 * 2)         # the six network inputs at 2x, 2 x 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds"]    # the staging folder was renamed


def test_predict_on_an_info_pkl_by_token(checkpoint: Path, tmp_path: Path, synthetic_root: Path) -> None:
    assert main(["create-infos", "--root", str(synthetic_root), "--version", "v1.0-mini",
                 "--out-dir", str(tmp_path)]) == 0
    pkl = tmp_path / "nuscenes_infos_val.pkl"
    cfg = load_config("tiny", [f"data.root={synthetic_root}", f"data.info_pkl_val={pkl}"])
    token = build_dataset(cfg, cfg.data.val_split, train=False).infos[3]["token"]
    out = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(checkpoint), "--info-pkl", str(pkl), "--root", str(synthetic_root),
                 "--token", token, "--out", str(out)]) == 0
    assert list(json.loads((out / "results.json").read_text())["results"]) == [token]
    assert set(_pngs(out / token)) == {"bev", "cameras", "aqr"}


def test_bad_inputs_give_one_error_line_and_leave_nothing(checkpoint: Path, tmp_path: Path, synthetic_root: Path,
                                                          capsys) -> None:
    from aqrcmt.data.synthetic import make_synthetic_nuscenes

    other = tmp_path / "other.safetensors"                              # tiny weights, a tiny_aqr config
    save_safetensors_atomic(build_model(load_config("tiny").model).state_dict(), other,
                            {"config": load_config("tiny_aqr").to_json()})
    root = make_synthetic_nuscenes(tmp_path / "data", scenes=2, samples_per_scene=2)
    cfg = load_config("tiny", [f"data.root={root}"])
    info = build_dataset(cfg, cfg.data.val_split, train=False).infos[0]
    image = resolve_path(info["cams"]["CAM_BACK"]["data_path"], root)
    image.unlink()
    out = tmp_path / "out"
    cases = [
        (["--checkpoint", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
        (["--checkpoint", str(other)], "does not fit"),
        (["--checkpoint", str(checkpoint), "--token", "not-a-token"], "not-a-token"),
        (["--checkpoint", str(checkpoint), "--root", str(root), "--token", info["token"]], str(image)),
    ]
    for args, named in cases:
        assert main(["predict", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.*")), args


# --------------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------------
def test_predict_sample_equals_the_dataset_path(checkpoint: Path, synthetic_root: Path) -> None:
    predictor = Predictor.from_checkpoint(checkpoint)
    detector = predictor.detector
    cfg = load_config("tiny_aqr", [f"data.root={synthetic_root}", "data.sweeps=1"])
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    (meta, expected), = predict_dataset(detector, [collate([dataset[2]])])

    raw = dataset.load_sample(2)                                         # before any transform
    calibration = CameraCalibration(intrinsics=raw.intrinsics[:, :3, :3], lidar2cam=raw.lidar2cam,
                                    lidar2global=raw.lidar2global)
    rgb = [view[..., ::-1] for view in raw.images]
    found = predictor.predict_sample(raw.points, rgb, calibration)
    as_tensor = predictor.predict_sample(raw.points, torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2),
                                         calibration)
    for got in (found.lidar, as_tensor.lidar):
        torch.testing.assert_close(got.boxes, expected.boxes)
        torch.testing.assert_close(got.scores, expected.scores)
        assert torch.equal(got.labels, expected.labels)
    # global frame: the centres the evaluation's writer exports
    exported = detections_to_results([expected], [meta])[meta.sample_token]
    centres = np.array([entry["translation"] for entry in exported])
    order = np.argsort(-expected.scores.numpy(), kind="stable")
    np.testing.assert_allclose(found.global_frame.boxes[order, :3].numpy(), centres, atol=1e-3)
    assert predictor.predict_sample(raw.points, rgb, CameraCalibration(calibration.intrinsics,
                                                                        calibration.lidar2cam)).global_frame is None
    with pytest.raises(ValueError, match="points"):
        predictor.predict_sample(raw.points[:, :4], rgb, calibration)
    with pytest.raises(ValueError, match="intrinsics"):
        predictor.predict_sample(raw.points, rgb, CameraCalibration(raw.intrinsics, raw.lidar2cam))


# --------------------------------------------------------------------------------------------------
# TensorBoard at every evaluation
# --------------------------------------------------------------------------------------------------
def test_validation_pictures_go_to_tensorboard(checkpoint: Path, synthetic_root: Path) -> None:
    from aqrcmt.training.loop import log_validation_pictures

    added = []
    writer = SimpleNamespace(add_image=lambda tag, picture, step, dataformats: added.append(
        (tag, picture.shape, picture.dtype, step, dataformats)))
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"),
                                  get_tracker=lambda name, unwrap: writer)
    cfg = load_config("tiny_aqr", [f"data.root={synthetic_root}", "data.sweeps=1"])
    run = SimpleNamespace(accelerator=accelerator, cfg=cfg, detector=load_detector_from_checkpoint(checkpoint)[0],
                          progress=SimpleNamespace(step=7))
    log_validation_pictures(run)
    assert sorted(tag for tag, *_ in added) == ["val_sample/aqr", "val_sample/bev", "val_sample/cameras"]
    assert all(len(shape) == 3 and shape[2] == 3 and dtype == np.uint8 and step == 7 and fmt == "HWC"
               for _, shape, dtype, step, fmt in added)
    cfg.train.tracker = None
    added.clear()
    log_validation_pictures(run)
    assert added == []
