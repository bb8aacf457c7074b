"""Checkpoint conversion: synthetic official checkpoints built from the manifests, converted, loaded, reversed."""
from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aqrcmt.checkpoint import keymap
from aqrcmt.checkpoint.convert import sha256_of, spconv1_shape
from aqrcmt.atomic import atomic_write, atomic_write_bytes, pickle_atomic
from aqrcmt.checkpoint.io import CheckpointError, load_safetensors, save_safetensors_atomic, torch_save_atomic
from aqrcmt.checkpoint.manifest import AQR_FORK_MANIFEST, Manifest, load_manifest
from aqrcmt.cli import main as cli_main
from aqrcmt.tools.convert_checkpoint import main as convert_main

R50 = "cmt_voxel0100_r50_800x320_cbgs"
VOV = "cmt_voxel0075_vov_1600x640_cbgs"
LIDAR = "cmt_lidar_voxel0075_cbgs"
CAMERA = "cmt_camera_vov_1600x640_cbgs"
R50_AQR = "cmt_aqr_voxel0100_r50_800x320_cbgs"


# --------------------------------------------------------------------------------------------------
# Synthetic official checkpoints
# --------------------------------------------------------------------------------------------------
def synthetic_state_dict(*manifests: Manifest, prefix: str = "") -> collections.OrderedDict:
    """Official keys/shapes/dtypes with distinct values per key: key i holds values in [2i, 2i + 1)
    (num_batches_tracked = i), so a tensor that lands in another key's place is always caught."""
    generator = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    entries = [e for m in manifests for e in m.entries]
    for i, entry in enumerate(entries):
        if entry.dtype == torch.int64:
            state[prefix + entry.key] = torch.tensor(i, dtype=torch.int64).reshape(entry.shape)
        else:
            state[prefix + entry.key] = torch.rand(entry.shape, generator=generator) + 2 * i
    state._metadata = collections.OrderedDict(
        (prefix + module, {"version": version}) for m in manifests for module, version in m.module_versions.items())
    return state


def write_mmcv_checkpoint(path: Path, state: dict, meta: dict | None = None) -> Path:
    meta = {"epoch": 20, "iter": 123, "CLASSES": ("car", "truck"), "mmcv_version": "1.6.0"} if meta is None else meta
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    return path


def convert(*argv: str) -> int:
    return cli_main(["convert", *map(str, argv)])


@pytest.fixture(scope="module")
def r50_source(tmp_path_factory) -> tuple[Path, collections.OrderedDict]:
    state = synthetic_state_dict(load_manifest(R50))
    return write_mmcv_checkpoint(tmp_path_factory.mktemp("r50") / "official_r50.pth", state), state


@pytest.fixture(scope="module")
def lidar_source(tmp_path_factory) -> tuple[Path, collections.OrderedDict]:
    state = synthetic_state_dict(load_manifest(LIDAR))
    return write_mmcv_checkpoint(tmp_path_factory.mktemp("lidar") / "official_lidar.pth", state), state


def assert_loaded_exactly(model: torch.nn.Module, official: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every official tensor sits, bit for bit, in the aqrcmt parameter/buffer the keymap names."""
    state = model.state_dict()
    for key, tensor in official.items():
        name = keymap.to_aqrcmt(key[len(prefix):])
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), f"{key} did not land in {name}"


def list_dir(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------
# Totals of the official state_dict() (the table in docs/checkpoints.md).
OFFICIAL_TOTALS = {VOV: (997, 86_607_380), R50: (689, 40_919_572), LIDAR: (361, 16_769_492),
                   CAMERA: (781, 78_156_100)}


@pytest.mark.parametrize("name", list(OFFICIAL_TOTALS))
def test_manifest_totals_match_the_official_model(name):
    manifest = load_manifest(name)
    keys, params = OFFICIAL_TOTALS[name]
    assert len(manifest) == keys == len(set(manifest.keys()))
    assert manifest.num_parameters() == params
    sparse = [e for e in manifest.entries if e.kind == "sparse_conv"]
    assert len(sparse) == (0 if name == CAMERA else 21)
    # mmdet3d needs version 2 on every sparse module, or it permutes the weights when loading.
    assert all(manifest.module_versions[e.key.rsplit(".", 1)[0]] == 2 for e in sparse)


# --------------------------------------------------------------------------------------------------
# Conversion into the aqrcmt model, and back
# --------------------------------------------------------------------------------------------------
def test_r50_converts_loads_strictly_and_reverses_exactly(r50_source, tmp_path):
    from aqrcmt.overrides import config_from_dict
    from aqrcmt.models import build_model
    from aqrcmt.presets import get_preset

    src, official = r50_source
    dst, back = tmp_path / "r50.safetensors", tmp_path / "r50_back.pth"
    assert convert(src, dst, "--config", R50) == 0
    tensors, metadata = load_safetensors(dst)
    assert metadata["source_sha256"] == sha256_of(src) and metadata["source_file"] == src.name
    assert metadata["config_name"] == R50 and metadata["converter_version"]
    assert config_from_dict(json.loads(metadata["config"])).model == get_preset(R50).model
    assert json.loads(metadata["source_meta"])["epoch"] == 20

    model = build_model(get_preset(R50).model)
    model.load_state_dict(tensors, strict=True)
    assert_loaded_exactly(model, official)

    assert convert_main([str(dst), str(back), "--config", R50, "--reverse"]) == 0  # python -m aqrcmt.convert
    reloaded = torch.load(back, weights_only=True)
    assert list(reloaded["state_dict"]) == list(official)
    for key, tensor in official.items():
        assert reloaded["state_dict"][key].dtype == tensor.dtype and torch.equal(reloaded["state_dict"][key], tensor)
    assert dict(reloaded["state_dict"]._metadata) == dict(official._metadata)
    assert reloaded["meta"]["epoch"] == 20 and reloaded["meta"]["aqrcmt_convert"]["config_name"] == R50


def test_aqr_fork_checkpoint_with_ddp_prefix(tmp_path, capsys):
    """The fork's generator keys are renamed, its derived buffers dropped, DDP's 'module.' removed."""
    from aqrcmt.models import build_model
    from aqrcmt.presets import get_preset

    official = synthetic_state_dict(load_manifest(R50), load_manifest(AQR_FORK_MANIFEST), prefix="module.")
    official["module.pts_bbox_head.weight_renderer.gaussian_kernel"] = torch.rand(7, 7)
    official["module.pts_bbox_head.attention_bias_generator.bias_scale"] = torch.tensor([2.5])
    official["module.pts_bbox_head.attention_bias_generator.x_offsets"] = torch.arange(49)
    src, dst = write_mmcv_checkpoint(tmp_path / "fork.pth", official), tmp_path / "fork.safetensors"
    assert convert(src, dst, "--config", R50_AQR) == 0
    out = capsys.readouterr().out
    assert "18 renamed" in out and out.count("dropped module.") == 0 and out.count("dropped pts_bbox_head.") == 3

    tensors, _ = load_safetensors(dst)
    model = build_model(get_preset(R50_AQR).model)
    model.load_state_dict(tensors, strict=True)
    kept = {k: v for k, v in official.items() if "weight_renderer" not in k and "attention_bias" not in k}
    assert_loaded_exactly(model, kept, prefix="module.")

    # The fork's generator needs tanh and no type embeddings: recorded, and --load-from sets them in the config
    from aqrcmt.checkpoint.weights import apply_required_settings, required_settings, stored_config
    assert required_settings(dst) == {"model.aqr.generator.activation": "tanh",
                                      "model.aqr.generator.use_type_embed": False}
    assert stored_config(dst).model.aqr.generator.activation == "tanh"
    cfg = get_preset(R50_AQR)
    assert apply_required_settings(cfg, dst) == ["model.aqr.generator.activation: 'sigmoid' -> 'tanh'",
                                                 "model.aqr.generator.use_type_embed: True -> False"]
    assert apply_required_settings(cfg, dst) == [] and cfg.model.aqr.generator.activation == "tanh"
    fork_generator = build_model(cfg.model).pts_bbox_head.aqr.weight_generator
    assert not fork_generator.bev_type_embed.requires_grad      # unused as in the fork, so frozen

    # A plain CMT checkpoint converts for the AQR model too: only the generator is left to initialise.
    plain = synthetic_state_dict(load_manifest(R50))
    src = write_mmcv_checkpoint(tmp_path / "plain.pth", plain)
    assert convert(src, tmp_path / "plain.safetensors", "--config", R50_AQR) == 0
    assert "aqr_fork_weight_generator: not in the source" in capsys.readouterr().out
    assert required_settings(tmp_path / "plain.safetensors") == {}
    result = model.load_state_dict(load_safetensors(tmp_path / "plain.safetensors")[0], strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("pts_bbox_head.aqr.") for k in result.missing_keys)


@pytest.mark.parametrize("with_metadata", [True, False])
def test_spconv1_layout_converts_to_the_same_result(lidar_source, tmp_path, with_metadata):
    src, official = lidar_source
    manifest = load_manifest(LIDAR)
    legacy = collections.OrderedDict(official)
    legacy._metadata = collections.OrderedDict(official._metadata)
    for entry in manifest.entries:
        if entry.kind == "sparse_conv":
            legacy[entry.key] = official[entry.key].permute(1, 2, 3, 4, 0).contiguous()  # [kD,kH,kW,in,out]
            assert tuple(legacy[entry.key].shape) == spconv1_shape(entry.shape)
            legacy._metadata[entry.key.rsplit(".", 1)[0]] = {"version": 1}
    if not with_metadata:
        del legacy._metadata
    legacy_src = write_mmcv_checkpoint(tmp_path / "spconv1.pth", legacy)
    assert convert(src, tmp_path / "native.safetensors", "--config", LIDAR) == 0
    assert convert(legacy_src, tmp_path / "legacy.safetensors", "--config", LIDAR) == 0
    native, _ = load_safetensors(tmp_path / "native.safetensors")
    converted, _ = load_safetensors(tmp_path / "legacy.safetensors")
    assert native.keys() == converted.keys()
    assert all(torch.equal(native[k], converted[k]) for k in native)


# --------------------------------------------------------------------------------------------------
# Refusals: nothing is written, an existing destination stays as it was
# --------------------------------------------------------------------------------------------------
def _damage(kind: str, good: bytes) -> bytes:
    half = len(good) // 2
    if kind == "corrupted":  # zeroed bytes inside tensor data: only the zip CRC-32 reveals it
        return good[:half] + bytes(4096) + good[half + 4096:]
    return good[:half]       # truncated


@pytest.mark.parametrize("case", ["corrupted", "truncated", "wrong_model", "corrupted_safetensors"])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_source_writes_nothing(lidar_source, r50_source, tmp_path, capsys, case, existing):
    config = LIDAR
    if case == "wrong_model":
        src, config = r50_source[0], VOV
        expected = f"try --config {R50}"
    elif case == "corrupted_safetensors":
        good = tmp_path / "good.safetensors"
        assert convert(lidar_source[0], good, "--config", LIDAR) == 0
        src = tmp_path / "bad.safetensors"
        src.write_bytes(b"\x00" * 16 + good.read_bytes()[16:])
        expected = "not a readable safetensors file"
    else:
        src = tmp_path / f"{case}.pth"
        src.write_bytes(_damage(case, lidar_source[0].read_bytes()))
        expected = "corrupt"
    dst = tmp_path / "out.safetensors"
    if existing:
        dst.write_bytes(b"previous contents")
    before = list_dir(tmp_path)
    capsys.readouterr()
    assert convert(src, dst, "--config", config, "--overwrite") == 2
    assert expected in capsys.readouterr().err
    assert list_dir(tmp_path) == before  # no destination, no temporary file left behind
    if existing:
        assert dst.read_bytes() == b"previous contents"


def test_missing_unexpected_and_wrong_shape_keys_are_listed(lidar_source, tmp_path, capsys):
    _, official = lidar_source
    state = collections.OrderedDict(official)
    state._metadata = official._metadata
    del state["pts_neck.deblocks.0.1.running_var"], state["pts_backbone.blocks.1.4.bias"]
    state["pts_bbox_head.extra_scale"] = torch.ones(1)
    src, dst = write_mmcv_checkpoint(tmp_path / "edited.pth", state), tmp_path / "out.safetensors"
    assert convert(src, dst, "--config", LIDAR) == 2
    err = capsys.readouterr().err
    for line in ("2 missing key(s)", "  pts_neck.deblocks.0.1.running_var", "  pts_backbone.blocks.1.4.bias",
                 "1 unexpected key(s)", "  pts_bbox_head.extra_scale"):
        assert line in err
    assert not dst.exists()

    assert convert(src, dst, "--config", LIDAR, "--allow-missing", "pts_neck.*.running_var",
                   "--allow-missing", "pts_backbone.blocks.1.4.*", "--allow-unexpected", "*.extra_scale") == 0
    tensors, _ = load_safetensors(dst)
    assert len(tensors) == len(official) - 2 and "pts_bbox_head.extra_scale" not in tensors

    state["pts_bbox_head.extra_scale"] = torch.ones(1)
    state["pts_backbone.blocks.1.4.bias"] = torch.ones(255)
    state["pts_neck.deblocks.0.1.running_var"] = torch.ones(256, dtype=torch.float64)
    write_mmcv_checkpoint(src, state)
    assert convert(src, dst, "--config", LIDAR, "--overwrite", "--allow-unexpected", "*.extra_scale") == 2
    err = capsys.readouterr().err
    assert "pts_backbone.blocks.1.4.bias: [255], expected [256]" in err
    assert "pts_neck.deblocks.0.1.running_var: torch.float64, expected torch.float32" in err


def test_half_precision_and_missing_bn_counters_are_normalised(lidar_source, tmp_path, capsys):
    _, official = lidar_source
    state = collections.OrderedDict((k, v.half() if v.is_floating_point() else v)
                                    for k, v in official.items() if not k.endswith("num_batches_tracked"))
    src, dst = write_mmcv_checkpoint(tmp_path / "half.pth", state), tmp_path / "out.safetensors"
    assert convert(src, dst, "--config", LIDAR) == 0
    out = capsys.readouterr().out
    counters = [k for k in official if k.endswith("num_batches_tracked")]
    assert f"{len(counters)} num_batches_tracked buffers absent in the source, set to 0" in out
    tensors, _ = load_safetensors(dst)
    assert all(tensors[k].dtype == torch.int64 and tensors[k].item() == 0 for k in counters)
    key = "pts_backbone.blocks.0.0.weight"
    assert tensors[key].dtype == torch.float32 and torch.equal(tensors[key], official[key].half().float())


def test_unsafe_metadata_needs_the_explicit_flag(lidar_source, tmp_path, capsys):
    _, official = lidar_source
    src = write_mmcv_checkpoint(tmp_path / "old.pth", official, meta={"epoch": np.int64(20), "seed": np.float64(0)})
    dst = tmp_path / "out.safetensors"
    assert convert(src, dst, "--config", LIDAR) == 2
    assert "--unsafe-load" in capsys.readouterr().err and not dst.exists()
    assert convert(src, dst, "--config", LIDAR, "--unsafe-load") == 0
    assert json.loads(load_safetensors(dst)[1]["source_meta"])["epoch"] == 20


def test_a_checkpoint_of_another_structure_is_refused(lidar_source, tmp_path, capsys):
    """tiny was never released: its layout is derived from aqrcmt's model, and the LiDAR release does not fit it."""
    assert convert(lidar_source[0], tmp_path / "x.safetensors", "--config", "tiny") == 2
    assert "derived_from_aqrcmt" in capsys.readouterr().err
    assert convert(lidar_source[0], tmp_path / "x.safetensors", "--config", "no_such_preset") == 2
    assert "unknown config 'no_such_preset'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "aqrcmt.convert", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--reverse" in done.stdout and "--allow-missing" in done.stdout


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def test_inspect_lists_modules_keys_and_totals(lidar_source, tmp_path, capsys):
    src, official = lidar_source
    dst = tmp_path / "lidar.safetensors"
    assert convert(src, dst, "--config", LIDAR) == 0
    numel = sum(t.numel() for t in official.values())
    nbytes = sum(t.numel() * t.element_size() for t in official.values())
    outputs = {}
    for path in (src, dst):
        capsys.readouterr()
        assert cli_main(["inspect", str(path)]) == 0
        out = outputs[path.suffix] = capsys.readouterr().out
        assert f"total: {len(official)} keys in 4 modules, {numel:,} elements" in out and f"{nbytes:,} bytes" in out
        head_keys = sum(k.startswith("pts_bbox_head.") for k in official)
        assert f"pts_bbox_head: {head_keys} keys" in out
        assert "pts_middle_encoder.conv_input.0.weight" in out and "[16, 3, 3, 3, 5]" in out
    assert "state_dict _metadata: 75 modules, versions [2]" in outputs[".pth"]
    assert f"source_file: {src.name}" in outputs[".safetensors"]
    assert cli_main(["inspect", str(dst), "--summary", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "pts_middle_encoder.encoder_layers:" in out and "conv_input.0.weight" not in out


# --------------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------------
def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write_bytes(path, b"old")
    with pytest.raises(Exception):
        torch_save_atomic({"not picklable": lambda: None}, path)
    assert path.read_bytes() == b"old" and list_dir(tmp_path) == ["state.pt"]
    torch_save_atomic({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_atomic_write_with_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.pkl"
    pickle_atomic({"infos": [1, 2]}, path)

    def half_written(tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_written)
    assert list_dir(tmp_path) == ["index.pkl"] and pickle.loads(path.read_bytes()) == {"infos": [1, 2]}


def test_safetensors_roundtrip_with_tied_tensors_and_metadata(tmp_path):
    weight = torch.randn(4, 3)
    tensors = {"a.weight": weight, "b.weight": weight, "count": torch.tensor(7)}
    save_safetensors_atomic(tensors, tmp_path / "m.safetensors", {"step": "12"})
    loaded, metadata = load_safetensors(tmp_path / "m.safetensors")
    assert metadata == {"step": "12"} and torch.equal(loaded["b.weight"], weight) and loaded["count"].item() == 7
    with pytest.raises(TypeError, match="step"):
        save_safetensors_atomic(tensors, tmp_path / "n.safetensors", {"step": 12})
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_safetensors(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------------------------
# The other released configs (full-size models: slow on CPU)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", [VOV, LIDAR, CAMERA])
def test_released_config_converts_loads_and_reverses(name, tmp_path):
    from aqrcmt.models import build_model
    from aqrcmt.presets import get_preset

    official = synthetic_state_dict(load_manifest(name))
    src = write_mmcv_checkpoint(tmp_path / "official.pth", official)
    assert convert(src, tmp_path / "out.safetensors", "--config", name) == 0
    tensors, _ = load_safetensors(tmp_path / "out.safetensors")
    model = build_model(get_preset(name).model)
    model.load_state_dict(tensors, strict=True)
    assert_loaded_exactly(model, official)
    assert sum(p.numel() for p in model.parameters()) == load_manifest(name).num_parameters()
    assert convert(tmp_path / "out.safetensors", tmp_path / "back.pth", "--config", name, "--reverse") == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert list(back) == list(official) and all(torch.equal(back[k], official[k]) for k in official)
