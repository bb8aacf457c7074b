"""Official nuScenes detection metrics for aqrcmt detections.

Path: ``Detections`` (LiDAR frame, see :mod:`aqrcmt.structures`) -> global-frame nuScenes boxes (moved by the
key frame's 4x4 lidar2global with :func:`aqrcmt.structures.transform_boxes`; gravity centre, size (w, l, h) =
(dy, dx, dz), rotation about z by the global yaw, velocity (vx, vy)) -> results JSON with a default attribute per
class -> ``nuscenes.eval.detection.DetectionEval`` (config ``detection_cvpr_2019``) -> a flat metrics dict.

Pitfalls handled here (``nuscenes.eval.detection``, nuscenes-devkit 1.1): the results must cover exactly the split's
samples; an all-empty submission crashes inside the devkit, so it is scored here as mAP = NDS = 0; at most
500 boxes per sample; velocities must be global; the JSON needs a ``meta`` entry.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pyquaternion import Quaternion

from aqrcmt.structures import CLASS_NAMES
from aqrcmt.data.files import DatasetError
from aqrcmt.data.splits import open_nuscenes, sample_tokens_of_split
from aqrcmt.errors import AqrcmtError
from aqrcmt.structures import Detections, SampleMeta, transform_boxes

MAX_BOXES_PER_SAMPLE = 500
EVAL_CONFIG = "detection_cvpr_2019"
TP_METRICS: dict[str, str] = {            # devkit name -> the usual abbreviation
    "trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE",
}
# mmdet3d's NuScenesDataset.DefaultAttribute; `attribute_name` applies its speed > 0.2 m/s rule on top.
DEFAULT_ATTRIBUTE: dict[str, str] = {
    "car": "vehicle.parked", "pedestrian": "pedestrian.moving", "trailer": "vehicle.parked",
    "truck": "vehicle.parked", "bus": "vehicle.moving", "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked", "bicycle": "cycle.without_rider", "barrier": "", "traffic_cone": "",
}
MOVING_SPEED = 0.2                        # m/s
_VEHICLES = ("car", "construction_vehicle", "bus", "truck", "trailer")
_CYCLES = ("bicycle", "motorcycle")


class EvaluationError(AqrcmtError, ValueError):
    """The inputs of an evaluation are inconsistent (root, version, split, or the predictions)."""


def attribute_name(class_name: str, speed: float) -> str:
    """The attribute the released code writes for a box of `class_name` moving at `speed` m/s."""
    if speed > MOVING_SPEED:
        if class_name in _VEHICLES:
            return "vehicle.moving"
        if class_name in _CYCLES:
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTE[class_name]
    if class_name == "pedestrian":
        return "pedestrian.standing"
    if class_name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTE[class_name]


def detections_to_results(detections: Sequence[Detections], metas: Sequence[SampleMeta],
                          class_names: Sequence[str] = CLASS_NAMES,
                          max_boxes: int = MAX_BOXES_PER_SAMPLE) -> dict[str, list[dict[str, Any]]]:
    """nuScenes results entries per sample token, in the global frame; the top `max_boxes` by score per sample."""
    if len(detections) != len(metas):
        raise EvaluationError(f"got {len(detections)} detections but {len(metas)} metas")
    results: dict[str, list[dict[str, Any]]] = {}
    for det, meta in zip(detections, metas):
        if meta.sample_token in results:
            raise EvaluationError(f"sample {meta.sample_token} appears twice in the detections")
        boxes = det.boxes.detach().to("cpu", torch.float64).numpy()
        scores = det.scores.detach().to("cpu", torch.float64).numpy()
        labels = det.labels.detach().cpu().numpy()
        if boxes.ndim != 2 or boxes.shape[1] != 9 or len(scores) != len(boxes) or len(labels) != len(boxes):
            raise EvaluationError(f"sample {meta.sample_token}: boxes must be (n, 9) with n scores and labels, got "
                                  f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise EvaluationError(f"sample {meta.sample_token}: non-finite boxes or scores")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise EvaluationError(f"sample {meta.sample_token}: labels must be in [0, {len(class_names)})")
        if (boxes[:, 3:6] <= 0).any():
            raise EvaluationError(f"sample {meta.sample_token}: box sizes (dx, dy, dz) must be > 0")
        order = np.argsort(-scores, kind="stable")[:max_boxes]
        try:
            moved = transform_boxes(torch.from_numpy(boxes[order]), meta.lidar2global).numpy()
        except ValueError as error:
            raise EvaluationError(f"sample {meta.sample_token}: lidar2global: {error}") from None
        entries = []
        for i, box in zip(order, moved):
            orientation = Quaternion(axis=(0.0, 0.0, 1.0), radians=float(box[6]))
            name = class_names[int(labels[i])]
            entries.append({
                "sample_token": meta.sample_token,
                "translation": [float(v) for v in box[:3]],
                "size": [float(box[4]), float(box[3]), float(box[5])],   # (w, l, h)
                "rotation": [float(v) for v in orientation.elements],
                "velocity": [float(box[7]), float(box[8])],
                "detection_name": name,
                "detection_score": float(scores[i]),
                "attribute_name": attribute_name(name, math.hypot(box[7], box[8])),
            })
        results[meta.sample_token] = entries
    return results


def write_results(results: dict[str, list[dict[str, Any]]], path: str | Path, use_camera: bool,
                  use_lidar: bool) -> Path:
    """Write the official submission format ``{"meta": ..., "results": ...}`` to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"use_camera": use_camera, "use_lidar": use_lidar, "use_radar": False, "use_map": False,
            "use_external": False}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return path


def evaluate_results_file(result_path: str | Path, root: str | Path, version: str, eval_set: str,
                          output_dir: str | Path, verbose: bool = False,
                          condition: Optional[str] = None) -> dict[str, Any]:
    """Run DetectionEval on a results JSON; write ``metrics_summary.json``, ``metrics_details.json`` and
    ``metrics.json`` (the flat dict returned here) to `output_dir`. `condition`: score only the samples of the
    split's scenes with that condition (:func:`aqrcmt.data.splits.scenes_with_condition`)."""
    result_path, output_dir = Path(result_path), Path(output_dir)
    submission = read_results_file(result_path)
    selection = f"{eval_set!r}" + (f" ({condition})" if condition else "")
    try:
        nusc = open_nuscenes(root, version)
        expected = set(sample_tokens_of_split(nusc, eval_set, condition))
    except (DatasetError, FileNotFoundError) as error:
        raise EvaluationError(str(error)) from None
    if not expected:
        raise EvaluationError(f"split {selection} has no samples in {root} ({version})")
    given = set(submission["results"])
    if given != expected:
        raise EvaluationError(
            f"results file {result_path} must cover exactly the {len(expected)} samples of {selection}: "
            f"{len(expected - given)} missing, {len(given - expected)} not in the split")
    output_dir.mkdir(parents=True, exist_ok=True)
    if sum(len(boxes) for boxes in submission["results"].values()) == 0:
        metrics = _empty_submission_metrics()
    else:
        evaluator = _detection_eval(nusc, submission, result_path, eval_set, expected, output_dir, verbose)
        summary_metrics, metric_data = evaluator.evaluate()
        summary = summary_metrics.serialize()
        summary["meta"] = submission["meta"]
        (output_dir / "metrics_summary.json").write_text(json.dumps(summary, indent=2))
        (output_dir / "metrics_details.json").write_text(json.dumps(metric_data.serialize(), indent=2))
        metrics = _flatten(summary)
    metrics["num_samples"] = len(expected)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _detection_eval(nusc: Any, submission: dict[str, Any], result_path: Path, eval_set: str, scored: set[str],
                    output_dir: Path, verbose: bool) -> Any:
    """The devkit's DetectionEval of the `submission` (read from `result_path`), scoring the samples `scored` of
    `eval_set`. The devkit scores whole splits: a submission of part of the split is given to it padded with no
    boxes for the split's other samples, whose GT and predictions are removed before it computes anything."""
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    split = sample_tokens_of_split(nusc, eval_set)
    with tempfile.TemporaryDirectory(dir=output_dir) as folder:
        if set(split) != scored:
            result_path = Path(folder) / "padded_results.json"
            result_path.write_text(json.dumps({"meta": submission["meta"], "results": {
                token: submission["results"].get(token, []) for token in split}}))
        evaluator = DetectionEval(nusc, config=config_factory(EVAL_CONFIG), result_path=str(result_path),
                                  eval_set=eval_set, output_dir=str(output_dir), verbose=verbose)
    for boxes in (evaluator.gt_boxes, evaluator.pred_boxes):
        for token in set(boxes.sample_tokens) - scored:
            del boxes.boxes[token]
    return evaluator


def read_results_file(path: str | Path) -> dict[str, Any]:
    """The submission ``{"meta": ..., "results": ...}`` of a results JSON, checked by :func:`validate_results`.

    Raises EvaluationError naming the file when it is missing or not JSON, and the sample and field when a box is
    malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"results file {path} does not exist")
    try:
        submission = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:   # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise EvaluationError(f"results file {path} is not valid JSON ({error})") from None
    validate_results(submission, f"results file {path}")
    return submission


_BOX_FIELDS: dict[str, tuple[int, str]] = {   # field -> (length, rule) of each box's number lists
    "translation": (3, "finite numbers (m, global frame)"),
    "size": (3, "finite numbers > 0 (w, l, h in m)"),
    "rotation": (4, "finite numbers, a quaternion (w, x, y, z) of non-zero norm"),
    "velocity": (2, "finite numbers (m/s, global frame)"),
}


def validate_results(submission: Any, source: str) -> None:
    """Check a submission before the devkit sees it (its checks are bare asserts): a ``meta`` dict, a
    ``results`` dict of sample token -> at most MAX_BOXES_PER_SAMPLE boxes, each with the official fields, finite
    numbers, sizes > 0, a known class and attribute. Raises EvaluationError naming `source`, the sample token,
    the box and the field."""
    from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES

    if not isinstance(submission, dict) or not isinstance(submission.get("meta"), dict) \
            or not isinstance(submission.get("results"), dict):
        raise EvaluationError(f"{source} needs a 'meta' object and a 'results' object (sample token -> boxes)")
    for token, boxes in submission["results"].items():
        if not isinstance(boxes, list):
            raise EvaluationError(f"{source}: sample {token}: the boxes must be a list, got {type(boxes).__name__}")
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise EvaluationError(f"{source}: sample {token} has {len(boxes)} boxes, at most "
                                  f"{MAX_BOXES_PER_SAMPLE} are allowed")
        for index, box in enumerate(boxes):
            where = f"{source}: sample {token} box {index}"
            if not isinstance(box, dict):
                raise EvaluationError(f"{where} is a {type(box).__name__}, not an object")
            missing = [k for k in ("sample_token", *_BOX_FIELDS, "detection_name", "detection_score",
                                   "attribute_name") if k not in box]
            if missing:
                raise EvaluationError(f"{where} lacks the field(s) {missing}")
            if box["sample_token"] != token:
                raise EvaluationError(f"{where}: field 'sample_token' is {box['sample_token']!r}, not its key")
            for name, (length, rule) in _BOX_FIELDS.items():
                value = box[name]
                ok = isinstance(value, list) and len(value) == length and all(_is_finite_number(v) for v in value)
                ok = ok and (name != "size" or min(value) > 0) and (name != "rotation" or any(value))
                if not ok:
                    raise EvaluationError(f"{where}: field {name!r} must be {length} {rule}, got {value!r}")
            if box["detection_name"] not in CLASS_NAMES:
                raise EvaluationError(f"{where}: field 'detection_name' {box['detection_name']!r} is not one of "
                                      f"{list(CLASS_NAMES)}")
            if not _is_finite_number(box["detection_score"]):
                raise EvaluationError(f"{where}: field 'detection_score' must be a finite number, got "
                                      f"{box['detection_score']!r}")
            if box["attribute_name"] != "" and box["attribute_name"] not in ATTRIBUTE_NAMES:
                raise EvaluationError(f"{where}: field 'attribute_name' {box['attribute_name']!r} is not '' nor one "
                                      f"of {list(ATTRIBUTE_NAMES)}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def evaluate_detections(detections: Sequence[Detections], metas: Sequence[SampleMeta], root: str | Path,
                        version: str, eval_set: str, output_dir: str | Path, use_camera: bool = True,
                        use_lidar: bool = True, verbose: bool = False,
                        condition: Optional[str] = None) -> dict[str, Any]:
    """Export `detections` (one per sample, LiDAR frame) to ``output_dir/results_nusc.json`` and score them
    (the samples of `eval_set`, or of its scenes with `condition`).

    Returns the flat metrics dict: ``mAP``, ``NDS``, ``mATE`` .. ``mAAE``, ``AP/<class>``, ``<TP>/<class>``.
    """
    results = detections_to_results(detections, metas)
    path = write_results(results, Path(output_dir) / "results_nusc.json", use_camera=use_camera, use_lidar=use_lidar)
    return evaluate_results_file(path, root, version, eval_set, output_dir, verbose=verbose, condition=condition)


def _flatten(summary: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"mAP": summary["mean_ap"], "NDS": summary["nd_score"]}
    for name, short in TP_METRICS.items():
        metrics[short] = summary["tp_errors"][name]
    for cls in CLASS_NAMES:
        metrics[f"AP/{cls}"] = summary["mean_dist_aps"][cls]
        for name, short in TP_METRICS.items():
            value = summary["label_tp_errors"][cls][name]
            metrics[f"{short[1:]}/{cls}"] = None if value is None or math.isnan(value) else value
    return metrics


def _empty_submission_metrics() -> dict[str, Any]:
    """What DetectionEval would report if it accepted a submission without a single box: nothing detected, so
    every AP is 0 and every TP error takes its worst value 1 (NDS = 0)."""
    summary = {"mean_ap": 0.0, "nd_score": 0.0, "tp_errors": {name: 1.0 for name in TP_METRICS},
               "mean_dist_aps": {cls: 0.0 for cls in CLASS_NAMES},
               "label_tp_errors": {cls: {name: 1.0 for name in TP_METRICS} for cls in CLASS_NAMES}}
    metrics = _flatten(summary)
    metrics["empty_predictions"] = True
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A text table: the summary line, then one row per class (AP and TP errors; '-' where not defined)."""
    head = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("mAP", "NDS", *TP_METRICS.values()))
    columns = [short[1:] for short in TP_METRICS.values()]
    lines = [head, f"{'class':<22}{'AP':>8}" + "".join(f"{c:>8}" for c in columns)]
    for cls in CLASS_NAMES:
        cells = [metrics[f"{c}/{cls}"] for c in columns]
        lines.append(f"{cls:<22}{metrics[f'AP/{cls}']:>8.4f}"
                     + "".join(f"{'-':>8}" if v is None else f"{v:>8.4f}" for v in cells))
    return "\n".join(lines)
