"""LiDAR branch: voxelizer, mean VFE, SparseEncoder, SECOND, SECONDFPN.

Parity against the official code's tensors (parity bundle: voxelize.pt, lidar.pt), official parameter counts
and state_dict keys/shapes (manifests), and the edge cases the detector relies on.
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.checkpoint.manifest import load_manifest
from aqrcmt.config import LidarConfig, VoxelConfig
from aqrcmt.models.second import SECOND, SECONDFPN
from aqrcmt.models.sparse_encoder import SparseEncoder
from aqrcmt.models.voxelize import HardSimpleVFE, HardVoxelizer
from parity_bundle import fp32_state_dict, load_parity

LIDAR_MODULES = ("pts_middle_encoder", "pts_backbone", "pts_neck")


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def _worst_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp(min=1e-3)).max().item()


# ------------------------------------------------------------------------------------------------------
# Voxelization
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parity("voxelize")
def test_voxelizer_matches_official_voxel_layer():
    bundle = load_parity("voxelize")
    ctor = bundle["voxel_layer_ctor"]
    layer = HardVoxelizer(tuple(ctor["point_cloud_range"]), tuple(ctor["voxel_size"]), ctor["max_num_points"],
                          tuple(ctor["max_voxels"])).eval()
    assert layer.grid_size == (1080, 1080, 40)
    out = layer(bundle["points"])
    ref = bundle["batched"]
    # Same voxel set and, per voxel, the same first points in input order.
    key = lambda c: ((c[:, 0].long() * 64 + c[:, 1]) * 2048 + c[:, 2]) * 2048 + c[:, 3]
    ours, theirs = torch.argsort(key(out.coors)), torch.argsort(key(ref["coors"]))
    assert torch.equal(out.coors[ours], ref["coors"][theirs])
    assert torch.equal(out.num_points[ours], ref["num_points"][theirs])
    assert torch.equal(out.voxels[ours], ref["voxels"][theirs])
    # On the CPU the official layer numbers voxels by first point occurrence, and so do we.
    assert torch.equal(out.coors, ref["coors"])
    for i, sample in enumerate(bundle["per_sample"]):
        rows = out.coors[:, 0] == i
        assert torch.equal(out.coors[rows, 1:], sample["coors_zyx"])
        assert torch.equal(out.num_points[rows], sample["num_points"])

    vfe = HardSimpleVFE(5)(out.voxels, out.num_points)
    torch.testing.assert_close(vfe, bundle["vfe_out"], atol=1e-6, rtol=1e-6)


def test_voxelizer_caps_points_and_voxels_and_drops_out_of_range():
    layer = HardVoxelizer((0.0, 0.0, 0.0, 4.0, 4.0, 4.0), (1.0, 1.0, 1.0), max_points=3, max_voxels=(2, 5))
    cloud = torch.tensor([
        [0.5, 0.5, 0.5, 1.0],   # voxel A (z, y, x) = (0, 0, 0)
        [3.5, 0.5, 0.5, 2.0],   # voxel B (0, 0, 3)
        [0.6, 0.6, 0.6, 3.0],   # A
        [9.0, 0.5, 0.5, 4.0],   # x out of range: dropped
        [0.5, 2.5, 1.5, 5.0],   # voxel C (1, 2, 0): third voxel, beyond the training cap of 2
        [0.7, 0.7, 0.7, 6.0],   # A
        [0.8, 0.8, 0.8, 7.0],   # A, fourth point: beyond max_points
        [-0.1, 0.5, 0.5, 8.0],  # x < min: dropped
    ])
    layer.train()
    out = layer([cloud])
    assert out.coors.tolist() == [[0, 0, 0, 0], [0, 0, 0, 3]]
    assert out.num_points.tolist() == [3, 1]
    assert out.voxels[0, :, 3].tolist() == [1.0, 3.0, 6.0]
    assert out.voxels[1, 1:].abs().sum() == 0                       # zero padding
    layer.eval()                                                     # test cap 5: voxel C is kept
    assert layer([cloud]).coors.tolist() == [[0, 0, 0, 0], [0, 0, 0, 3], [0, 1, 2, 0]]


def test_voxelizer_handles_empty_clouds_and_rejects_bad_shapes():
    layer = HardVoxelizer((0.0, 0.0, 0.0, 4.0, 4.0, 4.0), (1.0, 1.0, 1.0), max_points=3, max_voxels=(10, 10))
    out = layer([torch.zeros(0, 5), torch.tensor([[1.5, 1.5, 1.5, 0.0, 0.0]])])
    assert out.voxels.shape == (1, 3, 5) and out.coors.tolist() == [[1, 1, 1, 1]] and out.batch_size == 2
    with pytest.raises(ValueError, match="points must have shape"):
        layer([torch.zeros(10)])


# ------------------------------------------------------------------------------------------------------
# Sparse encoder, SECOND, SECONDFPN
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parity("lidar")
def test_lidar_chain_matches_official(capsys):
    bundle = load_parity("lidar")
    enc_ctor, bb_ctor, neck_ctor = bundle["middle_encoder_ctor"], bundle["backbone_ctor"], bundle["neck_ctor"]
    encoder = SparseEncoder(enc_ctor["in_channels"], enc_ctor["sparse_shape"], output_channels=enc_ctor[
        "output_channels"], encoder_channels=enc_ctor["encoder_channels"],
        encoder_paddings=enc_ctor["encoder_paddings"]).eval()
    backbone = SECOND(bb_ctor["in_channels"], bb_ctor["out_channels"], bb_ctor["layer_nums"],
                      bb_ctor["layer_strides"]).eval()
    neck = SECONDFPN(neck_ctor["in_channels"], neck_ctor["out_channels"], neck_ctor["upsample_strides"]).eval()
    for name, module in zip(LIDAR_MODULES, (encoder, backbone, neck)):
        module.load_state_dict(fp32_state_dict(_strip(bundle["state_dicts"][name], name)), strict=True)

    inputs, expected = bundle["inputs"], bundle["outputs"]
    with torch.no_grad():
        bev = encoder(inputs["voxel_features"], inputs["coors"], inputs["batch_size"])
        stages = backbone(bev)
        fused = neck(stages)
    pairs = [("middle_encoder_out", bev, expected["middle_encoder_out"]),
             *[(f"backbone_out[{i}]", a, b) for i, (a, b) in enumerate(zip(stages, expected["backbone_out"]))],
             ("neck_out", fused, expected["neck_out"][0])]
    with capsys.disabled():
        for name, actual, reference in pairs:
            print(f"\n  lidar parity {name}: max abs {(actual - reference).abs().max().item():.2e}, "
                  f"worst rel {_worst_relative_error(actual, reference):.2e}", end="")
    for _, actual, reference in pairs:
        torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("manifest_name, voxel_size, sparse_shape", [
    ("cmt_voxel0075_vov_1600x640_cbgs", (0.075, 0.075, 0.2), (41, 1440, 1440)),
    ("cmt_voxel0100_r50_800x320_cbgs", (0.1, 0.1, 0.2), (41, 1024, 1024)),
    ("cmt_lidar_voxel0075_cbgs", (0.075, 0.075, 0.2), (41, 1440, 1440)),
])
def test_lidar_modules_match_official_manifest(manifest_name, voxel_size, sparse_shape):
    manifest = load_manifest(manifest_name)
    cfg = LidarConfig(voxel=VoxelConfig(voxel_size=voxel_size), sparse_shape=sparse_shape)
    encoder = SparseEncoder.from_config(cfg)
    modules = {"pts_middle_encoder": encoder,
               "pts_backbone": SECOND.from_config(cfg, in_channels=encoder.bev_channels),
               "pts_neck": SECONDFPN.from_config(cfg)}
    for name, module in modules.items():
        official = {e.key: e.shape for e in manifest.entries if e.key.startswith(name + ".")}
        ours = {f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
        assert ours == official, f"{name}: state_dict keys/shapes differ from the official manifest"
        assert list(ours) == list(official), f"{name}: state_dict order differs"
        assert sum(p.numel() for p in module.parameters()) == manifest.num_parameters(name + ".")


def test_sparse_encoder_is_fp32_under_autocast_and_handles_no_voxels():
    torch.manual_seed(0)
    encoder = SparseEncoder(5, (41, 32, 32)).eval()
    assert encoder.bev_shape == (4, 4) and encoder.bev_channels == 256
    coors = torch.unique(torch.stack([torch.randint(0, 2, (300,)), torch.randint(0, 41, (300,)),
                                      torch.randint(0, 32, (300,)), torch.randint(0, 32, (300,))], dim=1), dim=0)
    features = torch.randn(coors.shape[0], 5)
    with torch.no_grad():
        reference = encoder(features, coors.int(), 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = encoder(features.bfloat16(), coors.int(), 2)
    assert autocast_out.dtype == torch.float32
    torch.testing.assert_close(autocast_out, encoder(features.bfloat16().float(), coors.int(), 2))
    assert reference.shape == (2, 256, 4, 4) and reference.abs().sum() > 0

    empty = encoder(torch.zeros(0, 5), torch.zeros(0, 4, dtype=torch.int32), 3)
    assert empty.shape == (3, 256, 4, 4) and empty.abs().sum() == 0
    with pytest.raises(ValueError, match="coors must be"):
        encoder(features, coors[:, :3].int(), 2)
