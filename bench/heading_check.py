"""Is heading learnable and learned? Labels against LiDAR points, then a model's predictions and features.

    python bench/heading_check.py --config RUN/config.json [--checkpoint WEIGHTS] [--split val] [--samples 40]

1. Labels: for each car, truck and bus with >= 30 points in its box (grown by 0.3 m), the axis of the
   smallest-area rectangle around its points (the longer side) against the label's yaw, modulo pi; on loaded
   samples and on samples after the training pipeline (augmentations included).
2. Front and back in the points: per class, for objects with >= 20 key-frame points, where the points in the
   top 40 % of the box lie along the heading (mean, as a fraction of the length); the share on the rear side
   says how often this one hand-made cue alone tells the front (a car's cabin sits mid-rear).
3. Predictions (with --checkpoint): the val predictions (score > 0.2) matched to GT of the same class within 2 m;
   per class the mean yaw error, the mean axis error (modulo pi: front and back ignored; a random axis gives
   pi / 4 = 0.79 rad) and the share more than 90 degrees off.
4. Features (with --checkpoint): linear probes (ridge regression onto (cos, sin) of the yaw, and of twice the
   yaw for the axis) of the vehicles' features, fitted on the train split and scored on `--split`: the BEV map
   after the head's shared conv at the box centre (3 x 3 cells) and the last decoder layer's feature of the
   query nearest the box (within 2 m); beside them the model's own rotation output of that query.
5. The BEV heading map (with --checkpoint, on a model with ``model.head.bev_heading_weight`` > 0): its (sin, cos)
   at the vehicles' centres and at the centres of their nearest queries, and the queries' rotation as decoded
   (turned where it points against the map), each as yaw error, axis error and the share with the front right.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from aqrcmt.data import build_dataloader, build_dataset
from aqrcmt.data.box_geometry import points_in_boxes
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.models.bbox_coder import ROT_CODES, oriented_box_codes
from aqrcmt.models.position_encoding import read_bev_map
from aqrcmt.presets import load_config
from aqrcmt.structures import CLASS_NAMES

VEHICLES = tuple(CLASS_NAMES.index(name) for name in ("car", "truck", "bus"))
ANGLES = np.linspace(0.0, np.pi, 180, endpoint=False)


def axis_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| modulo pi, in [0, pi / 2] (rad)."""
    return np.abs((a - b + np.pi / 2) % np.pi - np.pi / 2)


def cloud_axis(xy: np.ndarray) -> float:
    """Direction (rad) of the longer side of the smallest-area rectangle around the (n, 2) points."""
    along, across = xy @ np.stack([np.cos(ANGLES), np.sin(ANGLES)]), xy @ np.stack([-np.sin(ANGLES), np.cos(ANGLES)])
    lengths, widths = np.ptp(along, axis=0), np.ptp(across, axis=0)
    best = int(np.argmin(lengths * widths))
    return ANGLES[best] if lengths[best] >= widths[best] else ANGLES[best] + np.pi / 2


def label_errors(samples) -> np.ndarray:
    errors = []
    for sample in samples:
        grown = sample.gt_boxes.copy()
        grown[:, 3:6] += 0.6
        inside = points_in_boxes(sample.points[:, :3], grown)
        for j, label in enumerate(sample.gt_labels):
            if label in VEHICLES and inside[:, j].sum() >= 30:
                errors.append(axis_error(cloud_axis(sample.points[inside[:, j], :2]), sample.gt_boxes[j, 6]))
    return np.array(errors)


def rear_cue(samples) -> dict[int, np.ndarray]:
    """Per class: where the key-frame points of the box's top 40 % lie along the heading (fraction of length)."""
    cues: dict[int, list[float]] = {}
    for sample in samples:
        key = sample.points[np.abs(sample.points[:, 4]) < 1e-3]
        inside = points_in_boxes(key[:, :3], sample.gt_boxes)
        for j, (box, label) in enumerate(zip(sample.gt_boxes, sample.gt_labels)):
            points = key[inside[:, j]]
            if len(points) < 20:
                continue
            along = (points[:, :2] - box[:2]) @ np.array([np.cos(box[6]), np.sin(box[6])])
            top = points[:, 2] > box[2] + 0.1 * box[5]              # above 60 % of the height from the bottom
            if 3 <= top.sum() < len(points) - 3:
                cues.setdefault(int(label), []).append(along[top].mean() / box[3])
    return {label: np.array(values) for label, values in sorted(cues.items())}


def prediction_errors(detector, loader) -> dict[int, np.ndarray]:
    """Per class: |yaw error| (rad) of the predictions (score > 0.2) matched to GT of that class within 2 m."""
    truth = {}

    def keep_gt(batch, _):
        for meta, boxes, labels in zip(batch.metas, batch.gt_boxes, batch.gt_labels):
            truth[meta.sample_token] = (boxes.numpy(), labels.numpy())

    errors: dict[int, list[float]] = {}
    for meta, found in predict_dataset(detector, loader, on_batch=keep_gt):
        gt_boxes, gt_labels = truth[meta.sample_token]
        confident = found.scores.numpy() > 0.2
        boxes, labels = found.boxes.numpy()[confident], found.labels.numpy()[confident]
        for label in np.unique(gt_labels):
            gt, pred = gt_boxes[gt_labels == label], boxes[labels == label]
            if not len(pred):
                continue
            distance = np.linalg.norm(gt[:, None, :2] - pred[None, :, :2], axis=-1)
            for i, j in enumerate(distance.argmin(axis=1)):
                if distance[i, j] < 2.0:
                    errors.setdefault(int(label), []).append(abs((pred[j, 6] - gt[i, 6] + np.pi) % (2 * np.pi) - np.pi))
    return {label: np.array(values) for label, values in sorted(errors.items())}


def vehicle_features(detector, loader) -> dict[str, np.ndarray]:
    """For each GT vehicle with a query within 2 m: "bev" (C * 9) the shared-conv BEV map around its centre, "query"
    (C) the last decoder layer's feature of the nearest query, "rot" (2) that query's (sin, cos), "yaw" (rad); with
    a BEV heading branch also "map_at_box" / "map_at_query" (2) its (sin, cos) at the box / query centre and
    "decoded_rot" (2) the query's (sin, cos) as decoded."""
    head, captured = detector.pts_bbox_head, {}
    hooks = [head.shared_conv.register_forward_hook(lambda m, i, out: captured.__setitem__("bev", out)),
             head.transformer.register_forward_hook(lambda m, i, out: captured.__setitem__("query", out))]
    x_min, y_min, _, x_max, y_max, _ = head.pc_range
    rows: dict[str, list] = {"bev": [], "query": [], "rot": [], "yaw": [], "map_at_box": [], "map_at_query": [],
                             "decoded_rot": []}
    try:
        with torch.no_grad():
            for batch in loader:
                outputs = detector(batch)
                bev = captured["bev"]
                height, width = bev.shape[-2:]
                decoded_rot = oriented_box_codes(outputs)[-1, ..., ROT_CODES]
                for b, (boxes, labels) in enumerate(zip(batch.gt_boxes, batch.gt_labels)):
                    for box, label in zip(boxes.numpy(), labels.numpy()):
                        col = int((box[0] - x_min) / (x_max - x_min) * width)
                        row = int((box[1] - y_min) / (y_max - y_min) * height)
                        distance = (outputs["center"][-1, b] - torch.from_numpy(box[:2]).float()).norm(dim=-1)
                        query = int(distance.argmin())
                        if label not in VEHICLES or not (0 < col < width - 1 and 0 < row < height - 1) \
                                or distance[query] > 2.0:
                            continue
                        rows["bev"].append(bev[b, :, row - 1:row + 2, col - 1:col + 2].flatten().numpy())
                        rows["query"].append(captured["query"][-1, b, query].numpy())
                        rows["rot"].append(outputs["rot"][-1, b, query].numpy())
                        rows["yaw"].append(box[6])
                        if "bev_heading" in outputs:
                            points = torch.stack((torch.from_numpy(box[:2]).float(), outputs["center"][-1, b, query]))
                            read = read_bev_map(outputs["bev_heading"][b:b + 1], points[None], head.pc_range)[0]
                            rows["map_at_box"].append(read[0].numpy())
                            rows["map_at_query"].append(read[1].numpy())
                            rows["decoded_rot"].append(decoded_rot[b, query].numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return {key: np.array(values) for key, values in rows.items()}


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, strength: float = 100.0) -> np.ndarray:
    """Ridge regression on standardised features (with a bias) fitted on the train rows, applied to the test rows."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    return b @ np.linalg.solve(a.T @ a + strength * np.eye(a.shape[1]), a.T @ train_y)


def yaw_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| wrapped to [0, pi] (rad)."""
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a preset or a run's config.json (data root and split inside)")
    p.add_argument("--checkpoint", help="weights whose predictions are checked")
    p.add_argument("--split", help="default: the config's val split")
    p.add_argument("--samples", type=int, default=40, help="samples of each kind for the label check")
    args = p.parse_args()
    cfg = load_config(args.config)
    split = args.split or cfg.data.val_split
    loaded = build_dataset(cfg, split, train=False)
    augmented = build_dataset(cfg, cfg.data.train_split, train=True)
    count = min(args.samples, len(loaded), len(augmented))
    for name, samples in (("loaded " + split, (loaded.load_sample(i) for i in range(count))),
                          ("augmented " + cfg.data.train_split, (augmented[i] for i in range(count)))):
        errors = label_errors(samples)
        print(f"labels vs points, {name}: {len(errors)} vehicles, axis error median {np.median(errors):.2f} rad, "
              f"mean {errors.mean():.2f} rad")
    for label, cue in rear_cue(loaded.load_sample(i) for i in range(count)).items():
        print(f"front/back cue, {CLASS_NAMES[label]:<22} n={len(cue):4d}  top of the box at {cue.mean():+.3f} of the "
              f"length along the heading, on the rear side for {np.mean(cue < 0):.0%}")
    if args.checkpoint:
        detector, _ = load_detector_from_checkpoint(args.checkpoint, cfg=cfg)
        for label, errors in prediction_errors(detector, build_dataloader(cfg, split, train=False)).items():
            axis = np.minimum(errors, np.pi - errors)
            print(f"predictions, {CLASS_NAMES[label]:<22} n={len(errors):4d}  yaw error {errors.mean():.2f} rad, "
                  f"axis error {axis.mean():.2f} rad, > 90 deg off {np.mean(errors > np.pi / 2):.0%}")
        fit = vehicle_features(detector, build_dataloader(cfg, cfg.data.train_split, train=False))
        test = vehicle_features(detector, build_dataloader(cfg, split, train=False))
        own = yaw_difference(np.arctan2(test["rot"][:, 0], test["rot"][:, 1]), test["yaw"])
        print(f"features, {len(fit['yaw'])} train / {len(test['yaw'])} {split} vehicles; the model's own rotation: "
              f"yaw error {own.mean():.2f}, axis error {np.minimum(own, np.pi - own).mean():.2f} rad, "
              f"|(sin, cos)| {np.linalg.norm(test['rot'], axis=1).mean():.2f}")
        for name in ("bev", "query"):
            errors = []
            for turns in (1, 2):                       # the yaw, then twice the yaw (the axis)
                target = np.stack([np.cos(turns * fit["yaw"]), np.sin(turns * fit["yaw"])], axis=1)
                guess = ridge_probe(fit[name], target, test[name])
                error = yaw_difference(np.arctan2(guess[:, 1], guess[:, 0]) / turns, test["yaw"])
                errors.append(error.mean() if turns == 1 else np.minimum(error, np.pi - error).mean())
            print(f"probe of the {name} features: yaw error {errors[0]:.2f} rad (random 1.57), axis error "
                  f"{errors[1]:.2f} rad (random 0.79)")
        for name in ("map_at_box", "map_at_query", "decoded_rot"):
            if len(test[name]):
                error = yaw_difference(np.arctan2(test[name][:, 0], test[name][:, 1]), test["yaw"])
                print(f"{name}: yaw error {error.mean():.2f}, axis error {np.minimum(error, np.pi - error).mean():.2f}"
                      f" rad, front right {np.mean(error < np.pi / 2):.0%}, |(sin, cos)| "
                      f"{np.linalg.norm(test[name], axis=1).mean():.2f}")


if __name__ == "__main__":
    main()
