"""`aqrcmt export` (torch.export + ONNX) and `aqrcmt predict --engine onnx`: the exported graph against eager
PyTorch, the ONNX graph's domains, the manifest, and bad input."""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch

from aqrcmt.checkpoint.io import save_safetensors_atomic, sha256_of
from aqrcmt.cli import main
from aqrcmt.data.synthetic_batch import camera_ring, synthetic_batch
from aqrcmt.export import bundle
from aqrcmt.export.graph import DenseGraph, finish_detections, inverse_4x4, max_differences, sample_inputs
from aqrcmt.export.precision import with_precision
from aqrcmt.export.runtime import OnnxDetector
from aqrcmt.inference import load_detector_from_checkpoint
from aqrcmt.models import build_model
from aqrcmt.presets import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# fp32: max |difference| of scores, and of box parameters (m, rad, m/s) relative to max(1, |value|): centres are
# sigmoid(logit) * 108 m - 54 m, so at the released sizes eager fp32 already differs from itself on another thread
# count by nearly 1e-4 m (docs/deployment.md, "fp32's own floor"; bench/export_fp32_floor.py).
TOLERANCE = 1e-4
PRESETS = ("tiny", "tiny_aqr")


def test_closed_form_inverse_equals_linalg_inv() -> None:
    matrices = torch.cat([camera_ring((128, 352)), torch.randn(8, 4, 4, dtype=torch.float64)])
    torch.testing.assert_close(inverse_4x4(matrices), torch.linalg.inv(matrices), rtol=1e-9, atol=1e-12)


def _checkpoint(preset: str, folder: Path, overrides: list[str]) -> Path:
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    path = folder / f"{preset}.safetensors"
    save_safetensors_atomic(build_model(cfg.model).state_dict(), path, {"config": cfg.to_json()})
    return path


@pytest.fixture(scope="module")
def checkpoints(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    # tiny_aqr with the router's sensor evidence (atan2, one-hot, gather) in the graph too (tiny's BEV heading
    # branch, read at the query centres by grid_sample, is in every tiny graph)
    extra = {"tiny_aqr": ["model.aqr.generator.sensor_evidence=true"]}
    return {preset: _checkpoint(preset, folder,
                                [f"data.root={synthetic_root}", "data.sweeps=1", *extra.get(preset, [])])
            for preset in PRESETS}


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """preset -> export folder written by `aqrcmt export` (tiny_aqr in both formats, tiny as ONNX)."""
    folder = tmp_path_factory.mktemp("export")
    for preset, fmt in (("tiny_aqr", "both"), ("tiny", "onnx")):
        assert main(["export", "--checkpoint", str(checkpoints[preset]), "--out", str(folder / preset),
                     "--format", fmt]) == 0
    return {preset: folder / preset for preset in PRESETS}


CASES = ("points+images", "no points+black", "points+black")


def _batches(cfg, cases: tuple[str, ...]) -> dict[str, object]:
    """Synthetic batches of one sample: points + random images; no points + all-black images; points + black
    images."""
    batches = {}
    for seed, case in enumerate(cases):
        batch = synthetic_batch(cfg, batch_size=1, num_boxes=(6,), seed=seed, zero_images="black" in case)
        if case.startswith("no points"):
            batch.points = [batch.points[0][:0]]
        batches[case] = batch
    return batches


def _parity(checkpoint: Path, folder: Path, cases: tuple[str, ...],
            precision: str = "fp32") -> dict[tuple[str, str], dict[str, float]]:
    """(case, runtime) -> ``max_differences`` of the export in `folder` against eager fp32, and for fp16 also
    (case, runtime + " vs eager fp16") against the eager fp16 model; also checks that the eager graph plus the
    filter after it is the eager detector's own prediction."""
    detector, _ = load_detector_from_checkpoint(checkpoint)
    graph = DenseGraph(detector)
    graph_fp16 = DenseGraph(with_precision(detector, "fp16")) if precision == "fp16" else None
    engine = OnnxDetector(folder)
    torch_file = folder / bundle.FILES["torch"]
    program = torch.export.load(torch_file).module() if torch_file.is_file() else None
    head = detector.cfg.head
    found = {}
    for case, batch in _batches(detector.cfg, cases).items():
        feeds = engine.graph_inputs(batch, 0)
        inputs = [torch.from_numpy(array) for array in feeds.values()]
        with torch.no_grad():
            eager = graph(*inputs)
            eager_fp16 = graph_fp16(*inputs) if graph_fp16 is not None else None
            kept = finish_detections(eager[0][0], eager[1][0], eager[2][0], post_center_range=head.post_center_range,
                                     score_threshold=head.score_threshold)
            (reference,) = detector.predict(batch)
            outputs = {"onnxruntime": engine.run(feeds)}
            if program is not None:
                outputs["torch.export"] = program(*inputs)
        torch.testing.assert_close(kept.boxes, reference.boxes, rtol=0, atol=1e-5)
        torch.testing.assert_close(kept.scores, reference.scores, rtol=0, atol=1e-6)
        for runtime, got in outputs.items():
            references = {runtime: eager} if eager_fp16 is None else {runtime: eager, f"{runtime} vs eager fp16":
                                                                      eager_fp16}
            for label, reference in references.items():
                found[case, label] = d = max_differences(reference, got)
                print(f"{checkpoint.stem} {precision} {case} {label}: scores {d['scores']:.2e}, boxes "
                      f"{d['boxes']:.2e} (relative {d['boxes_relative']:.2e})")
    return found


@pytest.mark.parametrize("preset", PRESETS)
def test_exported_graphs_equal_eager(preset: str, checkpoints: dict[str, Path], exported: dict[str, Path]) -> None:
    found = _parity(checkpoints[preset], exported[preset], CASES)
    assert len(found) == (6 if preset == "tiny_aqr" else 3)
    for key, d in found.items():
        assert d["scores"] <= TOLERANCE and d["boxes_relative"] <= TOLERANCE, (key, d)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "cases"), [
    ("cmt_voxel0100_r50_800x320_cbgs", ("points+images", "no points+black")),
    # one input: eager VoV-99 at 1600 x 640 and its onnxruntime session together need ~20 GB
    ("cmt_aqr_recommended_voxel0075_vov_1600x640_cbgs", ("points+images",)),
])
def test_released_size_exports_equal_eager(preset: str, cases: tuple[str, ...], tmp_path: Path) -> None:
    """The released sizes with random weights (minutes and 12-20 GB of memory each on a CPU)."""
    checkpoint = _checkpoint(preset, tmp_path, [])
    detector, _ = load_detector_from_checkpoint(checkpoint)
    bundle.write_export(load_config(preset), detector, checkpoint, tmp_path / "export", fmt="onnx")
    del detector
    found = _parity(checkpoint, tmp_path / "export", cases)
    for key, d in found.items():
        assert d["scores"] <= TOLERANCE and d["boxes_relative"] <= TOLERANCE, (key, d)


def _bench_module(name: str):
    """A script of bench/ as a module (bench/ is not importable from tests/)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                          # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_fp32_floor_measures_against_a_float64_run() -> None:
    """bench/export_fp32_floor.py: the tapped graph returns DenseGraph's outputs and then its taps, and its
    float64 run computes in float64 throughout, near eager fp32 but not equal to it."""
    floor = _bench_module("export_fp32_floor")
    torch.manual_seed(0)
    detector = build_model(load_config("tiny").model).eval()
    inputs = sample_inputs(detector)
    exact = floor.TappedGraph(copy.deepcopy(detector).double())
    graph = floor.TappedGraph(detector)
    with torch.no_grad():
        plain, tapped = DenseGraph(detector)(*inputs), graph(*inputs)
        with floor.Float64():
            exact_outputs = exact(*inputs)
    assert [tap.name for tap in graph.taps] == [tap.name for tap in floor.TAPS]     # tiny has every tapped module
    assert len(tapped) == len(plain) + len(floor.TAPS) and not graph.captured
    for a, b in zip(plain, tapped):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {t.dtype for t in exact_outputs if t.is_floating_point()} == {torch.float64}
    differences = floor.output_differences(exact_outputs, tuple(t.double() if t.is_floating_point() else t
                                                                for t in tapped))
    assert len(differences) == 1 + len(floor.BOX_GROUPS)
    assert 0 < differences[1] <= TOLERANCE and max(differences) <= TOLERANCE, differences


# fp16 (the backbones and necks in float16): the exported program against the eager fp16 model differs only by
# the order of the decomposed ops; onnxruntime's CPU provider computes the float16 convolutions in float32 between
# casts, and random weights turn the fp16 rounding into centres ~0.1 m apart (docs/deployment.md has the figures).
# Bounds: (scores, boxes in m, rad, m/s).
FP16_TOLERANCE = {"torch.export vs eager fp16": (1e-4, 1e-4), "torch.export": (2e-3, 0.25),
                  "onnxruntime vs eager fp16": (2e-3, 0.25), "onnxruntime": (2e-3, 0.25)}


@pytest.mark.slow
def test_fp16_export_runs_on_the_cpu_near_eager(synthetic_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """--precision fp16: a valid ONNX graph with float16 backbone weights and fp32 inputs / outputs, which
    onnxruntime runs on the CPU; both runtimes near eager fp16 and eager fp32. PyTorch's CPU float16 convolution
    is its slow reference kernel, so this runs tiny_aqr on 64 x 160 images and one input (about a minute)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)          # the CPU note, on any machine
    checkpoint = _checkpoint("tiny_aqr", tmp_path, [f"data.root={synthetic_root}", "data.sweeps=1",
                                                    "model.camera.image_size=[64,160]"])
    out = tmp_path / "fp16"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format", "both",
                 "--precision", "fp16"]) == 0
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note.startswith("note: no CUDA GPU") and "no float16 kernel for" in note and "Conv" in note, note
    manifest = json.loads((out / "manifest.json").read_text())
    precision = manifest["precision"]
    assert precision["name"] == "fp16"
    assert precision["float16_modules"] == ["pts_backbone", "pts_neck", "img_backbone", "img_neck"]
    model = onnx.load(out / bundle.FILES["onnx"])
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: t.data_type for t in model.graph.initializer if t.name.startswith("detector.")}
    half = {name for name, dtype in weights.items() if dtype == onnx.TensorProto.FLOAT16}
    assert half and half == {name for name in weights if name.split(".")[1] in precision["float16_modules"]}
    dtypes = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE, "int64": onnx.TensorProto.INT64}
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == \
        [dtypes[spec["dtype"]] for spec in (*manifest["inputs"], *manifest["outputs"])]
    found = _parity(checkpoint, out, CASES[:1], precision="fp16")
    assert len(found) == 4
    for (case, label), d in found.items():
        score_bound, box_bound = FP16_TOLERANCE[label]
        assert d["scores"] <= score_bound and d["boxes"] <= box_bound, (case, label, d)
    recorded = precision["max_abs_difference_vs_eager_fp32"]
    assert 0 < recorded["scores"] <= FP16_TOLERANCE["torch.export"][0]


@pytest.mark.parametrize("preset", PRESETS)
def test_onnx_graph_holds_only_the_standard_domain(preset: str, exported: dict[str, Path]) -> None:
    model = onnx.load(exported[preset] / bundle.FILES["onnx"])
    assert {entry.domain for entry in model.opset_import} <= {"", "ai.onnx"}
    assert {node.domain for node in model.graph.node} == {""}
    assert not model.functions                                 # nothing hidden in local functions either
    if preset == "tiny_aqr":                                   # the splat's index_add is in the graph
        assert "ScatterND" in {node.op_type for node in model.graph.node}


def test_manifest_describes_the_graph(checkpoints: dict[str, Path], exported: dict[str, Path]) -> None:
    manifest = json.loads((exported["tiny_aqr"] / "manifest.json").read_text())
    model = onnx.load(exported["tiny_aqr"] / bundle.FILES["onnx"])
    onnx_inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert onnx_inputs == {spec["name"]: spec["shape"] for spec in manifest["inputs"]}
    assert [spec["name"] for spec in manifest["outputs"]] == [o.name for o in model.graph.output]
    assert manifest["outputs"][2]["shape"] == [1, 100, 9]       # max_num boxes of 9 values
    assert manifest["outputs"][3]["shape"] == [1, 300, 10]      # every query's class scores
    assert manifest["checkpoint"]["sha256"] == sha256_of(checkpoints["tiny_aqr"])
    assert manifest["opset"] == bundle.OPSET and manifest["precision"]["name"] == "fp32"
    assert manifest["precision"]["float16_modules"] == []
    measured = manifest["precision"]["max_abs_difference_vs_eager_fp32"]
    assert 0 <= measured["scores"] <= TOLERANCE and 0 <= measured["boxes_relative"] <= TOLERANCE
    assert manifest["config"]["model"]["aqr"]["enabled"] is True
    assert sorted(manifest["files"]) == ["lidar_front_end", "onnx", "torch"]
    assert any("spconv" in line for line in manifest["outside_graph"])


def _results(folder: Path) -> dict[str, list[dict]]:
    return json.loads((folder / "results.json").read_text())["results"]


def test_predict_with_the_onnx_engine_matches_eager(checkpoints: dict[str, Path], exported: dict[str, Path],
                                                    synthetic_root: Path, tmp_path: Path) -> None:
    common = ["--split", "mini_val", "--samples", "3", "--root", str(synthetic_root)]
    assert main(["predict", "--checkpoint", str(checkpoints["tiny_aqr"]), *common,
                 "--out", str(tmp_path / "eager")]) == 0
    assert main(["predict", "--engine", "onnx", "--model", str(exported["tiny_aqr"]), *common,
                 "--out", str(tmp_path / "onnx")]) == 0
    eager, onnx_results = _results(tmp_path / "eager"), _results(tmp_path / "onnx")
    assert eager.keys() == onnx_results.keys() and len(eager) == 3
    for token, boxes in eager.items():
        assert len(boxes) == len(onnx_results[token]) > 0
        for a, b in zip(boxes, onnx_results[token]):
            assert a["detection_name"] == b["detection_name"]
            values = ("translation", "size", "rotation", "velocity")
            diff = max(abs(x - y) for key in values for x, y in zip(a[key], b[key]))
            assert diff <= TOLERANCE and abs(a["detection_score"] - b["detection_score"]) <= TOLERANCE
        assert {p.name for p in (tmp_path / "onnx" / token).iterdir()} == {"bev.png", "cameras.png"}


def _fails(argv: list[str], capsys: pytest.CaptureFixture, expected: str) -> None:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_bad_input_gives_one_error_line_and_writes_nothing(checkpoints: dict[str, Path], exported: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = str(checkpoints["tiny"])
    out = tmp_path / "out"
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        (["export", "--checkpoint", ckpt, "--out", str(full)], str(full)),
        (["export", "--checkpoint", ckpt, "--out", str(a_file / "sub")], str(a_file)),
        (["export", "--checkpoint", ckpt, "--out", str(out), "--override", "model.head.hidden_dim=32"],
         "pts_bbox_head"),
        (["export", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(out)], "missing.safetensors"),
        (["predict", "--engine", "onnx", "--checkpoint", ckpt, "--out", str(out)], "--model"),
        (["predict", "--engine", "onnx", "--model", str(full), "--out", str(out)], "manifest.json"),
    ]
    broken = full / "broken"                                     # an export whose graph onnxruntime refuses
    shutil.copytree(exported["tiny"], broken)
    (broken / bundle.FILES["onnx"]).write_bytes(b"not an onnx model")
    cases.append((["predict", "--engine", "onnx", "--model", str(broken), "--out", str(out)],
                  "cannot run it"))
    for argv, expected in cases:
        _fails(argv, capsys, expected)
    monkeypatch.setattr(bundle, "EXTRA_MODULES", (*bundle.EXTRA_MODULES, "aqrcmt_no_such_module"))
    _fails(["export", "--checkpoint", ckpt, "--out", str(out), "--format", "onnx"], capsys, "aqrcmt[export]")
    _fails(["predict", "--engine", "onnx", "--model", str(exported["tiny"]), "--out", str(out)], capsys,
           "aqrcmt[export]")
    with pytest.raises(SystemExit) as exit_info:                  # argparse: an unknown format
        main(["export", "--checkpoint", ckpt, "--out", str(out), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]      # no out, no staging folder
