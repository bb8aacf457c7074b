"""The AQR study's measurements beyond mAP/NDS (health signals, val loss) and its report (markdown + plot)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from aqrcmt.checkpoint.io import atomic_write_bytes
from aqrcmt.checkpoint.weights import load_detector_from_checkpoint
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader

if TYPE_CHECKING:
    from aqrcmt.study import ArmResult, StudyPlan

AQR_PREFIX = "pts_bbox_head.aqr."
# Signals of the report's debug table, per modality (monitor names): weight mean -> map mean / max -> change.
TABLE_SIGNALS = ("weight_mean", "map_mean", "map_max", "relative_change", "energy_retention")


def measure_signals(cfg: Config, weights: Path, num_batches: int,
                    image: Optional[Path] = None) -> tuple[dict[str, float], float]:
    """(AQR health signals averaged over `num_batches` val batches ({} without AQR), mean val loss).

    The model is in eval mode (no denoising queries); `image`: where to draw the last batch's weight maps.
    """
    detector, _ = load_detector_from_checkpoint(weights, cfg=cfg, missing_ok_prefixes=(AQR_PREFIX,))
    with_aqr = detector.pts_bbox_head.aqr is not None
    totals: dict[str, float] = {}
    losses = []
    with torch.no_grad():
        for index, batch in enumerate(build_dataloader(cfg, cfg.data.val_split, train=False)):
            if index >= num_batches:
                break
            output = detector.loss(batch, monitor=with_aqr)
            losses.append(float(sum(output.losses.values())))
            for key, value in (output.monitor or {}).items():
                totals[key] = totals.get(key, 0.0) + float(value)
    if with_aqr and image is not None:
        image.parent.mkdir(parents=True, exist_ok=True)
        detector.save_monitor_images(image)
    count = max(len(losses), 1)
    return {k: v / count for k, v in totals.items()}, sum(losses) / count


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report_markdown(plan: "StudyPlan", pretrain_cfg: Config, results: list["ArmResult"]) -> str:
    """The report: the fork report's first table (before/after per arm) and its debug table (signals)."""
    lines = [
        "# AQR fine-tuning study", "",
        f"Benchmark: synthetic nuScenes {plan.version}, {plan.scenes} scenes x {plan.samples_per_scene} samples "
        f"(seed {plan.data_seed}); scored on the val scenes with the official DetectionEval.",
        f"Pretrained: plain `{pretrain_cfg.name}` CMT, {plan.pretrain_steps} steps, written as an official `.pth` and "
        "converted back. Every arm: the same seed and data order, "
        f"{plan.finetune_steps} steps at lr {plan.finetune_lr:g} with the AQR fork's multipliers (backbones frozen).",
        "", "## Accuracy before and after fine-tuning", "",
        _table_row(["arm", "settings", "mAP before", "mAP after", "change", "NDS before", "NDS after",
                    "val loss before", "val loss after"]),
        _table_row(["---"] * 9),
    ]
    for r in results:
        b, a = r.before, r.after
        change = (a["mAP"] - b["mAP"]) / b["mAP"] if b["mAP"] > 0 else float("nan")
        lines.append(_table_row([r.name, r.description, f"{b['mAP']:.4f}", f"{a['mAP']:.4f}", f"{change:+.1%}",
                                 f"{b['NDS']:.4f}", f"{a['NDS']:.4f}", f"{b['loss']:.3f}", f"{a['loss']:.3f}"]))
    lines += ["", "## mAP at 0, 1/4, 1/2 and all of the budget", "",
              _table_row(["arm", *[f"step {e['step']}" for e in results[0].evaluations]]),
              _table_row(["---"] * (1 + len(results[0].evaluations)))]
    for r in results:
        lines.append(_table_row([r.name, *[f"{e['mAP']:.4f}" for e in r.evaluations]]))
    lines += ["", "## AQR health signals on val batches (the report's debug table), at the start and the end", "",
              "weight mean -> rendered map mean / max -> 'loss' = map mean / weight mean - 1; feature relative "
              "change mean|out - x| / mean|x|; energy retention sum out^2 / sum x^2.", "",
              _table_row(["arm", "step", "map", "weight mean", "map mean", "loss", "map max", "rel. change",
                          "energy"]),
              _table_row(["---"] * 9)]
    for r in results:
        for e in (r.before, r.after):
            s = e["signals"]
            if not s:
                continue
            for modality, weight in (("bev", "lidar"), ("camera", "camera")):
                w, m = s[f"{weight}_weight_mean"], s[f"{modality}_map_mean"]
                loss = m / w - 1 if w else float("nan")
                lines.append(_table_row([r.name, str(e["step"]), modality, f"{w:.3f}", f"{m:.4f}", f"{loss:+.1%}",
                                         f"{s[f'{modality}_map_max']:.3f}", f"{s[f'{modality}_relative_change']:.1%}",
                                         f"{s[f'{modality}_energy_retention']:.1%}"]))
    lines += ["", "Plot: `map_vs_step.png`; rendered maps of each arm: `arms/<arm>/maps/step_*.png`.", ""]
    return "\n".join(lines)


def plot_map_vs_step(results: list["ArmResult"], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.plot([e["step"] for e in r.evaluations], [e["mAP"] for e in r.evaluations], marker="o", label=r.name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val mAP (official)")
    ax.set_title("AQR fine-tuning from a pretrained CMT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(plan: "StudyPlan", pretrain_cfg: Config, results: list["ArmResult"]) -> Path:
    """Write out/report.md and out/map_vs_step.png; returns the report's path."""
    plot_map_vs_step(results, plan.out / "map_vs_step.png")
    path = plan.out / "report.md"
    atomic_write_bytes(path, report_markdown(plan, pretrain_cfg, results).encode())
    return path
