"""The AQR study: does AQR earn its place over a pretrained CMT, under sensor failures and in clean weather?

    run_study(StudyPlan(out=Path("study")))       # `aqrcmt study --out study [--quick]`

1. The synthetic benchmark (train scenes / held-out val scenes) is written to ``out/data``, and a second one of
   another seed with many night and rain scenes to ``out/conditions`` (none of it is trained on).
2. A plain tiny CMT is pretrained with ModalMask3D (as the released fusion model is), starting from a camera-only
   tiny CMT trained first (``out/pretrain_camera``; the released fusion model too starts from trained image
   weights), written in the official ``.pth`` layout and brought back with the converter (``out/pretrained``):
   the path a user takes with the released weights. It is evaluated like every arm
   (``out/pretrained/evaluation.json``).
3. Every arm fine-tunes that model for the same number of steps, seeds and data order, with failure-aware training
   (ModalMask3D plus the failure scenarios of :data:`TRAIN_FAILURES`): plain CMT continued (the control), the
   fork's original AQR (the collapse), the recommended AQR end to end, with identity start, and with router
   supervision on a frozen base and end to end.
4. Each (arm, seed) is scored on the clean val scenes (official DetectionEval), under every failure scenario of
   :data:`EVAL_FAILURES` (those not trained on are the held-out failures), on the night / rain / clear scenes of
   the conditions benchmark, and its routing is measured: the mean query weight of a failed modality on failed
   entries against intact ones (:class:`aqrcmt.models.aqr.routing.RoutingEvidence`).
5. The corruption mRA of the control and the best AQR arm, rendered maps of the best arm under LiDAR and view
   drop, and ``out/report.md`` with mean +- standard deviation over seeds.

Finished pieces are kept: re-running on a partly done ``out`` resumes (benchmarks, pretrained weights, every
finished (arm, seed) and evaluation are reused; an unfinished run restarts).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from aqrcmt.atomic import atomic_write_bytes
from aqrcmt.checkpoint.convert import convert
from aqrcmt.checkpoint.weights import AQR_PREFIX, load_weights
from aqrcmt.config import Config
from aqrcmt.data import build_dataloader
from aqrcmt.data.corruptions import CORRUPTIONS, FAILURES, SensorCorruption
from aqrcmt.data.splits import CUSTOM_SPLITS_FILE, TRAIN_VAL_SPLITS, open_nuscenes, sample_tokens_of_split
from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.data.synthetic.world import ConditionShares
from aqrcmt.eval.nuscenes_eval import evaluate_detections
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.eval.robustness import corruption_table
from aqrcmt.eval.visualize import render_aqr, save_png
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.models import build_model
from aqrcmt.models.aqr.routing import RoutingEvidence
from aqrcmt.models.detector import CmtDetector
from aqrcmt.presets import AQR_FORK_LR_MULTS, MAIN_JOB_BENCHMARK, MAIN_JOB_STEPS, SyntheticBenchmark, load_config
from aqrcmt.training.loop import TrainOptions, train

# Failure-aware training: ModalMask3D drops whole modalities (LiDAR drop, camera drop); these are drawn on top.
TRAIN_FAILURE_PROBABILITIES: dict[str, float] = {"view_drop": 0.15, "limited_fov": 0.15}
TRAIN_FAILURES: tuple[str, ...] = ("lidar_drop", "camera_drop", *TRAIN_FAILURE_PROBABILITIES)
# (scenario, severity, label) of each failure evaluation; the field's settings (docs/robustness.md).
EVAL_FAILURES: tuple[tuple[str, int, str], ...] = (
    ("lidar_drop", 1, "LiDAR drop"), ("camera_drop", 1, "camera drop"), ("view_drop", 1, "1 view dropped"),
    ("view_drop", 3, "3 views dropped"), ("limited_fov", 2, "front +-60 deg FOV"),
    ("beam_reduction", 1, "16 beams"), ("beam_reduction", 2, "8 beams"), ("beam_reduction", 3, "4 beams"),
    ("object_failure", 2, "object failure (half)"),
)
assert {name for name, _, _ in EVAL_FAILURES} == set(FAILURES) and set(TRAIN_FAILURES) <= set(FAILURES)
# Fine-tuning at batch 2 keeps every BatchNorm's statistics: batch statistics would rescale a batch's BEV features
# by whether its other sample's LiDAR was dropped, and normalise a batch of two dropped samples back to the
# magnitude of a working LiDAR (the router could not learn what a drop looks like).
FINETUNE_BATCHNORM = ('optim.batchnorm_eval=[""]',)
FAILURE_SPLIT = "val_failures"          # custom split of the benchmark: the val scenes the failures are scored on
CONDITIONS_SPLIT = "all"                # custom split of the conditions benchmark: every scene
SCORED_CONDITIONS = ("night", "rain", "clear")
# Parameters of the fusion model that a camera-only model lacks (the LiDAR branch and the head's BEV convolutions).
LIDAR_ONLY_KEYS = ("pts_middle_encoder.*", "pts_backbone.*", "pts_neck.*", "pts_bbox_head.shared_conv.*",
                   "pts_bbox_head.bev_heading.*")
METRICS = ("mAP", "NDS", "mATE", "mAOE")


@dataclass(frozen=True)
class Arm:
    """One fine-tuning recipe: a preset and the overrides that make it differ from the others."""
    name: str
    preset: str
    description: str
    overrides: tuple[str, ...] = ()


IDENTITY = "model.aqr.identity_start=true"
# A supervised router sees each modality's evidence over its whole sector / view: its local windows alone do
# not tell a dropped LiDAR from an empty street (docs/aqr_study.md, "Why the LiDAR weight did not route").
SUPERVISED = (IDENTITY, "model.aqr.router_loss_weight={router}", "model.aqr.generator.sensor_evidence=true")
ARMS: tuple[Arm, ...] = (
    Arm("control", "tiny", "plain CMT, fine-tuned on (no AQR)"),
    Arm("fork_original", "tiny_aqr_fork_original",
        "the fork's collapsed run: tanh, sum kernel s2, /max over views, invisible at (0,0), DN rendered, "
        "min-max, additive r 0.1"),
    Arm("recommended", "tiny_aqr_recommended", "recommended (normalized kernel s2, convex r 0.5), end to end"),
    Arm("recommended_identity", "tiny_aqr_recommended", "recommended with identity start", (IDENTITY,)),
    Arm("supervised_frozen", "tiny_aqr_recommended", "identity start + router supervision, AQR trained alone",
        (*SUPERVISED, "optim.train_only_aqr=true")),
    Arm("supervised_e2e", "tiny_aqr_recommended", "identity start + router supervision, end to end",
        SUPERVISED),
)
ARM_NAMES = tuple(arm.name for arm in ARMS)


@dataclass(frozen=True)
class StudyPlan:
    """What the study runs. Steps are optimizer steps; the same for every arm and seed."""
    out: Path
    arms: tuple[str, ...] = ARM_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    benchmark: SyntheticBenchmark = MAIN_JOB_BENCHMARK
    conditions_benchmark: SyntheticBenchmark = SyntheticBenchmark("v1.0-trainval", scenes=6, samples_per_scene=5,
                                                                  seed=2)
    condition_shares: ConditionShares = ConditionShares(night=0.6, rain=0.4, fog=0.0)
    failure_scenes: int = 3              # val scenes the failure scenarios are scored on
    camera_pretrain_steps: int = MAIN_JOB_STEPS  # camera-only steps before the ModalMask3D pretraining (0: none)
    pretrain_steps: int = MAIN_JOB_STEPS
    finetune_steps: int = 100
    finetune_lr: float = 2e-4            # the fork's base learning rate, with its multipliers
    aqr_lr_mult: float = 50.0            # the AQR module's multiplier (the fork's: 1): a new module, trained at 1e-2
    router_loss_weight: float = 20.0
    robustness_corruptions: tuple[str, ...] = tuple(c for c in CORRUPTIONS if c not in FAILURES)
    robustness_severity: int = 2
    overrides: tuple[str, ...] = ()      # config overrides applied to every arm after its own (``--set``)

    @classmethod
    def quick(cls, out: Path, arms: tuple[str, ...] = ARM_NAMES) -> "StudyPlan":
        """Every arm for a few steps on a small benchmark: the end-to-end check (minutes)."""
        return cls(out=out, arms=arms, seeds=(0,),
                   benchmark=SyntheticBenchmark("v1.0-mini", scenes=3, samples_per_scene=2, seed=0),
                   conditions_benchmark=SyntheticBenchmark("v1.0-mini", scenes=3, samples_per_scene=2, seed=1),
                   condition_shares=ConditionShares(night=1.0, rain=1.0, fog=0.0), failure_scenes=1,
                   camera_pretrain_steps=4, pretrain_steps=4, finetune_steps=4,
                   robustness_corruptions=("brightness",))

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARM_NAMES]
        if unknown:
            raise ValueError(f"unknown study arm(s) {unknown}; known arms: {list(ARM_NAMES)}")
        if self.finetune_steps < 1 or self.pretrain_steps < 1 or self.camera_pretrain_steps < 0 or not self.seeds:
            raise ValueError(f"finetune_steps and pretrain_steps must be >= 1, camera_pretrain_steps >= 0 and seeds "
                             f"not empty, got {self.finetune_steps}, {self.pretrain_steps}, "
                             f"{self.camera_pretrain_steps}, {self.seeds}")


# ------------------------------------------------------------------------------------------------------
# The phases
# ------------------------------------------------------------------------------------------------------
def run_study(plan: StudyPlan, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the study of `plan`; returns the path of report.md."""
    start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    data_root, conditions_root = prepare_benchmarks(plan, log)
    weights, pretrain_cfg = pretrain(plan, data_root, log)
    pretrained = evaluate_once(plan.out / "pretrained" / "evaluation.json", log, "pretrained model",
                               lambda: evaluate_model(plan, pretrain_cfg, weights, data_root, conditions_root,
                                                      plan.out / "pretrained" / "eval", with_condition_drops=True))
    # seed by seed, so that a study stopped early holds every arm for its first seeds
    results = [run_arm(plan, arm, seed, data_root, conditions_root, weights, log)
               for seed in plan.seeds for arm in ARMS if arm.name in plan.arms]
    best = best_aqr_arm(results)
    robustness = {}
    for name in dict.fromkeys(n for n in ("control", best) if n in plan.arms and n is not None):
        robustness[name] = evaluate_once(plan.out / "arms" / name / "robustness.json", log, f"{name} robustness",
                                         lambda n=name: corruption_mra(plan, n, data_root))
    if best is not None:
        draw_failure_maps(plan, best, data_root)
    minutes = (time.perf_counter() - start) / 60
    return write_report(plan, pretrain_cfg, pretrained, results, robustness, best, minutes)


def prepare_benchmarks(plan: StudyPlan, log: Callable[[str], None]) -> tuple[Path, Path]:
    """The benchmark (out/data, with its failure split) and the conditions benchmark (out/conditions)."""
    roots = []
    for folder, benchmark, shares, splits in (
            ("data", plan.benchmark, ConditionShares(), _failure_split(plan)),
            ("conditions", plan.conditions_benchmark, plan.condition_shares, _all_scenes)):
        root = plan.out / folder
        tables = root / benchmark.version
        if not (tables / "sample.json").is_file():
            log(f"[study] writing the synthetic benchmark {folder} to {root}")
            make_synthetic_nuscenes(root, **asdict(benchmark), conditions=shares, overwrite=root.exists())
        if not (tables / CUSTOM_SPLITS_FILE).is_file():
            atomic_write_bytes(tables / CUSTOM_SPLITS_FILE, json.dumps(splits(root, benchmark)).encode())
        roots.append(root)
    return roots[0], roots[1]


def _failure_split(plan: StudyPlan) -> Callable[[Path, SyntheticBenchmark], dict]:
    def splits(root: Path, benchmark: SyntheticBenchmark) -> dict:
        nusc = open_nuscenes(root, benchmark.version)
        val = TRAIN_VAL_SPLITS[benchmark.version][1]
        val_scenes = sorted({nusc.get("scene", nusc.get("sample", t)["scene_token"])["name"]
                             for t in sample_tokens_of_split(nusc, val)})
        return {FAILURE_SPLIT: val_scenes[: plan.failure_scenes]}
    return splits


def _all_scenes(root: Path, benchmark: SyntheticBenchmark) -> dict:
    return {CONDITIONS_SPLIT: sorted(scene["name"] for scene in open_nuscenes(root, benchmark.version).scene)}


def _base_overrides(plan: StudyPlan, data_root: Path, run_dir: Path, seed: int) -> list[str]:
    train_split, val_split = TRAIN_VAL_SPLITS[plan.benchmark.version]
    return [f"data.root={data_root}", f"data.version={plan.benchmark.version}", f"data.train_split={train_split}",
            f"data.val_split={val_split}", f"train.output_dir={run_dir}", f"train.seed={seed}",
            "train.epochs=100000", "train.eval_every_epochs=0", "data.augment.modality_drop=true"]


def camera_pretrain(plan: StudyPlan, data_root: Path, log: Callable[[str], None]) -> Path:
    """Camera-only tiny CMT on the train scenes (no modality drop: it has one modality); returns its weights."""
    run_dir, weights = plan.out / "pretrain_camera", plan.out / "pretrained" / "cmt_tiny_camera.safetensors"
    if weights.is_file():
        log(f"[study] reusing the camera-only model {weights}")
        return weights
    if run_dir.exists():
        shutil.rmtree(run_dir)                       # an unfinished pretraining restarts
    cfg = load_config("tiny", [*_base_overrides(plan, data_root, run_dir, seed=0), "model.lidar.enabled=false",
                               "data.augment.modality_drop=false", f"train.max_steps={plan.camera_pretrain_steps}"])
    log(f"[study] pretraining camera-only tiny CMT for {plan.camera_pretrain_steps} steps in {run_dir}")
    result = train(cfg, TrainOptions())
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, (result.last_checkpoint / "model.safetensors").read_bytes())
    return weights


def pretrain(plan: StudyPlan, data_root: Path, log: Callable[[str], None]) -> tuple[Path, Config]:
    """Plain tiny CMT with ModalMask3D on the train scenes, from the camera-only model when
    ``plan.camera_pretrain_steps`` -> official .pth layout -> converted back."""
    run_dir, folder = plan.out / "pretrain", plan.out / "pretrained"
    official, converted = folder / "cmt_tiny_official.pth", folder / "cmt_tiny.safetensors"
    cfg_path = run_dir / "config.json"
    if converted.is_file() and cfg_path.is_file():
        cfg = load_config(str(cfg_path))
        load_weights(build_model(cfg.model), converted, missing_ok_prefixes=())   # CheckpointError if it does not fit
        log(f"[study] reusing the pretrained model {converted}")
        return converted, cfg
    camera = camera_pretrain(plan, data_root, log) if plan.camera_pretrain_steps else None
    if run_dir.exists():
        shutil.rmtree(run_dir)                       # an unfinished pretraining restarts
    cfg = load_config("tiny", [*_base_overrides(plan, data_root, run_dir, seed=0),
                               f"train.max_steps={plan.pretrain_steps}"])
    log(f"[study] pretraining plain tiny CMT with ModalMask3D for {plan.pretrain_steps} steps in {run_dir}"
        + (f", from {camera}" if camera else ""))
    options = TrainOptions(load_from=str(camera), allow_missing=list(LIDAR_ONLY_KEYS)) if camera else TrainOptions()
    result = train(cfg, options)
    folder.mkdir(parents=True, exist_ok=True)
    for path in (official, converted):
        path.unlink(missing_ok=True)
    convert(result.last_checkpoint / "model.safetensors", official, str(cfg_path), reverse=True)
    convert(official, converted, str(cfg_path))
    log(f"[study] pretrained weights: {official} (official layout) -> {converted}")
    return converted, cfg


def arm_config(plan: StudyPlan, arm: Arm, seed: int, data_root: Path, run_dir: Path) -> Config:
    """The fine-tuning config of (arm, seed): failure-aware data, the fork's multipliers, the arm's settings."""
    with_aqr = load_config(arm.preset).model.aqr.enabled
    lr_mults = {k: v for k, v in AQR_FORK_LR_MULTS.items() if with_aqr or not (k + ".").startswith(AQR_PREFIX)}
    if with_aqr:
        lr_mults[AQR_PREFIX.rstrip(".")] = plan.aqr_lr_mult
    overrides = [o.format(router=plan.router_loss_weight) for o in arm.overrides]
    return load_config(arm.preset, [*_base_overrides(plan, data_root, run_dir, seed),
                                    f"data.augment.failures={json.dumps(TRAIN_FAILURE_PROBABILITIES)}",
                                    f"train.max_steps={plan.finetune_steps}", f"optim.lr={plan.finetune_lr}",
                                    f"optim.lr_mults={json.dumps(lr_mults)}", *FINETUNE_BATCHNORM, *overrides,
                                    *plan.overrides])


def run_arm(plan: StudyPlan, arm: Arm, seed: int, data_root: Path, conditions_root: Path, weights: Path,
            log: Callable[[str], None]) -> dict:
    """Fine-tune (arm, seed) from `weights` and evaluate it; the record is kept in ``result.json``."""
    run_dir = plan.out / "arms" / arm.name / f"seed_{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        log(f"[study] {arm.name} seed {seed}: finished earlier, reusing {done}")
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)                       # an unfinished run restarts
    cfg = arm_config(plan, arm, seed, data_root, run_dir)
    log(f"[study] {arm.name} seed {seed} ({arm.description}): {plan.finetune_steps} steps from {weights}")
    start = time.perf_counter()
    final = train(cfg, TrainOptions(load_from=str(weights)))          # evaluates its last step on clean val
    record = {"arm": arm.name, "seed": seed, "description": arm.description,
              "clean": {k: final.metrics[k] for k in METRICS},
              "train_minutes": (time.perf_counter() - start) / 60}
    record.update(evaluate_model(plan, cfg, final.last_checkpoint / "model.safetensors", data_root,
                                 conditions_root, run_dir / "eval", clean=False))
    if seed == plan.seeds[0]:                        # step 0: the pretrained weights with the arm's AQR switched on
        record["step0"] = evaluate_clean(cfg, weights, data_root, run_dir / "eval" / "step0")
    record["minutes"] = (time.perf_counter() - start) / 60
    atomic_write_bytes(done, json.dumps(record, indent=1).encode())
    log(f"[study] {arm.name} seed {seed}: clean mAP {record['clean']['mAP']:.4f}, LiDAR drop NDS "
        f"{record['failures']['lidar_drop_s1']['NDS']:.4f}, camera drop NDS "
        f"{record['failures']['camera_drop_s1']['NDS']:.4f} ({record['minutes']:.1f} min)")
    return record


def evaluate_once(path: Path, log: Callable[[str], None], what: str, evaluate: Callable[[], dict]) -> dict:
    """`evaluate()` kept in `path` (reused by a rerun)."""
    if path.is_file():
        log(f"[study] {what}: evaluated earlier, reusing {path}")
        return json.loads(path.read_text())
    result = evaluate()
    atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    return result


# ------------------------------------------------------------------------------------------------------
# Evaluations
# ------------------------------------------------------------------------------------------------------
def _load(cfg: Config, weights: Path) -> CmtDetector:
    detector, _ = load_detector_from_checkpoint(weights, cfg=cfg, missing_ok_prefixes=(AQR_PREFIX,))
    return detector


def _score(detector: CmtDetector, cfg: Config, root: Path, version: str, split: str, folder: Path,
           corruption: Optional[SensorCorruption] = None,
           conditions: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """({"all" or each condition: metrics}, routing summary) of `detector` on `split` under `corruption`."""
    loader = build_dataloader(cfg, split, train=False)
    loader.dataset.set_corruption(corruption)
    evidence = RoutingEvidence()
    aqr = detector.pts_bbox_head.aqr

    def visit(batch, _):
        if aqr is not None:
            evidence.add(aqr.last_routing, batch.sensors)

    predicted = predict_dataset(detector, loader, on_batch=visit)
    scores = {}
    nusc = open_nuscenes(root, version) if conditions else None
    for condition in conditions or (None,):
        tokens = set(sample_tokens_of_split(nusc, split, condition)) if condition else None
        chosen = [(m, d) for m, d in predicted if tokens is None or m.sample_token in tokens]
        if not chosen:
            continue
        metrics = evaluate_detections([d for _, d in chosen], [m for m, _ in chosen], root, version, split,
                                      folder / (condition or "all"), condition=condition)
        scores[condition or "all"] = {k: metrics[k] for k in METRICS}
    return scores, evidence.summary()


def evaluate_clean(cfg: Config, weights: Path, data_root: Path, folder: Path) -> dict:
    """Metrics on the clean val scenes of the model of `cfg` with `weights` (AQR weights may be missing)."""
    return _score(_load(cfg, weights), cfg, data_root, cfg.data.version, cfg.data.val_split, folder)[0]["all"]


def evaluate_model(plan: StudyPlan, cfg: Config, weights: Path, data_root: Path, conditions_root: Path,
                   folder: Path, clean: bool = True, with_condition_drops: bool = False) -> dict:
    """Clean val (when `clean`), every failure scenario, the conditions benchmark by condition (also with LiDAR
    or cameras dropped when `with_condition_drops`) and the routing evidence of each."""
    detector = _load(cfg, weights)
    version = cfg.data.version
    record: dict = {"failures": {}, "conditions": {}, "routing": {}}
    if clean:
        record["clean"] = _score(detector, cfg, data_root, version, cfg.data.val_split, folder / "clean")[0]["all"]
    for name, severity, _ in EVAL_FAILURES:
        key = f"{name}_s{severity}"
        scores, routing = _score(detector, cfg, data_root, version, FAILURE_SPLIT, folder / key,
                                 SensorCorruption(name, severity))
        record["failures"][key], record["routing"][key] = scores["all"], routing
    conditions_cfg = copy.deepcopy(cfg)
    conditions_cfg.data.root, conditions_cfg.data.version = str(conditions_root), plan.conditions_benchmark.version
    drops = [("clean", None)] + ([("lidar_drop", SensorCorruption("lidar_drop", 1)),
                                  ("camera_drop", SensorCorruption("camera_drop", 1))] if with_condition_drops else [])
    for label, corruption in drops:
        scores, routing = _score(detector, conditions_cfg, conditions_root, plan.conditions_benchmark.version,
                                 CONDITIONS_SPLIT, folder / f"conditions_{label}", corruption, SCORED_CONDITIONS)
        record["conditions"][label] = scores
        if label == "clean":
            record["routing"]["conditions_clean"] = routing
    return record


def corruption_mra(plan: StudyPlan, arm_name: str, data_root: Path) -> dict:
    """Clean and corrupted NDS (each corruption at plan.robustness_severity) of (arm, first seed) on the failure
    split: :func:`aqrcmt.eval.robustness.corruption_table`, RA = NDS corrupted / NDS clean, mRA their mean."""
    run_dir, cfg, detector = _first_seed_detector(plan, arm_name)
    folder = run_dir / "eval" / "robustness"
    clean = _score(detector, cfg, data_root, cfg.data.version, FAILURE_SPLIT, folder / "clean")[0]["all"]
    corrupted = {}
    for name in plan.robustness_corruptions:
        corruption = SensorCorruption(name, plan.robustness_severity)
        corrupted[name] = {plan.robustness_severity: _score(detector, cfg, data_root, cfg.data.version,
                                                            FAILURE_SPLIT, folder / name, corruption)[0]["all"]}
    return corruption_table(clean, corrupted)


def _first_seed_detector(plan: StudyPlan, arm_name: str) -> tuple[Path, Config, CmtDetector]:
    """(run directory, config, detector of its last checkpoint) of (arm, first seed)."""
    run_dir = plan.out / "arms" / arm_name / f"seed_{plan.seeds[0]}"
    cfg = load_config(str(run_dir / "config.json"))
    weights = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    return run_dir, cfg, _load(cfg, weights)


def draw_failure_maps(plan: StudyPlan, arm_name: str, data_root: Path) -> list[Path]:
    """The rendered weight maps of (arm, first seed) on the first failure-split batch under LiDAR drop and under
    3 views dropped: ``out/maps_<arm>_<scenario>.png``."""
    _, cfg, detector = _first_seed_detector(plan, arm_name)
    paths = []
    for name, severity in (("lidar_drop", 1), ("view_drop", 3)):
        loader = build_dataloader(cfg, FAILURE_SPLIT, train=False)
        loader.dataset.set_corruption(SensorCorruption(name, severity))
        with torch.no_grad():
            detector.loss(next(iter(loader)), monitor=True)
        path = plan.out / f"maps_{arm_name}_{name}.png"
        save_png(render_aqr(detector.pts_bbox_head.aqr.monitor.last_view,
                            title=f"{arm_name}: {name} (severity {severity})"), path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------
# Summaries and the report
# ------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of `values`."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[Optional[float]], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} +- {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def by_arm(results: list[dict]) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for record in results:
        arms.setdefault(record["arm"], []).append(record)
    return arms


def failure_score(records: list[dict], key: str, metric: str = "NDS") -> list[float]:
    return [r["failures"][key][metric] for r in records]


def best_aqr_arm(results: list[dict]) -> Optional[str]:
    """The AQR arm (not the fork's collapse) with the highest mean NDS over LiDAR drop and camera drop."""
    candidates = {name: records for name, records in by_arm(results).items()
                  if name not in ("control", "fork_original")}
    if not candidates:
        return None
    return max(candidates, key=lambda n: statistics.fmean(
        failure_score(candidates[n], "lidar_drop_s1") + failure_score(candidates[n], "camera_drop_s1")))


def separation(best: list[float], control: list[float]) -> Optional[float]:
    """(mean best - mean control) / pooled standard deviation of the two arms (None with fewer than 2 seeds or no
    spread)."""
    if len(best) < 2 or len(control) < 2:
        return None
    pooled = math.sqrt((statistics.variance(best) + statistics.variance(control)) / 2)
    return (statistics.fmean(best) - statistics.fmean(control)) / pooled if pooled > 0 else None


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report_markdown(plan: StudyPlan, pretrain_cfg: Config, pretrained: dict, results: list[dict],
                    robustness: dict, best: Optional[str], minutes: float) -> str:
    arms = by_arm(results)
    b, c = plan.benchmark, plan.conditions_benchmark
    trained = [label for name, _, label in EVAL_FAILURES if name in TRAIN_FAILURES]
    held_out = [label for name, _, label in EVAL_FAILURES if name not in TRAIN_FAILURES]
    lines = [
        "# AQR study", "",
        f"Benchmark: synthetic nuScenes {b.version}, {b.scenes} scenes x {b.samples_per_scene} samples (seed "
        f"{b.seed}); clean scores on its val scenes, failure scores on its first {plan.failure_scenes} val scenes "
        f"(split `{FAILURE_SPLIT}`), condition scores on a second benchmark ({c.scenes} scenes x "
        f"{c.samples_per_scene} samples, seed {c.seed}, night share {plan.condition_shares.night}, rain share "
        f"{plan.condition_shares.rain}); nothing of either is trained on. Official DetectionEval throughout.",
        f"Pretrained: plain `{pretrain_cfg.name}` CMT with ModalMask3D, {plan.pretrain_steps} steps"
        + (f", starting from a camera-only `{pretrain_cfg.name}` CMT of {plan.camera_pretrain_steps} steps"
           if plan.camera_pretrain_steps else "") + "; written as an official `.pth` and converted back.",
        f"Every arm and seed ({', '.join(map(str, plan.seeds))}): {plan.finetune_steps} steps at lr "
        f"{plan.finetune_lr:g} with the AQR fork's multipliers (backbones frozen; AQR x{plan.aqr_lr_mult:g}) and "
        "every BatchNorm's statistics fixed, "
        f"failure-aware data: ModalMask3D and {json.dumps(TRAIN_FAILURE_PROBABILITIES)} per sample. Failures "
        f"trained on: {', '.join(trained)}; held out: {', '.join(held_out)}. Router supervision weight "
        f"{plan.router_loss_weight:g}.",
        f"Wall time of this run: {minutes:.1f} min (resumed parts count only their own time).",
        "Cells: mean +- standard deviation over seeds.", "",
    ]
    lines += ["## The pretrained model (ModalMask3D), before any fine-tuning", "",
              _row(["input", "mAP", "NDS", "mAOE"]), _row(["---"] * 4)]
    p_clean = pretrained["clean"]
    lines.append(_row(["clean val", f"{p_clean['mAP']:.4f}", f"{p_clean['NDS']:.4f}", f"{p_clean['mAOE']:.3f}"]))
    for name, severity, label in EVAL_FAILURES:
        m = pretrained["failures"][f"{name}_s{severity}"]
        lines.append(_row([label, f"{m['mAP']:.4f}", f"{m['NDS']:.4f}", f"{m['mAOE']:.3f}"]))
    lines += ["", "By condition (conditions benchmark), with the sensors dropped at evaluation:", "",
              _row(["input", *SCORED_CONDITIONS]), _row(["---"] * (1 + len(SCORED_CONDITIONS)))]
    for label, scores in pretrained["conditions"].items():
        lines.append(_row([f"{label} (mAP / NDS)", *[f"{scores[k]['mAP']:.4f} / {scores[k]['NDS']:.4f}"
                                                     if k in scores else "n/a" for k in SCORED_CONDITIONS]]))

    lines += ["", "## Step 0: the pretrained weights with each arm's AQR switched on (first seed)", "",
              _row(["arm", "mAP", "NDS", "mAP - pretrained"]), _row(["---"] * 4)]
    for name, records in arms.items():
        step0 = records[0].get("step0")
        if step0:
            lines.append(_row([name, f"{step0['mAP']:.4f}", f"{step0['NDS']:.4f}",
                               f"{step0['mAP'] - p_clean['mAP']:+.4f}"]))

    failure_labels = [label if name in TRAIN_FAILURES else f"{label} (held out)" for name, _, label in EVAL_FAILURES]
    for metric in ("NDS", "mAP"):
        lines += ["", f"## {metric} after fine-tuning: clean, under the failures trained on, under held-out ones", "",
                  _row(["arm", "clean", *failure_labels]),
                  _row(["---"] * (2 + len(EVAL_FAILURES)))]
        for name, records in arms.items():
            lines.append(_row([name, _cell([r["clean"][metric] for r in records]),
                               *[_cell(failure_score(records, f"{n}_s{s}", metric)) for n, s, _ in EVAL_FAILURES]]))

    lines += ["", "## By condition (conditions benchmark, clean sensors): NDS", "",
              _row(["arm", *SCORED_CONDITIONS]), _row(["---"] * (1 + len(SCORED_CONDITIONS)))]
    for name, records in arms.items():
        lines.append(_row([name, *[_cell([r["conditions"]["clean"].get(k, {}).get("NDS") for r in records])
                                   for k in SCORED_CONDITIONS]]))

    lines += ["", "## Routing: mean query weight of each modality where it failed and where it was intact", "",
              "Failed: LiDAR dropped or outside a narrowed field of view; camera views dropped (the queries only "
              "they see). Intact: the same modality working (all failure scores and the clean conditions pass).", "",
              _row(["arm", "LiDAR failed", "LiDAR intact", "camera failed", "camera intact"]), _row(["---"] * 5)]
    for name, records in arms.items():
        if name == "control":
            continue
        cells = []
        for key in ("lidar_failed", "lidar_intact", "camera_failed", "camera_intact"):
            cells.append(_cell([_pooled_routing(r["routing"], key) for r in records]))
        lines.append(_row([name, *cells]))

    lines += ["", "## Verdict", ""]
    control = arms.get("control", [])
    if best is not None and control:
        lines.append(f"Best AQR arm (highest mean NDS over LiDAR drop and camera drop): **{best}**. Separation from "
                     "the control = (mean best - mean control) / pooled standard deviation over seeds:")
        lines.append("")
        for label, key in (("LiDAR drop", "lidar_drop_s1"), ("camera drop", "camera_drop_s1")):
            z = separation(failure_score(arms[best], key), failure_score(control, key))
            lines.append(f"- {label}: NDS {_cell(failure_score(arms[best], key))} vs "
                         f"{_cell(failure_score(control, key))}, separation {_z(z)}")
        z = separation([r["clean"]["NDS"] for r in arms[best]], [r["clean"]["NDS"] for r in control])
        lines.append(f"- clean val: NDS {_cell([r['clean']['NDS'] for r in arms[best]])} vs "
                     f"{_cell([r['clean']['NDS'] for r in control])}, separation {_z(z)}")
    if "fork_original" in arms and control:
        lines.append(f"- fork_original vs control, clean mAP: {_cell([r['clean']['mAP'] for r in arms['fork_original']])}"
                     f" vs {_cell([r['clean']['mAP'] for r in control])}")
    if robustness:
        lines += ["", f"## Corruption robustness (first seed, severity {plan.robustness_severity}, failure split)",
                  "", _row(["arm", "clean NDS", "mRA", *plan.robustness_corruptions]),
                  _row(["---"] * (3 + len(plan.robustness_corruptions)))]
        for name, table in robustness.items():
            ras = [table["corruptions"][c]["RA"] for c in plan.robustness_corruptions]
            lines.append(_row([name, f"{table['clean']['NDS']:.4f}", _z(table["mRA"]),
                               *[_z(ra) for ra in ras]]))
    if best is not None:
        lines += ["", f"Rendered maps of {best}: `maps_{best}_lidar_drop.png`, `maps_{best}_view_drop.png`."]
    lines.append("")
    return "\n".join(lines)


def _pooled_routing(routing: dict, key: str) -> Optional[float]:
    """Mean weight of `key` ("lidar_failed", ...) over every evaluation of one run, weighted by entries."""
    total = sum((s[key] or 0.0) * s[f"{key}_count"] for s in routing.values())
    count = sum(s[f"{key}_count"] for s in routing.values())
    return total / count if count else None


def _z(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_report(plan: StudyPlan, pretrain_cfg: Config, pretrained: dict, results: list[dict], robustness: dict,
                 best: Optional[str], minutes: float) -> Path:
    """Write out/report.md and out/results.json; returns the report's path."""
    atomic_write_bytes(plan.out / "results.json", json.dumps(
        {"pretrained": pretrained, "runs": results, "robustness": robustness, "best": best}, indent=1).encode())
    path = plan.out / "report.md"
    atomic_write_bytes(path, report_markdown(plan, pretrain_cfg, pretrained, results, robustness, best,
                                             minutes).encode())
    return path
