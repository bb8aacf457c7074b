"""A synthetic nuScenes in the devkit's on-disk format, for tests, demos and CPU training.

The world (:mod:`.world`): the ego drives a gentle arc among 0-3 objects of each detection class (plus
distractors the task ignores), each object a body whose parts differ front to back; scenes are clear, at night,
in rain or in fog. The sensors: a 32-beam spinning LiDAR whose rays return from the nearest surface
(:mod:`.lidar`) and six level cameras that render shaded objects with lamps (:mod:`.camera`). The writer
(:mod:`.writer`) writes the devkit's 13 tables and the sensor files. ``NuScenes(version, root)`` loads the result
and ``DetectionEval`` scores it; everything derives from ``seed`` (same arguments, same bytes).
"""
from aqrcmt.data.synthetic.world import FULL_IMAGE_SIZE, ConditionShares
from aqrcmt.data.synthetic.writer import DEFAULT_IMAGE_SIZE, make_synthetic_nuscenes

__all__ = ["ConditionShares", "DEFAULT_IMAGE_SIZE", "FULL_IMAGE_SIZE", "make_synthetic_nuscenes"]
