"""The main job's two-process path (``train/demo.py --processes 2``): two CPU processes of one thread each share
the global batch, train through ``accelerate launch train/main.py`` and leave an evaluated checkpoint that the
demo's summary names. Small settings: a benchmark of 3 scenes x 2 key frames written beforehand in the main job's
version (the demo uses it), key-frame points, small images, few queries, 3 steps."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from aqrcmt.data.synthetic import make_synthetic_nuscenes
from aqrcmt.presets import MAIN_JOB_BENCHMARK

DEMO = Path(__file__).resolve().parents[1] / "train" / "demo.py"
SMALL = ["data.sweeps=1", "model.camera.image_size=(64,160)", "model.head.num_query=32", "train.tracker=none"]


def test_demo_in_two_processes_splits_the_batch_and_reports_the_evaluated_checkpoint(tmp_path: Path) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    make_synthetic_nuscenes(data, **asdict(replace(MAIN_JOB_BENCHMARK, scenes=3, samples_per_scene=2)))
    done = subprocess.run([sys.executable, str(DEMO), "--processes", "2", "--threads", "1", "--steps", "3",
                           "--out", str(run), "--root", str(data), "--set", *SMALL],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"using the synthetic benchmark in {data}" in done.stdout
    assert "2 process(es) x 1 intra-op thread(s)" in done.stdout
    summary = json.loads((run / "demo_summary.json").read_text())
    checkpoint = Path(summary["checkpoint"]).parent
    assert checkpoint.name == "step_00000003" and (checkpoint / "model.safetensors").is_file()
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert summary["val"] == {"mAP": metrics["mAP"], "NDS": metrics["NDS"]}
    assert metrics["num_samples"] == 2     # the 1 val scene
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["batch_size"] == 1 and config["model"]["head"]["sync_loss_normalizers"] is True


def test_demo_refuses_two_processes_of_one_sample_with_modality_drop_before_writing_anything(tmp_path: Path) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    done = subprocess.run([sys.executable, str(DEMO), "--processes", "2", "--out", str(run), "--root", str(data),
                           "--set", "data.augment.modality_drop=true"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --processes 2: data.batch_size=2 leaves 1 sample per process; ModalMask3D "
        "(data.augment.modality_drop) needs 2 (a LiDAR-dropped sample is one voxel)"]
    assert not run.exists() and not data.exists()
