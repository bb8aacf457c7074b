"""Model code: LiDAR branch, camera branch, CMT head, AQR, and the assembled detector.

`CmtDetector` and `build_model` are imported lazily so that importing one submodule (e.g.
`aqrcmt.models.camera`) does not pull in spconv and the whole detector.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aqrcmt.models.detector import CmtDetector, build_model

__all__ = ["CmtDetector", "build_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aqrcmt.models import detector
        return getattr(detector, name)
    raise AttributeError(f"module 'aqrcmt.models' has no attribute {name!r}")
