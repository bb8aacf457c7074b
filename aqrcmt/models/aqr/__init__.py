"""AQR (adaptive query re-weighting) for the CMT head: generator -> projection -> rendering -> modulation.

See docs/aqr.md for the design, the fork's defects it avoids and the diagnose numbers behind the defaults.
"""
from aqrcmt.models.aqr.generator import AQRWeightGenerator
from aqrcmt.models.aqr.module import AQRModulation
from aqrcmt.models.aqr.monitor import HealthMonitor
from aqrcmt.models.aqr.projection import Projection, project_to_bev, project_to_cameras

__all__ = ["AQRModulation", "AQRWeightGenerator", "HealthMonitor", "Projection",
           "project_to_bev", "project_to_cameras"]
