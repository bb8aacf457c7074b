"""Is heading learnable and learned? Labels against LiDAR points, then a model's predictions against labels.

    python bench/heading_check.py --config RUN/config.json [--checkpoint WEIGHTS] [--split val] [--samples 40]

1. Labels: for each car, truck and bus with >= 30 points in its box (grown by 0.3 m), the axis of the
   smallest-area rectangle around its points (the longer side) against the label's yaw, modulo pi; on loaded
   samples and on samples after the training pipeline (augmentations included).
2. Predictions (with --checkpoint): the val predictions (score > 0.2) matched to GT of the same class within 2 m;
   per class the mean yaw error, the mean axis error (modulo pi: front and back ignored; a random axis gives
   pi / 4 = 0.79 rad) and the share more than 90 degrees off.
"""
from __future__ import annotations

import argparse

import numpy as np

from aqrcmt.data import build_dataloader, build_dataset
from aqrcmt.data.box_geometry import points_in_boxes
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.inference import load_detector_from_checkpoint
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
    if args.checkpoint:
        detector, _ = load_detector_from_checkpoint(args.checkpoint, cfg=cfg)
        for label, errors in prediction_errors(detector, build_dataloader(cfg, split, train=False)).items():
            axis = np.minimum(errors, np.pi - errors)
            print(f"predictions, {CLASS_NAMES[label]:<22} n={len(errors):4d}  yaw error {errors.mean():.2f} rad, "
                  f"axis error {axis.mean():.2f} rad, > 90 deg off {np.mean(errors > np.pi / 2):.0%}")


if __name__ == "__main__":
    main()
