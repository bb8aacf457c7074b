"""Average precision of one class by distance from the ego (the devkit's matching, restricted to range bins).

    python bench/ap_by_range.py --results RUN/eval/step_N/results_nusc.json --root ROOT --version V --split S \
        [--class-name car] [--bins 0 20 30 50]

GT and predictions are filtered to the bin by their distance from the ego (the devkit's ``ego_dist``), then
matched and scored as DetectionEval does (centre distance 0.5 / 1 / 2 / 4 m, AP above 10 % recall and
precision); the mean over the four thresholds is printed per bin with the GT count.
"""
from __future__ import annotations

import argparse
import tempfile

from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.utils import center_distance
from nuscenes.eval.detection.algo import accumulate, calc_ap
from nuscenes.eval.detection.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval

from aqrcmt.data.splits import open_nuscenes
from aqrcmt.eval.nuscenes_eval import EVAL_CONFIG


def in_bin(boxes: EvalBoxes, low: float, high: float) -> EvalBoxes:
    kept = EvalBoxes()
    for token in boxes.sample_tokens:
        kept.add_boxes(token, [b for b in boxes[token] if low <= b.ego_dist < high])
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--class-name", default="car")
    p.add_argument("--bins", type=float, nargs="+", default=[0.0, 20.0, 30.0, 50.0])
    args = p.parse_args()
    config = config_factory(EVAL_CONFIG)
    with tempfile.TemporaryDirectory() as scratch:      # the devkit insists on an output folder; nothing is kept
        evaluation = DetectionEval(open_nuscenes(args.root, args.version), config=config, result_path=args.results,
                                   eval_set=args.split, output_dir=scratch, verbose=False)
    for low, high in zip(args.bins[:-1], args.bins[1:]):
        gt, pred = in_bin(evaluation.gt_boxes, low, high), in_bin(evaluation.pred_boxes, low, high)
        count = sum(b.detection_name == args.class_name for token in gt.sample_tokens for b in gt[token])
        aps = [calc_ap(accumulate(gt, pred, args.class_name, center_distance, th), config.min_recall,
                       config.min_precision) for th in config.dist_ths]
        print(f"{args.class_name} {low:.0f}-{high:.0f} m: AP {sum(aps) / len(aps):.3f} ({count} GT boxes)")


if __name__ == "__main__":
    main()
