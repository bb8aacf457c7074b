"""The parity bundle: reference tensors that the official CMT code computed on fixed inputs and random weights.

The bundle directory is `$AQRCMT_PARITY_DIR`, or `../shared/parity` beside the repository. It does not travel with a
clone: tests that read it carry `@pytest.mark.parity("<file stem>")`, and conftest skips them by name when the file
is absent (and lists them at the end of the run). Everything else, the official state_dict layouts included, comes
from the package (`aqrcmt/checkpoint/manifests`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    """Directory holding the parity `*.pt` files."""
    env = os.environ.get("AQRCMT_PARITY_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "parity").resolve()


def parity_file(name: str) -> Path:
    return parity_dir() / f"{name}.pt"


def load_parity(name: str) -> dict[str, Any]:
    """Load bundle file `<name>.pt` (e.g. "lidar") with `weights_only=True`."""
    return torch.load(parity_file(name), map_location="cpu", weights_only=True)


def fp32_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bundle stores float weights as (lossless) fp16; return them as fp32, other dtypes unchanged."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
