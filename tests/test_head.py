"""Unit tests of the CMT head pieces: encodings, denoising, attention, task heads, losses, matching, decoding."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aqrcmt.checkpoint.manifest import load_manifest
from aqrcmt.config import HeadConfig
from aqrcmt.models.assigner import focal_match_cost, hungarian_assign
from aqrcmt.models.bbox_coder import decode_codes, decode_detections, encode_boxes, oriented_box_codes
from aqrcmt.models.camera_geometry import projection_matrices
from aqrcmt.models.cmt_head import CmtHead
from aqrcmt.models.denoising import prepare_denoising
from aqrcmt.models.losses import heading_axis_l1, sigmoid_focal_loss, weighted_l1_loss
from aqrcmt.models.position_encoding import (
    bev_grid_coords, image_ray_points, pos2embed, query_ray_points, ray_depths,
)
from aqrcmt.models.task_head import GroupLayerNorm1d, SeparateTaskHead
from aqrcmt.models.transformer import PackedAttention
from aqrcmt.presets import get_preset

PC_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
IMG_SHAPE = (128, 352)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def ring_cameras(batch: int, views: int = 6, img_shape: tuple[int, int] = IMG_SHAPE) -> torch.Tensor:
    """(B, V, 4, 4) float64 lidar2img of pinhole cameras looking outwards around the z axis."""
    h, w = img_shape
    intrinsic = torch.tensor([[w / 2, 0, w / 2, 0], [0, w / 2, h / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                             dtype=torch.float64)
    mats = []
    for v in range(views):
        yaw = 2 * math.pi * v / views
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64)
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0], dtype=torch.float64)
        down = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        lidar2cam = torch.eye(4, dtype=torch.float64)
        lidar2cam[:3, :3] = torch.stack((right, down, forward))
        lidar2cam[:3, 3] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # camera 1 m below the lidar origin
        mats.append(intrinsic @ lidar2cam)
    return torch.stack(mats).expand(batch, -1, -1, -1).clone()


def random_gt(counts: list[int], generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    boxes, labels = [], []
    for n in counts:
        centre = (torch.rand(n, 3, generator=generator) - 0.5) * torch.tensor([80.0, 80.0, 2.0])
        size = 0.5 + 4 * torch.rand(n, 3, generator=generator)
        yaw = (torch.rand(n, 1, generator=generator) - 0.5) * 6
        vel = torch.randn(n, 2, generator=generator)
        boxes.append(torch.cat((centre, size, yaw, vel), dim=1))
        labels.append(torch.randint(0, 10, (n,), generator=generator))
    return boxes, labels


def tiny_head(with_lidar: bool = True, with_camera: bool = True, **overrides) -> tuple[CmtHead, HeadConfig]:
    cfg = get_preset("tiny").model
    head_cfg = cfg.head
    for key, value in overrides.items():
        setattr(head_cfg, key, value)
    torch.manual_seed(0)
    head = CmtHead(head_cfg, pc_range=cfg.lidar.voxel.point_cloud_range, bev_size=cfg.bev_size,
                   with_lidar=with_lidar, with_camera=with_camera)
    return head, head_cfg


def tiny_inputs(head: CmtHead, batch: int = 2) -> dict:
    torch.manual_seed(1)
    h, w = head.bev_size
    inputs = {"bev_feat": None, "img_feat": None, "lidar2img": None, "img_shape": IMG_SHAPE}
    if head.with_lidar:
        inputs["bev_feat"] = torch.randn(batch, head.cfg.in_channels, h, w)
    if head.with_camera:
        inputs["img_feat"] = torch.randn(batch * 6, head.cfg.hidden_dim, IMG_SHAPE[0] // 16, IMG_SHAPE[1] // 16)
        inputs["lidar2img"] = ring_cameras(batch)
    return inputs


# ------------------------------------------------------------------------------------------------
# State-dict layout = the official manifests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest,with_lidar,with_camera,final_kernel,params", [
    ("cmt_voxel0100_r50_800x320_cbgs", True, True, 1, 8_763_396),
    ("cmt_lidar_voxel0075_cbgs", True, False, 3, 9_498_372),
    ("cmt_camera_vov_1600x640_cbgs", False, True, 1, 7_583_236),
])
def test_head_state_dict_matches_official_manifest(manifest, with_lidar, with_camera, final_kernel, params):
    head = CmtHead(HeadConfig(final_kernel=final_kernel), pc_range=PC_RANGE, bev_size=(16, 16),
                   with_lidar=with_lidar, with_camera=with_camera)
    prefix = "pts_bbox_head."
    official = [e for e in load_manifest(manifest).entries if e.key.startswith(prefix)]
    ours = head.state_dict()
    assert [e.key[len(prefix):] for e in official] == list(ours)
    for entry in official:
        assert tuple(ours[entry.key[len(prefix):]].shape) == entry.shape, entry.key
    assert sum(p.numel() for p in head.parameters()) == params
    assert sum(_numel(e.shape) for e in official if e.is_parameter) == params


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


# ------------------------------------------------------------------------------------------------
# Position encodings
# ------------------------------------------------------------------------------------------------
def test_pos2embed_frequencies_have_no_temperature():
    pos = torch.tensor([[0.3, 0.7]])
    emb = pos2embed(pos, 8)
    assert emb.shape == (1, 16)
    # order (emb_y, emb_x); channel i uses 2 pi p / (1 + 2 floor(i/2) / 8), sine on even, cosine on odd
    def channels(p: float) -> list[float]:
        return [(math.sin if i % 2 == 0 else math.cos)(2 * math.pi * p / (1 + 2 * (i // 2) / 8)) for i in range(8)]

    torch.testing.assert_close(emb[0], torch.tensor(channels(0.7) + channels(0.3)))


def test_bev_grid_coords_row_major_cell_centres():
    coords = bev_grid_coords((2, 4))
    torch.testing.assert_close(coords[0], torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(coords[1], torch.tensor([0.375, 0.25]))   # next column: +x
    torch.testing.assert_close(coords[4], torch.tensor([0.125, 0.75]))   # next row: +y


def test_image_rays_reproject_to_their_pixels():
    lidar2img = ring_cameras(1)
    l2i, i2l = projection_matrices(lidar2img)
    depths = ray_depths(4, PC_RANGE[3])
    rays = image_ray_points(i2l.flatten(0, 1), (8, 22), IMG_SHAPE, depths, PC_RANGE)
    assert rays.shape == (6, 8, 22, 12)
    low, span = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    points = rays.unflatten(-1, (4, 3)) * span + low                     # (V, h, w, D, 3) metres
    proj = torch.einsum("vhwdc,vkc->vhwdk", F.pad(points, (0, 1), value=1.0), l2i[0])
    torch.testing.assert_close(proj[..., 2], depths.expand_as(proj[..., 2]), atol=1e-3, rtol=1e-4)
    u = proj[..., 0] / proj[..., 2]
    v = proj[..., 1] / proj[..., 2]
    torch.testing.assert_close(u[0, 3, 5], torch.full((4,), 5 * IMG_SHAPE[1] / 22), atol=1e-2, rtol=0)
    torch.testing.assert_close(v[0, 3, 5], torch.full((4,), 3 * IMG_SHAPE[0] / 8), atol=1e-2, rtol=0)


def test_ray_geometry_stays_fp32_under_autocast():
    _, img2lidar = projection_matrices(ring_cameras(1, img_shape=(640, 1600)))
    depths = ray_depths(64, PC_RANGE[3])
    exact = image_ray_points(img2lidar[0], (40, 100), (640, 1600), depths, PC_RANGE)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = image_ray_points(img2lidar[0], (40, 100), (640, 1600), depths, PC_RANGE)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact)


def test_query_rays_visibility_and_reprojection():
    lidar2img = ring_cameras(1)
    l2i, i2l = projection_matrices(lidar2img)
    depths = ray_depths(4, PC_RANGE[3])
    # 20 m ahead of camera 0 (+x), then the same point behind it (-x): seen by camera 0 / camera 3 only
    metres = torch.tensor([[[20.0, 0.0, 0.0], [-20.0, 0.0, 0.0]]])
    low, span = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    rays, visible = query_ray_points((metres - low) / span, l2i, i2l, IMG_SHAPE, depths, PC_RANGE)
    assert rays.shape == (1, 2, 6, 12)                                    # (B, Nq, V, D * 3): query-major
    assert visible[0, 0].tolist() == [True, False, False, False, False, False]
    assert visible[0, 1].tolist() == [False, False, False, True, False, False]
    # every lifted point lies on camera 0's ray through the query: same pixel, depth d
    points = rays[0, 0, 0].unflatten(-1, (4, 3)) * span + low
    proj = F.pad(points, (0, 1), value=1.0) @ l2i[0, 0].T
    torch.testing.assert_close(proj[:, 2], depths, atol=1e-3, rtol=1e-4)
    query_proj = torch.tensor([20.0, 0.0, 0.0, 1.0]) @ l2i[0, 0].T
    torch.testing.assert_close(proj[:, 0] / proj[:, 2], (query_proj[0] / query_proj[2]).expand(4), atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------------------
# Denoising
# ------------------------------------------------------------------------------------------------
def test_denoising_layout_and_mask():
    cfg = HeadConfig(num_query=20, dn_scalar=3)
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_gt([2, 3], gen)
    dn = prepare_denoising(boxes, labels, cfg=cfg, pc_range=PC_RANGE)
    assert (dn.groups, dn.slots_per_group, dn.pad_size) == (3, 3, 9)
    # group g, sample b occupies slots [3 g, 3 g + n_b)
    assert dn.slot_index.tolist() == [0, 1, 0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6, 7, 8]
    assert dn.batch_index.tolist() == [0, 0, 1, 1, 1] * 3
    assert dn.reference.shape == (2, 9, 3)
    assert torch.all(dn.reference[0, 2] == 0)                         # unused slot of sample 0
    allowed = dn.attn_mask
    assert allowed.shape == (29, 29)
    assert not allowed[9:, :9].any() and allowed[9:, 9:].all()        # learned queries never see DN queries
    assert allowed[:9, 9:].all()                                      # DN queries see every learned query
    group = torch.arange(9) // 3
    torch.testing.assert_close(allowed[:9, :9], group[:, None] == group[None, :])


def test_denoising_noise_override_and_label_flip():
    cfg = HeadConfig(num_query=20, dn_scalar=1)
    boxes = [torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, 0.0, 0.0, 0.0]] * 2)]
    labels = [torch.tensor([3, 4])]
    noise = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.5]])          # signed (0,0,0) and (1,1,0)
    dn = prepare_denoising(boxes, labels, cfg=cfg, pc_range=PC_RANGE, noise=noise)
    assert dn.labels.tolist() == [3, cfg.num_classes]                  # norm sqrt(2) > 0.75 -> "no object"
    torch.testing.assert_close(dn.boxes, boxes[0])                     # targets stay the clean GT, flipped too
    moved = torch.tensor([2.0, 1.0, 0.0])                               # half the box size per axis
    low, span = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:]) - torch.tensor(PC_RANGE[:3])
    torch.testing.assert_close(dn.reference[0, 1], (moved - low) / span)
    with pytest.raises(ValueError, match="noise must have shape"):
        prepare_denoising(boxes, labels, cfg=cfg, pc_range=PC_RANGE, noise=torch.rand(3, 3))


def test_denoising_bucket_fixes_shapes_and_empty_batch_gives_none():
    cfg = HeadConfig(num_query=100, dn_max_gt=16)
    gen = torch.Generator().manual_seed(0)
    shapes = set()
    for counts in ([3, 0], [7, 16], [1, 1]):
        dn = prepare_denoising(*random_gt(counts, gen), cfg=cfg, pc_range=PC_RANGE)
        shapes.add((dn.pad_size, tuple(dn.attn_mask.shape)))
    assert shapes == {(96, (196, 196))}                                 # 16 slots x min(10, 100 // 16) groups
    assert prepare_denoising(*random_gt([0, 0], gen), cfg=cfg, pc_range=PC_RANGE) is None


# ------------------------------------------------------------------------------------------------
# Attention and task heads
# ------------------------------------------------------------------------------------------------
def test_packed_attention_equals_torch_mha_with_inverted_mask():
    torch.manual_seed(0)
    ours = PackedAttention(16, 4, attn_dropout=0.0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    v = torch.randn(2, 7, 16)
    allowed = torch.rand(5, 7) > 0.3
    allowed[:, 0] = True
    torch.testing.assert_close(ours(q, k, v, allowed), ref(q, k, v, attn_mask=~allowed, need_weights=False)[0])


def test_group_layer_norm_and_task_head_are_per_layer_mlps():
    torch.manual_seed(0)
    norm = GroupLayerNorm1d(12, groups=3)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 12, 5)
    expected = F.layer_norm(x.unflatten(1, (3, 4)).transpose(2, 3), (4,), eps=1e-6).transpose(2, 3).flatten(1, 2)
    torch.testing.assert_close(norm(x), expected * norm.weight[:, None] + norm.bias[:, None])

    head = SeparateTaskHead(8, {"center": 2, "cls_logits": 3}, groups=3, head_conv=4, final_kernel=1)
    feats = torch.randn(3, 2, 5, 8)                                    # (L, B, Q, C)
    out = head(feats)
    assert out["center"].shape == (3, 2, 5, 2) and out["cls_logits"].shape == (3, 2, 5, 3)
    branch = head.center
    for n in range(3):                                                 # group n = an MLP on decoder layer n
        w1 = branch[0].weight[4 * n:4 * n + 4, :, 0]
        hidden = F.layer_norm(feats[n] @ w1.T, (4,), branch[1].weight[4 * n:4 * n + 4],
                              branch[1].bias[4 * n:4 * n + 4], eps=1e-6).relu()
        expected = hidden @ branch[3].weight[2 * n:2 * n + 2, :, 0].T + branch[3].bias[2 * n:2 * n + 2]
        torch.testing.assert_close(out["center"][n], expected)


# ------------------------------------------------------------------------------------------------
# Losses, matching, box coding
# ------------------------------------------------------------------------------------------------
def test_focal_and_l1_losses():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    labels = torch.tensor([1, 2])                                      # 2 = "no object"
    loss = sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0)
    p = logits.sigmoid()
    expected = torch.stack([
        torch.stack([-0.75 * p[0, 0] ** 2 * torch.log(1 - p[0, 0]), -0.25 * (1 - p[0, 1]) ** 2 * torch.log(p[0, 1])]),
        -0.75 * p[1] ** 2 * torch.log(1 - p[1]),
    ])
    torch.testing.assert_close(loss, expected)
    pred = torch.tensor([[1.0, float("inf")]])
    l1 = weighted_l1_loss(pred, torch.tensor([[3.0, 0.0]]), torch.tensor([[0.5, 0.0]]))
    assert l1.tolist() == [[1.0, 0.0]]                                   # zero weight masks a non-finite entry


def test_heading_axis_term_is_blind_to_front_and_back():
    target = torch.tensor([[0.6, 0.8]])                                 # (sin, cos) of one yaw
    ones = torch.ones(1)
    assert heading_axis_l1(target, target, ones).item() == 0.0
    assert heading_axis_l1(-target, target, ones).item() == 0.0            # the box turned by 180 degrees
    torch.testing.assert_close(heading_axis_l1(0.5 * target, target, ones), torch.tensor([0.7]))
    across = torch.tensor([[0.8, -0.6]])                                # the axis at 90 degrees
    assert heading_axis_l1(across, target, 2 * ones).item() == pytest.approx(2 * 1.6)
    assert heading_axis_l1(torch.tensor([[float("nan"), 0.0]]), target, torch.zeros(1)).item() == 0.0

    # Why the term exists: with front and back equally likely, the expected plain L1 is the same at 0 and
    # anywhere between -t and t, so it gives no pull towards the axis; the axis term does.
    def plain(pred):
        return sum(weighted_l1_loss(pred, t, torch.ones(2)).sum() for t in (target, -target)) / 2
    assert plain(torch.zeros(1, 2)) == plain(0.5 * target)
    assert heading_axis_l1(0.5 * target, target, ones) < heading_axis_l1(torch.zeros(1, 2), target, ones)


def test_heading_axis_weight_adds_to_the_box_losses_only():
    head, cfg = tiny_head()
    head.train()
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_gt([4, 3], gen)
    out = head(**tiny_inputs(head), dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
    by_weight = {}
    for weight in (0.0, 1.0, 2.0):
        head.cfg.heading_axis_weight = weight
        by_weight[weight] = {k: v.detach() for k, v in head.loss(out, boxes, labels).items()}
    for name in by_weight[0.0]:
        added = by_weight[1.0][name] - by_weight[0.0][name]
        if "bbox" in name:
            assert added > 0, name
            torch.testing.assert_close(by_weight[2.0][name] - by_weight[0.0][name], 2 * added)
        else:
            assert added == 0, name


def test_bev_heading_term_reads_the_yaw_over_the_boxes():
    head, cfg = tiny_head(bev_heading_weight=2.0)
    head.train()
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_gt([4, 3], gen)
    out = head(**tiny_inputs(head), dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
    assert out["bev_heading"].shape == (2, 2, *head.bev_size)
    losses = head.loss(out, boxes, labels)
    assert losses["loss_bev_heading"] > 0 and not any(k.startswith("d0.loss_bev") for k in losses)
    grads = torch.autograd.grad(losses["loss_bev_heading"], [*head.bev_heading.parameters(), out["bev_heading"]])
    assert all(g.abs().sum() > 0 for g in grads)

    # one box per sample, a map that holds its (sin, cos) everywhere: no loss; turned by 180 degrees: 2 x L1
    yaw = torch.tensor([0.7, -2.0])
    one = [torch.tensor([[10.0 * b, -5.0, 0.0, 4.0, 2.0, 1.5, float(yaw[b]), 0.0, 0.0]]) for b in range(2)]
    truth = torch.stack((torch.sin(yaw), torch.cos(yaw)), dim=1)[:, :, None, None].expand(2, 2, *head.bev_size)
    assert head._bev_heading_loss(truth, one, [False, False]).item() == pytest.approx(0.0, abs=1e-6)
    expected = 2.0 * (2 * truth[:, :, 0, 0].abs().sum(1)).mean()
    torch.testing.assert_close(head._bev_heading_loss(-truth, one, [False, False]), expected)
    # a sample whose LiDAR was dropped, and a box outside the BEV range, do not count
    torch.testing.assert_close(head._bev_heading_loss(-truth, one, [True, False]),
                               2.0 * 2 * truth[1, :, 0, 0].abs().sum())
    outside = [one[0], one[1] + torch.tensor([100.0, 0, 0, 0, 0, 0, 0, 0, 0])]
    torch.testing.assert_close(head._bev_heading_loss(-truth, outside, [False, False]),
                               2.0 * 2 * truth[0, :, 0, 0].abs().sum())
    plain = tiny_head(bev_heading_weight=0.0)[0]                        # as in the releases: no branch
    assert plain.bev_heading is None and "bev_heading" not in plain(**tiny_inputs(plain))


def test_decoding_turns_the_boxes_whose_heading_points_against_the_bev_heading_map():
    head, cfg = tiny_head(bev_heading_weight=1.0)
    head.eval()
    out = head(**tiny_inputs(head))
    assert out["heading_flip"].shape == (cfg.num_layers, 2, cfg.num_query, 1)

    # a map pointing along +x in the left half (x < 0) and along -x in the right half; queries regress +x
    h, w = head.bev_size
    heading_map = torch.zeros(2, 2, h, w)
    heading_map[:, 1, :, :w // 2], heading_map[:, 1, :, w // 2:] = 1.0, -1.0
    preds = {"center": torch.tensor([-20.0, 0.0, 20.0, 5.0]).view(1, 1, 2, 2).expand(1, 2, 2, 2),
             "rot": torch.tensor([0.0, 1.0]).expand(1, 2, 2, 2)}
    flip = head._against_bev_heading(preds, heading_map)
    assert flip[..., 0].tolist() == [[[-1.0, 1.0], [-1.0, 1.0]]]
    codes = encode_boxes(torch.tensor([[-20.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0],
                                       [20.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]])).unsqueeze(0)
    outputs = {"center": codes[..., :2], "height": codes[..., 2:3], "dim": codes[..., 3:6], "rot": codes[..., 6:8],
               "vel": codes[..., 8:], "heading_flip": flip[:, 0]}
    yaw = decode_codes(oriented_box_codes(outputs))[0, :, 6]
    torch.testing.assert_close(torch.cos(yaw), torch.tensor([1.0, -1.0]))  # the right-hand box turned to face -x


def test_hungarian_assign_is_optimal():
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 6, 3, generator=gen)
    for matrix, (rows, cols) in zip(cost, hungarian_assign(cost)):
        best = min(sum(matrix[q, g] for g, q in enumerate(perm)) for perm in itertools.permutations(range(6), 3))
        torch.testing.assert_close(matrix[rows, cols].sum(), torch.as_tensor(best))
        assert len(set(rows.tolist())) == 3


def test_focal_match_cost_prefers_confident_queries():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = focal_match_cost(logits, torch.tensor([0, 1]), alpha=0.25, gamma=2.0)
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]


def test_box_codes_roundtrip_and_decode_filters():
    gen = torch.Generator().manual_seed(0)
    boxes, _ = random_gt([5], gen)
    torch.testing.assert_close(decode_codes(encode_boxes(boxes[0])), boxes[0])
    codes = encode_boxes(boxes[0]).unsqueeze(0).clone()
    codes[0, 0, 0] = 80.0                                               # outside post_center_range
    logits = torch.full((1, 5, 3), -5.0)
    logits[0, :, 1] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    det = decode_detections(logits, codes, max_num=4, post_center_range=(-61.2, -61.2, -10, 61.2, 61.2, 10))[0]
    assert det.labels.tolist() == [1, 1, 1]                             # top-4, minus the out-of-range one
    torch.testing.assert_close(det.boxes, boxes[0][1:4])
    assert torch.all(det.scores[:-1] >= det.scores[1:])


# ------------------------------------------------------------------------------------------------
# The head end to end (tiny config)
# ------------------------------------------------------------------------------------------------
def test_tiny_head_train_step_shapes_losses_and_gradients():
    head, cfg = tiny_head()
    head.train()
    inputs = tiny_inputs(head)
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_gt([4, 0], gen)                              # one sample without GT
    out = head(**inputs, dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
    pad = out["dn"].pad_size
    assert pad == 16 * min(10, cfg.num_query // 16)
    assert out["center"].shape == (cfg.num_layers, 2, cfg.num_query, 2)
    assert out["cls_logits"].shape == (cfg.num_layers, 2, cfg.num_query, cfg.num_classes)
    assert out["dn_cls_logits"].shape == (cfg.num_layers, 2, pad, cfg.num_classes)
    losses = head.loss(out, boxes, labels)
    assert set(losses) == {"loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox", "dn_loss_cls", "dn_loss_bbox",
                           "d0.dn_loss_cls", "d0.dn_loss_bbox", "loss_bev_heading"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("reference_points.weight", "shared_conv.conv.weight", "rv_embedding.0.weight",
                 "transformer.decoder.layers.0.attentions.1.attn.in_proj_weight", "task_heads.0.cls_logits.3.bias"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_matching_queries_do_not_see_denoising_queries():
    head, _ = tiny_head()
    head.eval()
    head.training = True                                                # DN on, BN in eval mode, dropout is 0
    inputs = tiny_inputs(head)
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_gt([3, 2], gen)
    copies = 5 * min(10, head.cfg.num_query // head.cfg.dn_max_gt)      # GT count x groups
    with torch.no_grad():
        a = head(**inputs, dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range,
                                                noise=torch.zeros(copies, 3)))
        b = head(**inputs, dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range,
                                                noise=torch.full((copies, 3), 0.9)))
        plain = head.eval()(**inputs)
    torch.testing.assert_close(a["cls_logits"], b["cls_logits"])
    torch.testing.assert_close(a["center"], plain["center"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a["dn_center"], b["dn_center"])


def test_batch_without_any_gt_trains_without_denoising():
    head, _ = tiny_head()
    head.train()
    inputs = tiny_inputs(head)
    empty = ([torch.zeros(0, 9), torch.zeros(0, 9)], [torch.zeros(0, dtype=torch.long)] * 2)
    dn = prepare_denoising(*empty, cfg=head.cfg, pc_range=head.pc_range)
    assert dn is None
    out = head(**inputs, dn=dn)
    assert out["dn"] is None and "dn_center" not in out
    losses = head.loss(out, *empty)
    assert losses["loss_bbox"].item() == 0.0 and losses["dn_loss_cls"].item() == 0.0
    assert losses["loss_cls"].item() > 0
    sum(losses.values()).backward()


@pytest.mark.parametrize("with_lidar,with_camera", [(True, False), (False, True)])
def test_single_modality_heads_decode(with_lidar, with_camera):
    head, cfg = tiny_head(with_lidar, with_camera, final_kernel=3 if not with_camera else 1)
    head.eval()
    with torch.no_grad():
        out = head(**tiny_inputs(head))
    dets = head.decode(out)
    assert len(dets) == 2
    for det in dets:
        assert det.boxes.shape[1] == 9 and det.boxes.shape[0] == det.scores.shape[0] <= cfg.max_num
        assert torch.all(det.scores[:-1] >= det.scores[1:])


def test_head_rejects_bad_inputs():
    head, _ = tiny_head()
    inputs = tiny_inputs(head)
    with pytest.raises(ValueError, match="bev_feat"):
        head(**{**inputs, "bev_feat": inputs["bev_feat"][:, :7]})
    with pytest.raises(ValueError, match="img_feat"):
        head(**{**inputs, "img_feat": inputs["img_feat"][:6]})


def test_aqr_hook_receives_the_documented_tensors():
    head, cfg = tiny_head()
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x, x_img, **kwargs):
            seen.update(kwargs, x=x, x_img=x_img)
            return x * 0.5, x_img, None                # modulated BEV and camera features, no routing

    head.aqr = Recorder()
    head.train()
    inputs = tiny_inputs(head)
    boxes, labels = random_gt([2, 1], torch.Generator().manual_seed(0))
    head(**inputs, dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
    pad = seen["num_dn"]
    nq = pad + cfg.num_query
    h, w = head.bev_size
    assert seen["x"].shape == (2, cfg.hidden_dim, h, w)
    assert seen["query_pos"].shape == (2, nq, cfg.hidden_dim)
    assert seen["reference_points"].shape == (2, nq, 3)
    assert seen["bev_pos"].shape == (h * w, cfg.hidden_dim)
    assert seen["rv_pos"].shape == (12, 8, 22, cfg.hidden_dim)
    assert seen["img_shape"] == IMG_SHAPE and seen["lidar2img"].dtype == torch.float64


def test_loss_is_fp32_under_autocast():
    head, _ = tiny_head()
    head.train()
    boxes, labels = random_gt([3, 2], torch.Generator().manual_seed(0))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = head(**tiny_inputs(head), dn=prepare_denoising(boxes, labels, cfg=head.cfg, pc_range=head.pc_range))
        losses = head.loss(out, boxes, labels)
    assert out["cls_logits"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
