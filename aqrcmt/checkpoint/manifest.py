"""The official state-dict layouts, kept as data (``manifests/*.json``).

Each released CMT config has one manifest: every key of the official model's ``state_dict()`` in order, with
its shape, dtype and kind (``param``, ``buffer`` or ``sparse_conv`` = spconv-2 weight [out, kD, kH, kW, in]),
plus the ``_metadata`` module versions mmdet3d reads when it loads a checkpoint. The AQR fork's extra
generator keys are a separate manifest that is added when a config enables AQR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from aqrcmt.config import ModelConfig

MANIFEST_DIR = Path(__file__).with_name("manifests")
AQR_FORK_MANIFEST = "aqr_fork_weight_generator"

# (LiDAR branch on, camera branch on, image backbone) -> manifest of the released config with that structure.
RELEASED: dict[tuple[bool, bool, str | None], str] = {
    (True, True, "vovnet99"): "cmt_voxel0075_vov_1600x640_cbgs",
    (True, True, "resnet50"): "cmt_voxel0100_r50_800x320_cbgs",
    (True, False, None): "cmt_lidar_voxel0075_cbgs",
    (False, True, "vovnet99"): "cmt_camera_vov_1600x640_cbgs",
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


@dataclass(frozen=True)
class ManifestEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "param" | "buffer" | "sparse_conv"

    @property
    def is_parameter(self) -> bool:
        return self.kind != "buffer"


@dataclass(frozen=True)
class Manifest:
    name: str
    entries: tuple[ManifestEntry, ...]          # state_dict order
    module_versions: dict[str, int]             # module prefix -> state_dict _metadata version (!= 1)
    optional_group: str | None = None           # set when all-or-none of the entries may be present

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def num_parameters(self, prefix: str = "") -> int:
        """Parameters (not buffers) of the keys starting with `prefix` (e.g. "img_backbone.")."""
        return sum(_numel(e.shape) for e in self.entries if e.is_parameter and e.key.startswith(prefix))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@cache
def load_manifest(name: str) -> Manifest:
    """Read ``manifests/<name>.json``."""
    path = MANIFEST_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MANIFEST_DIR.glob("*.json"))
        raise FileNotFoundError(f"no manifest {name!r} in {MANIFEST_DIR}; known: {known}")
    data = json.loads(path.read_text())
    entries = tuple(ManifestEntry(key, tuple(shape), _DTYPES[dtype], kind) for key, shape, dtype, kind in data["keys"])
    group = "aqr" if name == AQR_FORK_MANIFEST else None
    return Manifest(data["name"], entries, dict(data["module_versions"]), group)


def released_manifest_names() -> list[str]:
    return list(RELEASED.values())


def derived_manifest(model: ModelConfig) -> Manifest:
    """The official layout of a structure CMT never released (e.g. the tiny CPU config), derived from aqrcmt's own
    model, whose module names are the official ones: its state_dict keys in order, shapes, dtypes and module
    versions; 5-D weights of the sparse encoder are spconv-2 weights. Only for models without AQR."""
    from aqrcmt.models import build_model

    if model.aqr.enabled:
        raise ValueError("an official layout exists only for the released AQR fork's generator; convert the model "
                         "without AQR (model.aqr.enabled=false)")
    detector = build_model(model)
    state = detector.state_dict()
    parameters = {name for name, _ in detector.named_parameters()}
    entries = tuple(
        ManifestEntry(key, tuple(t.shape), t.dtype,
                      "sparse_conv" if key.startswith("pts_middle_encoder.") and t.dim() == 5
                      else "param" if key in parameters else "buffer")
        for key, t in state.items())
    versions = {prefix.rstrip("."): meta["version"] for prefix, meta in state._metadata.items()
                if prefix and meta.get("version", 1) != 1}
    return Manifest("derived_from_aqrcmt", entries, versions)


def manifests_for(model: ModelConfig) -> list[Manifest]:
    """The official layouts a checkpoint for `model` has: the released config's, plus the AQR fork's keys; for a
    structure that was never released, the layout derived from aqrcmt's model (:func:`derived_manifest`)."""
    backbone = model.camera.backbone if model.camera.enabled else None
    signature = (model.lidar.enabled, model.camera.enabled, backbone)
    if signature not in RELEASED:
        return [derived_manifest(model)]
    manifests = [load_manifest(RELEASED[signature])]
    if model.aqr.enabled:
        manifests.append(load_manifest(AQR_FORK_MANIFEST))
    return manifests
