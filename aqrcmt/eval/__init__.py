"""Evaluation: the prediction loop (predict), the official nuScenes detection metrics (nuscenes_eval) and
sensor-drop robustness (robustness); the `aqrcmt evaluate` command is :mod:`aqrcmt.tools.evaluate`."""
from aqrcmt.eval.nuscenes_eval import (
    EvaluationError, detections_to_results, evaluate_detections, evaluate_results_file, format_metrics,
    write_results,
)
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.eval.robustness import ModalityDrop, evaluate_robustness, format_robustness, standard_drops

__all__ = [
    "EvaluationError", "detections_to_results", "evaluate_detections", "evaluate_results_file", "format_metrics",
    "write_results", "ModalityDrop", "evaluate_robustness", "format_robustness", "predict_dataset", "standard_drops",
]
