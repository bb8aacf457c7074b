"""nuScenes versions, splits and the devkit handle: where data loading and evaluation open a nuScenes root.

A split is an official one (``nuscenes.utils.splits``: train, val, mini_train, ...; it must fit the version) or a
custom one listed in ``<root>/<version>/splits.json`` (``{split name: [scene names]}``, the devkit's custom-split
file), so a custom split can be loaded for training and scored alike.

A condition (night, rain, fog, clear) narrows a split to the scenes whose ``scene.description`` names it
(:func:`scenes_with_condition`; ``aqrcmt evaluate --condition``).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from aqrcmt.data.files import DatasetError

TRAIN_VAL_SPLITS: dict[str, tuple[str, str]] = {   # version -> its official (train split, val split)
    "v1.0-trainval": ("train", "val"),
    "v1.0-mini": ("mini_train", "mini_val"),
}
TEST_VERSION = "v1.0-test"                         # holds the one official split "test"
VERSIONS: tuple[str, ...] = (*TRAIN_VAL_SPLITS, TEST_VERSION)
CUSTOM_SPLITS_FILE = "splits.json"
CONDITION_WORDS: tuple[str, ...] = ("night", "rain", "fog")    # words of nuScenes' scene descriptions
CONDITIONS: tuple[str, ...] = (*CONDITION_WORDS, "clear")       # clear: a description naming none of them

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes


def version_of_split(split: str) -> str:
    """The version whose scenes an official split names: mini_* -> v1.0-mini, test -> v1.0-test, else trainval."""
    return "v1.0-mini" if split.startswith("mini_") else TEST_VERSION if split == "test" else "v1.0-trainval"


def check_root(root: str | Path, version: str) -> None:
    """Raise a clear error when `version` is unknown or `root` or its `version` table folder is missing."""
    root = Path(root)
    if version not in VERSIONS:
        raise DatasetError(f"nuScenes version {version!r} is not one of {VERSIONS}")
    if not root.is_dir():
        raise FileNotFoundError(f"nuScenes root {root} does not exist or is not a directory")
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "sample.json").is_file())
        raise FileNotFoundError(f"nuScenes version {version!r} not found under {root}: it has no {version}/ table "
                                f"folder (versions there: {found or 'none'})")


def table_stamp(root: Path, version: str) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime in ns, size in bytes) of every table of `version`: changes when the tables are rewritten."""
    tables = sorted((root / version).glob("*.json"))
    return tuple((t.name, t.stat().st_mtime_ns, t.stat().st_size) for t in tables)


def open_nuscenes(root: str | Path, version: str) -> NuScenes:
    """The devkit's ``NuScenes(version, root)`` after :func:`check_root`; kept while its tables are unchanged, so
    evaluating every epoch reloads nothing."""
    check_root(root, version)
    root = Path(root).resolve()
    return _load_nuscenes(str(root), version, table_stamp(root, version))


@functools.lru_cache(maxsize=1)
def _load_nuscenes(root: str, version: str, stamp: tuple[tuple[str, int, int], ...]) -> NuScenes:
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=version, dataroot=root, verbose=False)


def custom_splits(root: str | Path, version: str) -> dict[str, list[str]]:
    """The custom splits of ``<root>/<version>/splits.json`` (split name -> scene names); {} without the file."""
    path = Path(root) / version / CUSTOM_SPLITS_FILE
    if not path.is_file():
        return {}
    try:
        splits = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise DatasetError(f"custom split file {path} is not valid JSON ({error})") from None
    if not isinstance(splits, dict) or not all(isinstance(scenes, list) for scenes in splits.values()):
        raise DatasetError(f"custom split file {path} must map each split name to a list of scene names")
    return splits


def scenes_of_split(root: str | Path, version: str, split: str) -> list[str]:
    """Scene names of `split`: an official split of `version`, or a custom split of its splits.json."""
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes()
    if split in official:
        needed = version_of_split(split)
        if version != needed:
            raise DatasetError(f"split {split!r} needs a {needed.removeprefix('v1.0-')} version, got {version!r}")
        return official[split]
    custom = custom_splits(root, version)
    if split not in custom:
        raise DatasetError(f"unknown nuScenes split {split!r}: not an official split ({sorted(official)}) nor in "
                           f"{Path(root) / version / CUSTOM_SPLITS_FILE}")
    return custom[split]


def conditions_of(description: str) -> set[str]:
    """The CONDITIONS of a scene description: the CONDITION_WORDS it names as words, in any case ("Night, rain,
    parked cars" -> night, rain), or clear when it names none."""
    return set(re.findall(r"[a-z]+", description.lower())) & set(CONDITION_WORDS) or {"clear"}


def scenes_with_condition(nusc: NuScenes, scene_names: list[str], condition: str) -> list[str]:
    """The scenes of `scene_names` whose description names `condition` (clear: names none of CONDITION_WORDS).

    A night/rain/fog selection needs some scene of the index to name a condition at all (the synthetic
    benchmark's do not): otherwise a DatasetError naming the root. On such a dataset clear is every scene.
    """
    if condition not in CONDITIONS:
        raise DatasetError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    named = {scene["name"]: conditions_of(scene["description"]) for scene in nusc.scene}
    if condition != "clear" and all(conditions == {"clear"} for conditions in named.values()):
        raise DatasetError(f"no scene description of {nusc.dataroot} ({nusc.version}) names a condition "
                           f"({', '.join(CONDITION_WORDS)}), so none is {condition!r}")
    return [name for name in scene_names if condition in named.get(name, ())]


def sample_tokens_of_split(nusc: NuScenes, split: str, condition: Optional[str] = None) -> list[str]:
    """Sample tokens of every sample of `split` (of its scenes with `condition`, if given) in the devkit index
    `nusc`, in the index's order."""
    scene_names = scenes_of_split(nusc.dataroot, nusc.version, split)
    if condition is not None:
        scene_names = scenes_with_condition(nusc, scene_names, condition)
    scene_names = set(scene_names)
    scene_of = {s["token"]: s["name"] for s in nusc.scene}
    return [s["token"] for s in nusc.sample if scene_of[s["scene_token"]] in scene_names]
