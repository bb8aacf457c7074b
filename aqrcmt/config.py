"""Typed, validated configuration.

Every setting lives in a frozen-free dataclass with a type annotation. A run's config is one `Config`
object; it travels to the modules as typed sub-configs (``cfg.model.head``, ``cfg.model.aqr.render`` ...),
never as an untyped dict. Named presets and :func:`~aqrcmt.presets.load_config` (a preset name or a JSON file)
live in :mod:`aqrcmt.presets`.

Overrides use dotted paths, e.g. ``apply_overrides(cfg, ["optim.lr=1e-4", "model.aqr.render.sigma_bev=1.0"])``:
the value is parsed against the field's annotation and the result is validated; an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

CLASS_NAMES: tuple[str, ...] = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)


class ConfigError(ValueError):
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

    def validate(self) -> None:
        _check(len(self.point_cloud_range) == 6, "point_cloud_range", "needs 6 values")
        _check(len(self.voxel_size) == 3 and all(v > 0 for v in self.voxel_size), "voxel_size",
               "needs 3 positive values")
        _check(self.max_points_per_voxel > 0, "max_points_per_voxel", "must be > 0")


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

    def validate(self) -> None:
        self.voxel.validate()
        _check(len(self.sparse_shape) == 3, "sparse_shape", "needs (z, y, x)")


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

    def validate(self) -> None:
        _check(len(self.image_size) == 2 and self.image_size[0] % 32 == 0 and self.image_size[1] % 32 == 0,
               "image_size", f"(H, W) must be multiples of 32, got {self.image_size}")


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
    # Normalise losses by the mean of the processes' positive/query counts (all-reduce) instead of the
    # local counts (the release). With it, N processes compute exactly the 1-process loss of the global batch.
    sync_loss_normalizers: bool = False
    # decoding
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    max_num: int = 300
    score_threshold: Optional[float] = None

    def validate(self) -> None:
        _check(self.hidden_dim % self.num_heads == 0, "hidden_dim", "must be divisible by num_heads")
        _check(len(self.code_weights) == 10, "code_weights", "needs 10 values")
        _check(self.final_kernel in (1, 3), "final_kernel", "must be 1 or 3")


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

    def validate(self) -> None:
        _check(self.camera_window % 2 == 1 and self.bev_window % 2 == 1, "camera_window/bev_window", "must be odd")


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

    def validate(self) -> None:
        _check(self.sigma_bev > 0 and self.sigma_camera > 0, "sigma_bev/sigma_camera", "must be > 0")
        _check(self.threshold >= 0, "threshold", "must be >= 0")


@dataclass
class AQRModulateConfig:
    """Feature modulation out = x * (alpha * w + beta) (see aqrcmt.kernels.modulate)."""
    mode: Literal["element_wise", "channel_wise", "adaptive"] = "element_wise"
    residual_form: Literal["additive", "convex"] = "additive"   # additive: x*w + r*x (user's); convex: (1-r)x*w + r*x
    residual_weight: float = 0.7
    prenormalize: bool = False                                   # per-map min-max before modulating (user's option)


@dataclass
class AQRMonitorConfig:
    """Health monitor: signals every `interval` steps, warnings at the user's alarm levels."""
    interval: int = 50
    map_mean_min: float = 0.2
    map_max_max: float = 2.0
    relative_change_max: float = 0.5
    modulated_mean_min: float = 0.01
    query_weight_min: float = 0.2
    image_interval: int = 500


@dataclass
class AQRConfig:
    enabled: bool = False
    generator: AQRGeneratorConfig = field(default_factory=AQRGeneratorConfig)
    render: AQRRenderConfig = field(default_factory=AQRRenderConfig)
    modulate: AQRModulateConfig = field(default_factory=AQRModulateConfig)
    monitor: AQRMonitorConfig = field(default_factory=AQRMonitorConfig)
    render_dn_queries: bool = False                        # True leaks noised GT into the features in training

    def validate(self) -> None:
        self.generator.validate()
        self.render.validate()


@dataclass
class ModelConfig:
    lidar: LidarConfig = field(default_factory=LidarConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    aqr: AQRConfig = field(default_factory=AQRConfig)

    def validate(self) -> None:
        _check(self.lidar.enabled or self.camera.enabled, "model", "needs the LiDAR or the camera branch")
        self.lidar.validate()
        self.camera.validate()
        self.head.validate()
        self.aqr.validate()
        if self.aqr.enabled:
            _check(self.lidar.enabled and self.camera.enabled, "model.aqr.enabled", "AQR needs both modalities")

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
    gt_paste: bool = False                                     # needs a database built by `aqrcmt build-gt-database`
    gt_paste_database: Optional[str] = None
    gt_paste_until_epoch: int = 0                              # >0: paste only in epochs < this ("15e+5e": 15)
    shuffle_points: bool = True
    enabled: bool = True


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
    on_bad_sample: Literal["error", "skip"] = "error"

    def validate(self) -> None:
        _check(self.sweeps >= 1, "sweeps", "must be >= 1 (the key frame counts)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


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
    cyclic_momentum_ratio: tuple[float, float] = (0.8947368421052632, 1.0)
    warmup_steps: int = 0                                      # for "cosine"
    min_lr_ratio: float = 1e-3                                 # for "cosine"
    grad_clip: float = 35.0
    grad_accumulation: int = 1

    def validate(self) -> None:
        _check(self.lr > 0, "lr", "must be > 0")
        _check(all(m >= 0 for m in self.lr_mults.values()), "lr_mults", "must be >= 0")
        _check(self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1")


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
    log_every_steps: int = 10
    max_nonfinite_steps: int = 5
    tracker: Optional[str] = "tensorboard"


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        _check_literals(self, "")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Overrides, (de)serialisation
# --------------------------------------------------------------------------------------------------
def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{key}': {message}")


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


def _parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse a command-line string into the type `hint` of field `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config field '{key}': cannot parse {text!r} as {hint}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"config field '{key}': {text!r} is not one of {args}")
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config field '{key}': expected a bool, got {text!r}")
    if hint in (int, float, str):
        if hint is str:
            return text
        try:
            value = hint(text)
        except ValueError:
            raise ConfigError(f"config field '{key}': expected {hint.__name__}, got {text!r}") from None
        if hint is float and not math.isfinite(value):
            raise ConfigError(f"config field '{key}': expected a finite number, got {text!r}")
        return value
    if origin in (tuple, list, dict):
        try:
            value = json.loads(text.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            raise ConfigError(f"config field '{key}': expected JSON for {hint}, got {text!r}") from None
        return _coerce(value, hint, key)
    raise ConfigError(f"config field '{key}': unsupported type {hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a JSON-like value (from a file or an override) into `hint`, checking types."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{key}': expected a mapping, got {type(value).__name__}")
        return _dataclass_from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config field '{key}': {value!r} does not fit {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{key}': {value!r} is not one of {args}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{key}': expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"config field '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{key}': expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return tuple(value) if isinstance(value, list) else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config field '{key}': expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _dataclass_from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping, e.g. a saved config.json."""
    return _dataclass_from_dict(Config, data).validate()


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.path=value`` overrides in place and re-validate. Raises ConfigError naming a bad key."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        target: Any = cfg
        for i, part in enumerate(parts[:-1]):
            if isinstance(target, dict):
                raise ConfigError(f"override '{path}': '{'.'.join(parts[:i + 1])}' is a mapping leaf")
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}' in override '{item}'")
            target = getattr(target, part)
        leaf = parts[-1]
        if isinstance(target, dict):  # e.g. optim.lr_mults.img_backbone=0
            target[leaf] = _parse_value(text, float, path)
            continue
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config key '{path}' in override '{item}'")
        hint = typing.get_type_hints(type(target))[leaf]
        if dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key '{path}' is a section; set one of its fields")
        setattr(target, leaf, _parse_value(text, hint, path))
    return cfg.validate()
