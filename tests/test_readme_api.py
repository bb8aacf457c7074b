"""The README's Python API example, run as written on the synthetic nuScenes (only its first line, the paths, is
replaced): devkit records -> sweeps and camera matrices -> Predictor, and the detections carry class names that
agree with `aqrcmt predict`'s results.json for the same sample."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from aqrcmt.checkpoint.io import save_safetensors_atomic
from aqrcmt.cli import main
from aqrcmt.data.splits import sample_tokens_of_split
from aqrcmt.models import build_model
from aqrcmt.presets import load_config
from aqrcmt.structures import CLASS_NAMES

README = Path(__file__).resolve().parents[1] / "README.md"
PATHS_LINE = 'CHECKPOINT, ROOT, VERSION, DEVICE = "runs/x/best", "/data/nuscenes", "v1.0-trainval", "cuda"'

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_example() -> str:
    """The python block of the README's "Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and PATHS_LINE in blocks[0]
    return blocks[0]


def test_the_readme_python_api_example_runs_and_agrees_with_predict(synthetic_root: Path, tmp_path: Path,
                                                                     capsys) -> None:
    cfg = load_config("tiny_aqr", [f"data.root={synthetic_root}"])
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.safetensors"
    save_safetensors_atomic(build_model(cfg.model).state_dict(), checkpoint, {"config": cfg.to_json()})
    code = readme_example().replace(PATHS_LINE, f'CHECKPOINT, ROOT, VERSION, DEVICE = "{checkpoint}", '
                                                f'"{synthetic_root}", "{cfg.data.version}", "cpu"')
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    found, sample, nusc = scope["found"], scope["sample"], scope["nusc"]
    printed = capsys.readouterr().out.splitlines()
    assert len(found.names) == len(found.scores) > 0
    assert found.names == [CLASS_NAMES[i] for i in found.labels.tolist()]
    assert len(printed) == int((found.scores >= 0.3).sum()) and all(line.split()[0] in CLASS_NAMES for line in printed)
    assert len(scope["points"]) > 0 and np.unique(scope["points"][:, 4]).size > 1     # key frame and sweeps

    # the same sample through the dataset: `aqrcmt predict` writes the same boxes with the same class names
    split = next(s for s in (cfg.data.train_split, cfg.data.val_split)
                 if sample["token"] in sample_tokens_of_split(nusc, s))
    out = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(checkpoint), "--split", split, "--token", sample["token"],
                 "--out", str(out)]) == 0
    written = json.loads((out / "results.json").read_text())["results"][sample["token"]]
    order = np.argsort(-found.scores.numpy(), kind="stable")
    assert [b["detection_name"] for b in written] == [found.names[i] for i in order]
    np.testing.assert_allclose([b["translation"] for b in written], found.boxes[order, :3].numpy(), atol=1e-3)
