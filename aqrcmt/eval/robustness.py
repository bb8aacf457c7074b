"""Robustness: the official metrics with missing sensors (LiDAR, all cameras, or one camera blanked) and under
sensor corruptions at three severities (:mod:`aqrcmt.data.corruptions`; RA and mRA as MultiCorrupt).

A :class:`ModalityDrop` is a batch transform applied after collation and before the model. It blanks inputs the
way the training-time ModalMask3D does, so the model sees the "sensor missing" input it was trained with:
dropped points are multiplied by 0 (they stay, as points at the origin), dropped images become black (raw
pixel value 0, i.e. ``-mean / std`` after normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from aqrcmt.structures import CAMERA_NAMES
from aqrcmt.data.corruptions import SensorCorruption
from aqrcmt.data.transforms import IMAGE_MEAN_BGR, IMAGE_STD_BGR
from aqrcmt.eval.nuscenes_eval import evaluate_detections
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.structures import Batch


@dataclass(frozen=True)
class ModalityDrop:
    """Blank the LiDAR (`lidar`) and/or the images of the named cameras (`cameras`) of every sample."""
    name: str
    lidar: bool = False
    cameras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [c for c in self.cameras if c not in CAMERA_NAMES]
        if unknown:
            raise ValueError(f"ModalityDrop {self.name!r}: unknown camera(s) {unknown}; known: {list(CAMERA_NAMES)}")

    def __call__(self, batch: Batch) -> Batch:
        points = [torch.zeros_like(p) for p in batch.points] if self.lidar else batch.points
        images = batch.images
        if self.cameras:
            if images is None:
                raise ValueError(f"ModalityDrop {self.name!r} blanks cameras but the batch has no images")
            black = torch.as_tensor(-IMAGE_MEAN_BGR / IMAGE_STD_BGR, dtype=images.dtype, device=images.device)
            images = images.clone()
            for camera in self.cameras:
                images[:, CAMERA_NAMES.index(camera)] = black.view(3, 1, 1)
        return Batch(points=points, images=images, lidar2img=batch.lidar2img, img_shape=batch.img_shape,
                     gt_boxes=batch.gt_boxes, gt_labels=batch.gt_labels, metas=batch.metas)


CLEAN = ModalityDrop("clean")


def standard_drops(with_lidar: bool, with_camera: bool) -> list[ModalityDrop]:
    """Clean, then for a fusion model: no LiDAR, no cameras, and each camera missing on its own."""
    drops = [CLEAN]
    if with_lidar and with_camera:
        drops += [ModalityDrop("no LiDAR", lidar=True), ModalityDrop("no cameras", cameras=CAMERA_NAMES)]
    if with_camera:
        drops += [ModalityDrop(f"no {camera}", cameras=(camera,)) for camera in CAMERA_NAMES]
    return drops


def evaluate_robustness(model: torch.nn.Module, loader: Iterable[Batch], root: str | Path, version: str,
                        eval_set: str, output_dir: str | Path, drops: Optional[Sequence[ModalityDrop]] = None,
                        device: torch.device | str = "cpu", condition: Optional[str] = None,
                        progress: bool = False) -> dict[str, dict[str, Any]]:
    """Official metrics per drop (default :func:`standard_drops` of the model's modalities), each evaluation
    written to ``output_dir/<drop name>/``. Returns {drop name: metrics dict}. progress: a labelled bar per drop
    (:func:`predict_dataset`).

    condition: the loader serves the samples of `eval_set`'s scenes with this condition, and only they are
    scored (:func:`aqrcmt.data.splits.scenes_with_condition`); the same in :func:`evaluate_corruptions`."""
    with_lidar, with_camera = _modalities(model)
    if drops is None:
        if with_lidar is None or with_camera is None:
            raise ValueError(f"cannot tell which inputs {type(model).__name__} uses (no `cfg`); pass `drops`")
        drops = standard_drops(with_lidar, with_camera)
    table: dict[str, dict[str, Any]] = {}
    for drop in drops:
        predicted = predict_dataset(model, loader, device, transform=drop,
                                    progress=f"evaluate {eval_set}: {drop.name}" if progress else None)
        table[drop.name] = evaluate_detections(
            [det for _, det in predicted], [meta for meta, _ in predicted], root, version, eval_set,
            Path(output_dir) / drop.name.replace(" ", "_"),
            use_camera=with_camera is not False and len(drop.cameras) < len(CAMERA_NAMES),
            use_lidar=with_lidar is not False and not drop.lidar, condition=condition)
    return table


def _modalities(model: torch.nn.Module) -> tuple[Optional[bool], Optional[bool]]:
    """(uses LiDAR, uses cameras) from the model's ModelConfig (``model.cfg``); None where unknown."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "lidar") or not hasattr(cfg, "camera"):
        return None, None
    return bool(cfg.lidar.enabled), bool(cfg.camera.enabled)


def format_robustness(table: dict[str, dict[str, Any]]) -> str:
    """One row per drop: mAP, NDS and their change from the first row (normally "clean")."""
    rows = list(table.items())
    base_map, base_nds = rows[0][1]["mAP"], rows[0][1]["NDS"]
    lines = [f"{'input':<22}{'mAP':>8}{'NDS':>8}{'dmAP':>8}{'dNDS':>8}"]
    for name, m in rows:
        lines.append(f"{name:<22}{m['mAP']:>8.4f}{m['NDS']:>8.4f}{m['mAP'] - base_map:>+8.4f}"
                     f"{m['NDS'] - base_nds:>+8.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Sensor corruptions (aqrcmt.data.corruptions) at three severities: RA and mRA
# --------------------------------------------------------------------------------------------------
def evaluate_corruptions(model: torch.nn.Module, loader: Iterable[Batch], root: str | Path, version: str,
                         eval_set: str, output_dir: str | Path, corruptions: Sequence[SensorCorruption],
                         device: torch.device | str = "cpu", condition: Optional[str] = None,
                         progress: bool = False) -> dict[str, Any]:
    """Official metrics clean and under each corruption (applied by the loader's dataset to every loaded sample),
    each evaluation written to ``output_dir/<name>_s<severity>/``. Returns :func:`corruption_table`'s table.
    progress: a labelled bar per evaluation (:func:`predict_dataset`)."""
    dataset = getattr(loader, "dataset", None)
    if not hasattr(dataset, "set_corruption"):
        raise ValueError(f"the loader's dataset ({type(dataset).__name__}) cannot apply sensor corruptions")
    with_lidar, with_camera = _modalities(model)
    output_dir = Path(output_dir)

    def evaluate(folder: str) -> dict[str, Any]:
        predicted = predict_dataset(model, loader, device,
                                    progress=f"evaluate {eval_set}: {folder}" if progress else None)
        return evaluate_detections([det for _, det in predicted], [meta for meta, _ in predicted], root, version,
                                   eval_set, output_dir / folder, use_camera=with_camera is not False,
                                   use_lidar=with_lidar is not False, condition=condition)

    dataset.set_corruption(None)
    clean = evaluate("clean")
    corrupted: dict[str, dict[int, dict[str, Any]]] = {}
    try:
        for corruption in corruptions:
            dataset.set_corruption(corruption)
            corrupted.setdefault(corruption.name, {})[corruption.severity] = \
                evaluate(f"{corruption.name}_s{corruption.severity}")
    finally:
        dataset.set_corruption(None)
    return corruption_table(clean, corrupted)


def corruption_table(clean: dict[str, Any], corrupted: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """``{"clean": {mAP, NDS}, "corruptions": {name: {"severities": {s: {mAP, NDS, RA}}, "RA": mean}}, "mRA"}``.

    RA = NDS_corrupted / NDS_clean (MultiCorrupt's resistance ability); a corruption's RA is the mean over its
    severities, mRA the mean of those. RAs are None when the clean NDS is 0.
    """
    def ratio(nds: float) -> Optional[float]:
        return nds / clean["NDS"] if clean["NDS"] > 0 else None

    table: dict[str, Any] = {"clean": {"mAP": clean["mAP"], "NDS": clean["NDS"]}, "corruptions": {}}
    for name, by_severity in corrupted.items():
        rows = {str(s): {"mAP": m["mAP"], "NDS": m["NDS"], "RA": ratio(m["NDS"])}
                for s, m in sorted(by_severity.items())}
        ras = [row["RA"] for row in rows.values()]
        table["corruptions"][name] = {"severities": rows, "RA": None if None in ras else sum(ras) / len(ras)}
    means = [c["RA"] for c in table["corruptions"].values()]
    table["mRA"] = None if not means or None in means else sum(means) / len(means)
    return table


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_corruptions(tables: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per corruption x severity, with mAP / NDS / RA per model (label -> table)."""
    labels = list(tables)
    first = tables[labels[0]]
    header = "| corruption | severity | " + " | ".join(f"{label} mAP | {label} NDS | {label} RA" for label in labels)
    lines = [header + " |", "|---|---|" + "---|---|---|" * len(labels)]
    lines.append("| clean | - | " + " | ".join(f"{_number(t['clean']['mAP'])} | {_number(t['clean']['NDS'])} | 1"
                                              for t in tables.values()) + " |")
    for name, entry in first["corruptions"].items():
        for severity in entry["severities"]:
            cells = []
            for table in tables.values():
                row = table["corruptions"][name]["severities"][severity]
                cells.append(f"{_number(row['mAP'])} | {_number(row['NDS'])} | {_number(row['RA'])}")
            lines.append(f"| {name} | {severity} | " + " | ".join(cells) + " |")
    lines.append("| **mRA** | | " + " | ".join(f" | | **{_number(t['mRA'])}**" for t in tables.values()) + " |")
    return "\n".join(lines)


def plot_corruptions(tables: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """RA per corruption, one bar per severity, one panel per model (matplotlib Agg) -> `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(tables.values()))["corruptions"])
    severities = list(next(iter(tables.values()))["corruptions"][names[0]]["severities"]) if names else []
    figure, axes = plt.subplots(len(tables), 1, figsize=(max(6.0, 0.9 * len(names) + 2), 3.2 * len(tables)),
                                squeeze=False, sharey=True)
    width = 0.8 / max(len(severities), 1)
    for ax, (label, table) in zip(axes[:, 0], tables.items()):
        for j, severity in enumerate(severities):
            values = [table["corruptions"][n]["severities"][severity]["RA"] or 0.0 for n in names]
            ax.bar([i + (j - (len(severities) - 1) / 2) * width for i in range(len(names))], values, width,
                   label=f"severity {severity}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("RA = NDS / NDS clean")
        ax.set_title(f"{label}: mRA {_number(table['mRA'])}")
        ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
