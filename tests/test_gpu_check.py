"""bench/gpu_check.py (code in bench/gpucheck/): the smoke run covers every part on CPU, the time box and failure
isolation work."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
PACKAGE = SCRIPT.with_name("gpucheck")          # the check's modules, imported by the script as `gpucheck`
PARTS = ("correctness", "kernels", "inference", "training", "export")


@pytest.fixture(scope="module")
def gpu_check():
    """The package bench/gpucheck, loaded from its folder (bench/ is not importable from tests/)."""
    spec = importlib.util.spec_from_file_location("gpucheck", PACKAGE / "__init__.py",
                                                  submodule_search_locations=[str(PACKAGE)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["gpucheck"] = package          # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(package)
    for module in ("cli", "part", "plan"):
        importlib.import_module(f"gpucheck.{module}")
    yield package
    for name in [name for name in sys.modules if name == "gpucheck" or name.startswith("gpucheck.")]:
        del sys.modules[name]


def _numbers(value, path="report"):
    """(path, number) for every int/float in a JSON value (bools excluded)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = sorted(out.glob("cpu_*.json"))
    assert len(reports) == 1, f"expected one cpu_<device>.json in {sorted(out.iterdir())}"
    return reports[0], json.loads(reports[0].read_text())


def test_smoke_run_reports_every_part_ok_with_finite_numbers(smoke_report) -> None:
    path, report = smoke_report
    assert path.with_suffix(".md").is_file()
    markdown = path.with_suffix(".md").read_text()
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert f"## {name}: {part['status']}" in markdown
        if part["status"] == "skipped":
            assert part["reason"], f"{name}: skipped without a reason"
            continue
        assert part["status"] == "ok", f"{name}: {part['status']}: {part['reason']} {part['error']}"
        assert part["rows"] and part["protocol"], f"{name}: no measurements or no protocol"
        assert not any("error" in row for row in part["rows"])
    bad = [(where, number) for where, number in _numbers(report) if not math.isfinite(number)]
    assert not bad, f"non-finite numbers: {bad[:5]}"


def test_smoke_run_measures_what_the_protocol_names(smoke_report) -> None:
    _, report = smoke_report
    parts = report["parts"]
    assert all(row["passed"] for row in parts["correctness"]["rows"])
    assert {row["dtype"] for row in parts["correctness"]["rows"]} == {"float32", "bfloat16", "float16"}
    assert any("no CUDA: compiled Triton not run" in note for note in parts["kernels"]["notes"])
    impls = {row.get("impl") for row in parts["kernels"]["rows"]}
    assert {"eager pytorch", "compiled pytorch"} <= impls
    timed = [row for row in parts["inference"]["rows"] if row["mode"] != "input"]
    assert {(row["mode"], row["precision"]) for row in timed} == {
        ("eager", "fp16"), ("eager", "bf16"), ("compiled", "fp16"), ("compiled", "bf16")}
    for row in timed:
        stages = sum(row[f"{stage}_ms"] for stage in ("voxelization", "lidar_backbone", "camera_backbone_neck",
                                                       "head", "decode"))
        assert stages > 0 and row["fps"] == pytest.approx(1e3 / row["total_ms"])
    assert parts["export"]["status"] == "skipped" and parts["export"]["reason"].startswith("no CUDA: onnxruntime's")
    checks = {check["check"]: check for check in parts["training"]["checks"]}
    assert checks["recompiles after warm-up"]["value"] == 0
    assert {"AQR share of the step, eager", "AQR share of the step, compiled"} <= set(checks)


def test_part_budget_skips_the_remaining_items_and_says_so(gpu_check) -> None:
    ran = []

    def body(part) -> None:
        part.item("first", lambda: ran.append("first") or {"item": "first"})
        part.item("second", lambda: ran.append("second") or {"item": "second"})

    spent = gpu_check.part.run_part("demo", 0.0, body)
    assert ran == [] and spent["status"] == "partial" and "first, second" in spent["reason"]
    full = gpu_check.part.run_part("demo", 60.0, body)
    assert ran == ["first", "second"] and full["status"] == "ok" and len(full["rows"]) == 2


def test_failing_item_is_recorded_and_the_next_item_still_runs(gpu_check) -> None:
    def body(part) -> None:
        part.item("broken", lambda: {}["missing"])
        part.item("fine", lambda: {"item": "fine", "value": 1.0})

    result = gpu_check.part.run_part("demo", 60.0, body)
    assert result["status"] == "failed" and result["error"] == "KeyError: 'missing'"
    assert [row["item"] for row in result["rows"]] == ["broken", "fine"]


def test_exception_escaping_a_part_is_recorded_with_its_type(gpu_check) -> None:
    def body(part) -> None:
        raise ValueError("no such config")

    result = gpu_check.part.run_part("demo", 60.0, body)
    assert result["status"] == "failed" and result["error"] == "ValueError: no such config"


def test_unknown_part_is_a_clear_error(gpu_check, tmp_path, capsys) -> None:
    assert gpu_check.cli.main(["--out", str(tmp_path), "--parts", "kernels,warp_drive"]) == 2
    assert "error: --parts: unknown part(s) ['warp_drive']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_device_label_has_no_host_name_and_only_safe_characters(gpu_check) -> None:
    import platform

    import torch

    label = gpu_check.plan.device_label(torch.device("cpu"))
    assert label.startswith("cpu_") and platform.node().lower() not in label.split("_")
    assert all(c.isalnum() or c == "_" for c in label)
