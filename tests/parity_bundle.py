"""Locate and load the official-code parity bundle (reference tensors, see /work/shared/parity/README.md).

The bundle directory is `$AQRCMT_PARITY_DIR`, or `../shared/parity` relative to the repository root.
Tests call `load_parity("lidar")` (or "lidar.pt"); when the file is absent the test is skipped with a
message naming the expected path, so the suite still runs on a checkout without the bundle.
`load_manifest("vov_1600x640")` returns an official state_dict manifest (keys, shapes, per-module totals) from
the package's `aqrcmt/checkpoint/manifests/` or the shared docs folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    """Directory holding the parity `*.pt` files."""
    env = os.environ.get("AQRCMT_PARITY_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "parity").resolve()


def load_parity(name: str) -> dict[str, Any]:
    """Load bundle file `name` ("lidar" or "lidar.pt") with `weights_only=True`; skip the test if it is absent."""
    file_name = name if name.endswith(".pt") else f"{name}.pt"
    path = parity_dir() / file_name
    if not path.is_file():
        pytest.skip(f"parity bundle file {path} not found (set AQRCMT_PARITY_DIR to the bundle directory)")
    return torch.load(path, map_location="cpu", weights_only=True)


def fp32_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bundle stores float weights as (lossless) fp16; return them as fp32, other dtypes unchanged."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


MANIFEST_DIRS = (REPO_ROOT / "aqrcmt" / "checkpoint" / "manifests",
                 REPO_ROOT.parent / "shared" / "docs" / "official_manifests")


def load_manifest(name: str) -> dict[str, Any]:
    """Official manifest `official_manifest_<name>.json` (name e.g. "vov_1600x640"); skip the test if absent."""
    file_name = f"official_manifest_{name}.json"
    for directory in MANIFEST_DIRS:
        if (directory / file_name).is_file():
            return json.loads((directory / file_name).read_text())
    pytest.skip(f"manifest {file_name} not found in {[str(d) for d in MANIFEST_DIRS]}")
