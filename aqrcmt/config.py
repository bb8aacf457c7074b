"""Typed, validated configuration.

Every setting lives in a frozen-free dataclass with a type annotation. A run's config is one `Config`
object; it travels to the modules as typed sub-configs (``cfg.model.head``, ``cfg.model.aqr.render`` ...),
never as an untyped dict. Named presets and :func:`~aqrcmt.presets.load_config` (a preset name or a JSON file)
live in :mod:`aqrcmt.presets`; ``key.path=value`` overrides and JSON mappings are parsed by
:mod:`aqrcmt.overrides`.

Every section's ``validate(key)`` checks its values' types and ranges and raises :class:`ConfigError` naming a bad
value by its full dotted key (``key`` is the section's path, e.g. ``model.head``; the default is where the
section sits in a :class:`Config`).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from aqrcmt.errors import AqrcmtError
from aqrcmt.structures import FAILURES

class ConfigError(AqrcmtError, ValueError):
    """A config key is unknown, or its value has the wrong type or is out of range."""


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class VoxelConfig:
    """Hard voxelization. Ranges in metres, (x_min, y_min, z_min, x_max, y_max, z_max)."""
    point_cloud_range: tuple[float, ...] = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
    voxel_size: tuple[float, ...] = (0.075, 0.075, 0.2)
    max_points_per_voxel: int = 10
    max_voxels_train: int = 120000
    max_voxels_test: int = 160000

    def validate(self, key: str = "model.lidar.voxel") -> None:
        pc = self.point_cloud_range
        _check(len(pc) == 6 and all(pc[i] < pc[i + 3] for i in range(3)), f"{key}.point_cloud_range",
               f"needs 6 values (mins < maxs), got {pc}")
        _check(len(self.voxel_size) == 3 and all(v > 0 for v in self.voxel_size), f"{key}.voxel_size",
               "needs 3 positive values")
        _positive(self, key, "max_points_per_voxel", "max_voxels_train", "max_voxels_test")


@dataclass
class LidarConfig:
    """LiDAR branch: voxelizer -> mean VFE -> SparseEncoder -> SECOND -> SECONDFPN (BEV map)."""
    enabled: bool = True
    voxel: VoxelConfig = field(default_factory=VoxelConfig)
    # (z, y, x) shape of the sparse tensor. The released r50 config keeps 1024 for a 1080-voxel range (quirk).
    sparse_shape: tuple[int, ...] = (41, 1440, 1440)
    in_channels: int = 5
    base_channels: int = 16
    output_channels: int = 128
    encoder_channels: tuple[tuple[int, ...], ...] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128))
    encoder_paddings: tuple[tuple[Any, ...], ...] = ((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0))
    backbone_out_channels: tuple[int, ...] = (128, 256)
    backbone_layer_nums: tuple[int, ...] = (5, 5)
    backbone_strides: tuple[int, ...] = (1, 2)
    neck_out_channels: tuple[int, ...] = (256, 256)
    neck_upsample_strides: tuple[int, ...] = (1, 2)

    def validate(self, key: str = "model.lidar") -> None:
        self.voxel.validate(f"{key}.voxel")
        _check(len(self.sparse_shape) == 3 and all(v > 0 for v in self.sparse_shape), f"{key}.sparse_shape",
               f"needs 3 positive sizes (z, y, x), got {self.sparse_shape}")
        _positive(self, key, "in_channels", "base_channels", "output_channels")


@dataclass
class CameraConfig:
    """Camera branch: image backbone -> CP-FPN (stride-16 level used by the head)."""
    enabled: bool = True
    backbone: Literal["vovnet99", "resnet50", "tiny"] = "vovnet99"
    backbone_out_channels: tuple[int, ...] = (768, 1024)   # channels of the stride-16 and stride-32 outputs
    neck_out_channels: int = 256
    image_size: tuple[int, int] = (640, 1600)              # (H, W) after resize/crop
    grid_mask: bool = True
    grid_mask_prob: float = 0.7
    frozen_bn: bool = True                                 # norm_eval=True of the released configs
    # Activation checkpointing of the image backbone in training, block by block (the VoVNet stem, each OSA or
    # ResNet block): only block inputs are kept, each block recomputed in the backward (docs/benchmarks.md,
    # "Memory"). With trainable BatchNorm (frozen_bn False) the recomputation updates the running statistics twice.
    checkpointing: bool = False

    def validate(self, key: str = "model.camera") -> None:
        _check(len(self.image_size) == 2 and all(v > 0 and v % 32 == 0 for v in self.image_size),
               f"{key}.image_size", f"(H, W) must be positive multiples of 32, got {self.image_size}")
        _positive(self, key, "neck_out_channels")
        _in_range(self, key, "grid_mask_prob", 0.0, 1.0)


@dataclass
class HeadConfig:
    """CMT head: shared conv, position encodings, DN queries, 6-layer decoder, grouped task heads, losses."""
    in_channels: int = 512
    hidden_dim: int = 256
    num_query: int = 900
    depth_num: int = 64
    downsample_scale: int = 8
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    head_conv: int = 64
    final_kernel: int = 1                                  # 3 in the LiDAR-only release
    num_classes: int = 10
    # denoising
    use_dn: bool = True
    dn_scalar: int = 10
    dn_noise_scale: float = 1.0
    dn_noise_trans: float = 0.0
    dn_split: float = 0.75
    dn_max_gt: int = 0                                     # >0: pad GT count to this bucket (fixed DN shapes for compile)
    # losses / matching
    code_weights: tuple[float, ...] = (2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    loss_cls_weight: float = 2.0
    loss_bbox_weight: float = 0.25
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Weight of a front/back-blind heading term (aqrcmt/models/losses.py, heading_axis_l1) added to the L1 on
    # (sin, cos) yaw; 0 = off (the release). Not in the released CMT: the tiny CPU configs use it so that the box
    # axis is learned before front and back can be told apart.
    heading_axis_weight: float = 0.0
    # > 0: a two-layer conv branch reads (sin, cos) of the yaw from the BEV features, trained with this weight on the
    # L1 at points over each GT box (dense supervision: the LiDAR branch learns front from back); decoding turns a
    # box by 180 degrees where its regressed (sin, cos) points against the map's at its centre. 0 = no such branch
    # (the release), as without the LiDAR branch. Not in the released CMT.
    bev_heading_weight: float = 0.0
    # Normalise losses by the mean of the processes' positive/query counts (all-reduce) instead of the
    # local counts (the release). With it, N processes compute exactly the 1-process loss of the global batch.
    sync_loss_normalizers: bool = False
    # Gaussian locality prior on the cross-attention logits (aqrcmt/models/locality.py); 0 = off (the release).
    # Not in the released CMT: the tiny CPU configs use it so that queries see their neighbourhood from step 0.
    locality_sigma_bev: float = 0.0                        # metres
    locality_sigma_camera: float = 0.0                     # camera feature-map pixels
    # Local cross-attention (aqrcmt/models/local_attention.py): > 0 = each query attends only to the memory tokens
    # near it, every BEV cell within this many locality_sigma_bev kept; 0 = dense attention (the release).
    local_attention_sigmas: float = 0.0
    # decoding
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    max_num: int = 300
    score_threshold: Optional[float] = None
    # Activation checkpointing of each decoder layer in training (recomputed in the backward; dropout masks replayed)
    checkpointing: bool = False

    def validate(self, key: str = "model.head") -> None:
        _positive(self, key, "in_channels", "hidden_dim", "num_query", "depth_num", "downsample_scale", "num_layers",
                  "num_heads", "ffn_dim", "head_conv", "num_classes", "dn_scalar", "dn_split", "max_num")
        _check(self.hidden_dim % self.num_heads == 0, f"{key}.hidden_dim",
               f"{self.hidden_dim} must be divisible by num_heads ({self.num_heads})")
        _in_range(self, key, "dropout", 0.0, 1.0, high_open=True)
        _non_negative(self, key, "dn_noise_scale", "dn_noise_trans", "dn_max_gt", "loss_cls_weight",
                      "loss_bbox_weight", "focal_gamma", "heading_axis_weight", "bev_heading_weight")
        _in_range(self, key, "focal_alpha", 0.0, 1.0)
        _non_negative(self, key, "locality_sigma_bev", "locality_sigma_camera", "local_attention_sigmas")
        _check(len(self.code_weights) == 10 and all(w >= 0 for w in self.code_weights), f"{key}.code_weights",
               "needs 10 values >= 0")
        _check(self.final_kernel in (1, 3), f"{key}.final_kernel", f"must be 1 or 3, got {self.final_kernel}")
        _check(len(self.post_center_range) == 6, f"{key}.post_center_range", "needs 6 values")
        if self.score_threshold is not None:
            _in_range(self, key, "score_threshold", 0.0, 1.0)

    @property
    def locality_enabled(self) -> bool:
        return self.locality_sigma_bev > 0 or self.locality_sigma_camera > 0


@dataclass
class AQRGeneratorConfig:
    """Per-query LiDAR/camera weight generator (one local-window cross-attention layer + Linear(256, 2))."""
    num_heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    camera_window: int = 15
    bev_window: int = 5
    use_type_embed: bool = True
    activation: Literal["sigmoid", "tanh"] = "sigmoid"
    bias_init: float = 2.0
    # joint: one softmax over the BEV and camera windows (the fork); per_modality: a softmax per window, each
    # holding half the attention mass, so a blank modality stays visible to the weight head
    attention: Literal["joint", "per_modality"] = "joint"
    # sensor_evidence: give each query, embedded beside its decoded features, what its modalities show over its
    # whole BEV azimuth sector (of evidence_sectors around the sensor) and its camera view
    # (aqrcmt.models.aqr.generator.SensorEvidence): the local windows alone do not tell a dropped LiDAR from an
    # empty street
    sensor_evidence: bool = False
    evidence_sectors: int = 16

    def validate(self, key: str = "model.aqr.generator") -> None:
        _positive(self, key, "num_heads", "ffn_dim", "camera_window", "bev_window", "evidence_sectors")
        for name in ("camera_window", "bev_window"):
            _check(getattr(self, name) % 2 == 1, f"{key}.{name}", f"must be odd, got {getattr(self, name)}")
        _in_range(self, key, "dropout", 0.0, 1.0, high_open=True)


@dataclass
class AQRRenderConfig:
    """Rendering query weights onto the BEV map and the six camera maps (see aqrcmt.kernels.splat)."""
    method: Literal["gaussian", "bilinear", "direct"] = "gaussian"
    kernel_norm: Literal["sum", "peak", "normalized"] = "sum"
    position: Literal["floor", "exact"] = "floor"
    sigma_bev: float = 1.0
    sigma_camera: float = 1.0
    threshold: float = 0.01
    clamp_max: Optional[float] = 1.5
    fill: float = 1.0                                      # value far from any query with kernel_norm="normalized"
    # The AQR fork's behaviours, off by default (docs/aqr.md, "The fork's renderer"): after threshold/clamp,
    # divide each map by its own maximum ("max_per_map": BEV per sample, each camera view apart) or the BEV map
    # per sample and the six camera maps by their common maximum ("max_over_views", the fork before its clamp fix).
    normalize: Literal["none", "max_per_map", "max_over_views"] = "none"
    # Queries that no camera sees: "skip" them, or "pile_at_origin": splat them at pixel (0, 0) of view 0 (the fork).
    invisible_queries: Literal["skip", "pile_at_origin"] = "skip"

    def validate(self, key: str = "model.aqr.render") -> None:
        _positive(self, key, "sigma_bev", "sigma_camera")
        _non_negative(self, key, "threshold")
        if self.clamp_max is not None:
            _positive(self, key, "clamp_max")


@dataclass
class AQRModulateConfig:
    """Feature modulation out = x * (alpha * w + beta) (see aqrcmt.kernels.modulate)."""
    mode: Literal["element_wise", "channel_wise", "adaptive"] = "element_wise"
    residual_form: Literal["additive", "convex"] = "additive"   # additive: x*w + r*x (the fork); convex: (1-r)x*w + r*x
    residual_weight: float = 0.7
    prenormalize: bool = False                                   # per-map min-max before modulating (fork's option)

    def validate(self, key: str = "model.aqr.modulate") -> None:
        if self.residual_form == "convex":
            _in_range(self, key, "residual_weight", 0.0, 1.0)
        else:
            _non_negative(self, key, "residual_weight")


@dataclass
class AQRMonitorConfig:
    """AQR health: AQR signals every `interval` steps (map images every `image_interval`) and the levels of the
    fork training report's checks on them, as alarms and notices (docs/aqr.md, "Alarms"). A level of None
    switches its check off; ``train.health.on_alarm`` says what an alarm does.
    """
    interval: int = 50
    image_interval: int = 500
    # alarms
    map_mean_min: Optional[float] = 0.2
    map_max_max: Optional[float] = 2.0
    relative_change_max: Optional[float] = 0.5
    modulated_rms_min: Optional[float] = 0.01          # features vanish: RMS, not mean (camera features are signed)
    energy_retention_min: Optional[float] = 0.25       # sum out^2 / sum x^2 (0.25: the RMS halved)
    query_weight_min: Optional[float] = 0.2
    # the report's healthy bands (notices when left)
    map_mean_band: Optional[tuple[float, float]] = (0.35, 0.45)
    relative_change_band: Optional[tuple[float, float]] = (0.15, 0.30)

    def validate(self, key: str = "model.aqr.monitor") -> None:
        _positive(self, key, "interval", "image_interval")
        for name in ("map_mean_min", "map_max_max", "relative_change_max", "modulated_rms_min",
                     "energy_retention_min", "query_weight_min"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"{key}.{name}", f"must be >= 0 or none, got {value}")
        for name in ("map_mean_band", "relative_change_band"):
            band = getattr(self, name)
            _check(band is None or 0 <= band[0] <= band[1], f"{key}.{name}",
                   f"needs 0 <= low <= high (or none), got {band}")


@dataclass
class AQRConfig:
    enabled: bool = False
    generator: AQRGeneratorConfig = field(default_factory=AQRGeneratorConfig)
    render: AQRRenderConfig = field(default_factory=AQRRenderConfig)
    modulate: AQRModulateConfig = field(default_factory=AQRModulateConfig)
    monitor: AQRMonitorConfig = field(default_factory=AQRMonitorConfig)
    render_dn_queries: bool = False                        # True leaks noised GT into the features in training
    # Identity start: the generator's output layer starts at zero and weights are 2 * sigmoid(logit), so every
    # query weight is exactly 1 at step 0; with a renderer and a modulation that map weight 1 to the identity,
    # AQR-CMT then predicts exactly what the CMT it starts from predicts (the output layer still gets gradient).
    identity_start: bool = False
    # Router supervision (off at 0): weight of an MSE loss pulling each query's weight of a failed modality to 0
    # and of an intact one to 1, with targets from the sample's known sensor state (aqrcmt.models.aqr.routing).
    router_loss_weight: float = 0.0

    def validate(self, key: str = "model.aqr") -> None:
        self.generator.validate(f"{key}.generator")
        self.render.validate(f"{key}.render")
        self.modulate.validate(f"{key}.modulate")
        self.monitor.validate(f"{key}.monitor")
        _non_negative(self, key, "router_loss_weight")
        if self.identity_start and self.enabled:
            self._check_identity(key)

    def _check_identity(self, key: str) -> None:
        """Identity start needs weight 1 -> map 1 -> out = x: refuse the settings that break one of the two."""
        render, modulate = self.render, self.modulate
        why = "identity_start needs weight 1 to render as map 1 and map 1 to leave the features unchanged"
        _check(self.generator.activation == "sigmoid", f"{key}.generator.activation",
               f"{why}: must be 'sigmoid' (scaled to 2 * sigmoid), got {self.generator.activation!r}")
        _check(render.kernel_norm == "normalized", f"{key}.render.kernel_norm",
               f"{why}: must be 'normalized' (a weighted mean of the weights), got {render.kernel_norm!r}")
        _check(render.fill == 1.0, f"{key}.render.fill", f"{why}: must be 1 (the map far from every query), "
               f"got {render.fill}")
        _check(render.normalize == "none", f"{key}.render.normalize", f"{why}: must be 'none', got "
               f"{render.normalize!r}")
        _check(render.threshold <= 1.0, f"{key}.render.threshold", f"{why}: must be <= 1, got {render.threshold}")
        _check(render.clamp_max is None or render.clamp_max >= 1.0, f"{key}.render.clamp_max",
               f"{why}: must be >= 1 or none, got {render.clamp_max}")
        _check(not modulate.prenormalize, f"{key}.modulate.prenormalize", f"{why}: must be false")
        _check(modulate.residual_form == "convex", f"{key}.modulate.residual_form",
               f"{why}: must be 'convex' (additive gives (1 + r) x at map 1), got {modulate.residual_form!r}")


@dataclass
class ModelConfig:
    lidar: LidarConfig = field(default_factory=LidarConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    aqr: AQRConfig = field(default_factory=AQRConfig)

    def validate(self, key: str = "model") -> None:
        _check(self.lidar.enabled or self.camera.enabled, key, "needs the LiDAR or the camera branch")
        self.lidar.validate(f"{key}.lidar")
        self.camera.validate(f"{key}.camera")
        self.head.validate(f"{key}.head")
        self.aqr.validate(f"{key}.aqr")
        if self.aqr.enabled:
            _check(self.lidar.enabled and self.camera.enabled, f"{key}.aqr.enabled", "AQR needs both modalities")
        else:
            _check(self.aqr.router_loss_weight == 0, f"{key}.aqr.router_loss_weight",
                   f"router supervision needs AQR (model.aqr.enabled=true), got {self.aqr.router_loss_weight}")
            _check(not self.aqr.identity_start, f"{key}.aqr.identity_start",
                   "identity start needs AQR (model.aqr.enabled=true)")
        head = self.head
        if head.locality_enabled:
            _check(head.locality_sigma_bev > 0 or not self.lidar.enabled, f"{key}.head.locality_sigma_bev",
                   "must be > 0 when the locality prior is on (locality_sigma_camera > 0) and the LiDAR branch is")
            _check(head.locality_sigma_camera > 0 or not self.camera.enabled, f"{key}.head.locality_sigma_camera",
                   "must be > 0 when the locality prior is on (locality_sigma_bev > 0) and the camera branch is")
        _check(head.local_attention_sigmas == 0 or head.locality_enabled, f"{key}.head.local_attention_sigmas",
               f"local attention ({head.local_attention_sigmas}) needs the locality prior "
               "(model.head.locality_sigma_bev / locality_sigma_camera > 0)")

    @property
    def bev_size(self) -> tuple[int, int]:
        """(H, W) of the BEV map the head sees = sparse grid (y, x) / downsample_scale."""
        _, ny, nx = self.lidar.sparse_shape
        s = self.head.downsample_scale
        return ny // s, nx // s


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    """Training augmentations of the released configs, each switchable."""
    global_rot_range: tuple[float, float] = (-0.785, 0.785)   # rad
    global_scale_range: tuple[float, float] = (0.9, 1.1)
    global_translation_std: float = 0.5                        # m, per axis
    bev_flip: bool = True
    image_resize_range: tuple[float, float] = (0.94, 1.25)
    image_flip: bool = True
    modality_drop: bool = True                                 # ModalMask3D: 25 % camera drop, 25 % LiDAR drop
    # Failure-aware training: {nuScenes-R failure scenario: probability per sample} (at most one per sample,
    # severity uniform over 1-3; see aqrcmt.data.corruptions), applied as the sample is loaded, before GT paste.
    failures: dict[str, float] = field(default_factory=dict)
    gt_paste: bool = False                                     # needs a database built by `aqrcmt build-gt-database`
    gt_paste_database: Optional[str] = None
    gt_paste_until_epoch: int = 0                              # >0: paste only in epochs < this ("15e+5e": 15)
    shuffle_points: bool = True
    enabled: bool = True

    def validate(self, key: str = "data.augment") -> None:
        _ordered_range(self, key, "global_rot_range")
        _ordered_range(self, key, "global_scale_range", positive=True)
        _ordered_range(self, key, "image_resize_range", positive=True)
        _non_negative(self, key, "global_translation_std", "gt_paste_until_epoch")
        for name, probability in self.failures.items():
            _check(name in FAILURES, f"{key}.failures.{name}",
                   f"unknown failure scenario; known: {', '.join(FAILURES)}")
            _check(0.0 <= probability <= 1.0, f"{key}.failures.{name}", f"must lie in [0, 1], got {probability}")
        total = sum(self.failures.values())
        _check(total <= 1.0, f"{key}.failures", f"probabilities sum to {total:g} > 1 (at most one per sample)")


@dataclass
class DataConfig:
    root: str = "data/nuscenes"
    version: str = "v1.0-trainval"
    train_split: str = "train"
    val_split: str = "val"
    info_pkl_train: Optional[str] = None                       # mmdet3d-style infos, used instead of the devkit index
    info_pkl_val: Optional[str] = None
    index_cache_dir: Optional[str] = None                      # default: <root>/.aqrcmt_cache
    sweeps: int = 11                                           # frames incl. the key frame: CMT loads key + 10 sweeps
    load_images: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cbgs: bool = True
    batch_size: int = 2                                        # per process
    num_workers: int = 4
    pin_memory: bool = True
    on_bad_sample: Literal["error", "skip"] = "skip"           # training: skip (logged) or stop; evaluation: stop
    max_skipped_fraction: float = 0.01                         # of the training samples; more skipped stops the run

    def validate(self, key: str = "data") -> None:
        _check(self.sweeps >= 1, f"{key}.sweeps", f"must be >= 1 (the key frame counts), got {self.sweeps}")
        _positive(self, key, "batch_size")
        _non_negative(self, key, "num_workers")
        _in_range(self, key, "max_skipped_fraction", 0.0, 1.0)
        self.augment.validate(f"{key}.augment")


# --------------------------------------------------------------------------------------------------
# Optimisation and training
# --------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    # Learning-rate / weight-decay multipliers by parameter-name prefix (longest prefix wins). 0 freezes.
    lr_mults: dict[str, float] = field(default_factory=lambda: {"img_backbone": 0.01, "img_neck": 0.1})
    decay_mults: dict[str, float] = field(default_factory=lambda: {"img_backbone": 5.0})
    schedule: Literal["cyclic", "cosine", "constant"] = "cyclic"
    cyclic_target_ratio: tuple[float, float] = (8.0, 1e-4)
    cyclic_step_ratio_up: float = 0.4
    cyclic_momentum_ratio: tuple[float, float] = (0.85 / 0.95, 1.0)     # the released configs' target_ratio
    warmup_steps: int = 0                                      # for "cosine"
    min_lr_ratio: float = 1e-3                                 # for "cosine"
    grad_clip: float = 35.0
    grad_accumulation: int = 1
    # Train the AQR module only: everything else frozen (no gradients, BatchNorm in eval mode), whatever lr_mults
    # say; needs model.aqr.enabled. False: end to end, as lr_mults say.
    train_only_aqr: bool = False
    # Module prefixes whose BatchNorm layers keep their running statistics (eval mode) while their weights still
    # train; ("",): every BatchNorm. For fine-tuning at small batches: in a batch of 2 in which one sample's LiDAR
    # is dropped, batch statistics rescale both samples' BEV features, and a batch of two dropped samples is
    # normalised back to the magnitude of a working LiDAR.
    batchnorm_eval: tuple[str, ...] = ()

    def validate(self, key: str = "optim") -> None:
        _positive(self, key, "lr", "grad_accumulation")
        _non_negative(self, key, "weight_decay", "grad_clip", "warmup_steps")
        for i, beta in enumerate(self.betas):
            _check(0.0 <= beta < 1.0, f"{key}.betas", f"each must be in [0, 1), got betas[{i}] = {beta}")
        for table in ("lr_mults", "decay_mults"):
            for prefix, mult in getattr(self, table).items():
                _check(mult >= 0, f"{key}.{table}.{prefix}", f"must be >= 0, got {mult}")
        for table in ("cyclic_target_ratio", "cyclic_momentum_ratio"):
            _check(all(r > 0 for r in getattr(self, table)), f"{key}.{table}",
                   f"must be > 0, got {getattr(self, table)}")
        _check(0.0 < self.cyclic_step_ratio_up < 1.0, f"{key}.cyclic_step_ratio_up",
               f"must be in (0, 1), got {self.cyclic_step_ratio_up}")
        _in_range(self, key, "min_lr_ratio", 0.0, 1.0)


@dataclass
class HealthConfig:
    """Training health of every model: the levels of the loss and evaluation checks, and what an alarm (these,
    and the AQR signals' of ``model.aqr.monitor``) does (docs/training.md, "Evaluation and monitoring").

    A level of None (or a window of 0) switches its check off. on_alarm: "warn" reports only; "checkpoint" also
    saves a checkpoint and trains on; "stop" saves one and stops the run (non-zero exit). Notices never act.
    """
    on_alarm: Literal["warn", "checkpoint", "stop"] = "warn"
    loss_max: Optional[float] = 10.0                   # total loss; a model trained from scratch starts higher
    loss_window_steps: int = 500                       # the loss must fall over this many steps (0: off)
    val_map_min: Optional[float] = 0.4
    val_map_min_from_epoch: int = 3                    # val_map_min applies from this epoch on
    val_nds_must_rise: bool = True                     # NDS must rise from one evaluation to the next

    def validate(self, key: str = "train.health") -> None:
        _non_negative(self, key, "loss_window_steps", "val_map_min_from_epoch")
        for name in ("loss_max", "val_map_min"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"{key}.{name}", f"must be >= 0 or none, got {value}")


# Keys that moved to another section: an old config.json or override using one is refused, naming the new key.
MOVED_KEYS: dict[str, str] = {
    f"model.aqr.monitor.{name}": f"train.health.{name}"
    for name in ("on_alarm", "loss_max", "loss_window_steps", "val_map_min", "val_map_min_from_epoch",
                 "val_nds_must_rise")
}


@dataclass
class TrainConfig:
    epochs: int = 20
    max_steps: int = 0                                         # >0 stops early (demos, tests)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"      # `accelerate config` may override
    compile: Optional[bool] = None                             # None: on for CUDA, off on CPU
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    eval_every_epochs: int = 1
    eval_at_epochs: tuple[int, ...] = ()                       # also evaluate after these epochs (1 = the first)
    log_every_steps: int = 10
    max_nonfinite_steps: int = 5
    tracker: Optional[str] = "tensorboard"
    health: HealthConfig = field(default_factory=HealthConfig)
    checkpoint_every_minutes: float = 30.0                     # also checkpoint when this long since the last; 0: off
    collective_timeout_minutes: float = 60.0                   # process-group timeout (ranks wait for rank 0's eval)

    def validate(self, key: str = "train") -> None:
        self.health.validate(f"{key}.health")
        _positive(self, key, "epochs", "log_every_steps", "max_nonfinite_steps", "collective_timeout_minutes")
        # keep_last 0 keeps every checkpoint; max_steps / checkpoint_every_* / eval_every_epochs 0 switch off
        _non_negative(self, key, "max_steps", "checkpoint_every_steps", "keep_last", "eval_every_epochs",
                      "checkpoint_every_minutes")
        _check(all(e >= 1 for e in self.eval_at_epochs), f"{key}.eval_at_epochs",
               f"epochs count from 1, got {self.eval_at_epochs}")

    def evaluates_after(self, epoch: int) -> bool:
        """True when the run evaluates once `epoch` epochs (counted from 1) are done (besides the last epoch)."""
        every = self.eval_every_epochs
        return bool(every and epoch % every == 0) or epoch in self.eval_at_epochs


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.data.validate("data")
        self.optim.validate("optim")
        self.train.validate("train")
        _check(self.model.aqr.enabled or not self.optim.train_only_aqr, "optim.train_only_aqr",
               "training AQR only needs AQR (model.aqr.enabled=true)")
        _check_literals(self, "")
        return self

    def min_batch_per_process(self) -> int:
        """Samples each training process needs per step: 2 with ModalMask3D and a LiDAR branch (a LiDAR-dropped
        sample is one voxel, its points zeroed at the origin, on which the sparse encoder's BatchNorm has no
        training statistics), else 1."""
        augment = self.data.augment
        return 2 if augment.enabled and augment.modality_drop and self.model.lidar.enabled else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError naming the full dotted `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config field '{key}': {message}")


def _positive(section: Any, key: str, *names: str) -> None:
    """Each field `names` of `section` (at dotted path `key`) is > 0."""
    for name in names:
        value = getattr(section, name)
        _check(value > 0, f"{key}.{name}", f"must be > 0, got {value}")


def _non_negative(section: Any, key: str, *names: str) -> None:
    """Each field `names` of `section` (at dotted path `key`) is >= 0."""
    for name in names:
        value = getattr(section, name)
        _check(value >= 0, f"{key}.{name}", f"must be >= 0, got {value}")


def _in_range(section: Any, key: str, name: str, low: float, high: float, high_open: bool = False) -> None:
    """Field `name` lies in [low, high], or [low, high) with `high_open`."""
    value = getattr(section, name)
    ok = low <= value < high if high_open else low <= value <= high
    _check(ok, f"{key}.{name}", f"must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


def _ordered_range(section: Any, key: str, name: str, positive: bool = False) -> None:
    """Field `name` is a (low, high) pair with low <= high, and low > 0 with `positive` (a scale factor)."""
    low, high = getattr(section, name)
    _check(low <= high, f"{key}.{name}", f"needs low <= high, got {(low, high)}")
    if positive:
        _check(low > 0, f"{key}.{name}", f"needs factors > 0, got {(low, high)}")


def _check_literals(obj: Any, prefix: str) -> None:
    """Check every Literal-typed field of a (nested) dataclass holds an allowed value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint, key = getattr(obj, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_literals(value, key + ".")
            continue
        for candidate in _union_members(hint):
            if typing.get_origin(candidate) is Literal and value is not None:
                allowed = typing.get_args(candidate)
                _check(value in allowed, key, f"{value!r} is not one of {allowed}")


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)
