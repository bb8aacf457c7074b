"""Parity of CmtHead with the official CMT code (reference tensors in the parity bundle's head.pt).

The bundle's head is the r50 fusion head with a 16 x 16 BEV grid and 128 x 320 images (features 8 x 20),
random weights (tests/parity_bundle.py). Worst errors of each group are printed (`pytest -s`).
"""
from __future__ import annotations

import pytest
import torch

from aqrcmt.config import HeadConfig
from aqrcmt.models.bbox_coder import select_topk
from aqrcmt.models.camera_geometry import projection_matrices
from aqrcmt.models.cmt_head import CmtHead
from aqrcmt.models.denoising import prepare_denoising
from parity_bundle import fp32_state_dict, load_parity

pytestmark = pytest.mark.parity("head")

PREFIX = "pts_bbox_head."


def _report(group: str, errors: dict[str, float]) -> None:
    worst = max(errors, key=errors.get)
    print(f"\n[head parity] {group}: worst {worst} = {errors[worst]:.3e}")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude (element-wise ratios blow up near 0)."""
    return _max_abs(a, b) / max(b.abs().max().item(), 1e-12)


@pytest.fixture(scope="module")
def bundle():
    return load_parity("head")


@pytest.fixture(scope="module")
def head(bundle):
    hp = bundle["hparams"]
    cfg = HeadConfig(hidden_dim=hp["hidden_dim"], num_query=hp["num_query"], depth_num=hp["depth_num"],
                     dn_scalar=hp["scalar"], dn_noise_scale=hp["noise_scale"], dn_noise_trans=hp["noise_trans"],
                     dn_split=hp["split"], code_weights=tuple(hp["code_weights"]), max_num=hp["max_num"],
                     post_center_range=tuple(hp["post_center_range"]))
    size = bundle["grid_size_override"][0] // hp["downsample_scale"]
    model = CmtHead(cfg, pc_range=tuple(hp["pc_range"]), bev_size=(size, size), with_lidar=True, with_camera=True)
    state = {k[len(PREFIX):]: v for k, v in fp32_state_dict(bundle["state_dict"]).items() if k.startswith(PREFIX)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _img_shape(bundle) -> tuple[int, int]:
    return tuple(bundle["inputs"]["pad_shape"][0][0][:2])


@pytest.fixture(scope="module")
def eval_run(bundle, head):
    """Eval forward with hooks capturing shared_conv and decoder outputs."""
    captured = {}
    hooks = [head.shared_conv.register_forward_hook(lambda m, i, o: captured.__setitem__("shared_conv_out", o)),
             head.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("outs_dec_last", o[-1]))]
    inputs = bundle["inputs"]
    with torch.no_grad():
        outputs = head(inputs["pts_feat"], inputs["img_feat"], inputs["lidar2img"], _img_shape(bundle))
    for hook in hooks:
        hook.remove()
    return outputs, captured


def test_eval_outputs_match(bundle, eval_run):
    outputs, _ = eval_run
    reference = bundle["outputs"][0]
    errors = {}
    for key, expected in reference.items():
        atol = 1e-3 if key == "center" else 1e-4
        torch.testing.assert_close(outputs[key], expected, atol=atol, rtol=1e-4, msg=key)
        errors[key] = _relative(outputs[key], expected)
    _report("eval outputs (relative)", errors)


def test_intermediates_match(bundle, head, eval_run):
    _, captured = eval_run
    expected = bundle["intermediates"]
    inputs = bundle["inputs"]
    with torch.no_grad():
        lidar2img, img2lidar = projection_matrices(inputs["lidar2img"])
        reference = head.reference_points.weight.unsqueeze(0).expand(inputs["pts_feat"].shape[0], -1, -1)
        bev_query, rv_query = head.query_embedding(reference, lidar2img, img2lidar, _img_shape(bundle))
        ours = {
            "shared_conv_out": captured["shared_conv_out"],
            "bev_pos_embeds": head.bev_position_embedding(),
            "rv_pos_embeds": head.image_position_embedding(inputs["img_feat"].shape[-2:], img2lidar,
                                                           _img_shape(bundle)),
            "bev_query_embeds": bev_query,
            "rv_query_embeds": rv_query,
            "outs_dec_last": captured["outs_dec_last"],
        }
    torch.testing.assert_close(head.bev_coords, bundle["coords_bev"])
    errors = {}
    for key, value in ours.items():
        torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=1e-4, msg=key)
        errors[key] = _relative(value, expected[key])
    _report("intermediates (relative)", errors)


def test_decoded_boxes_match_as_sets(bundle, head, eval_run):
    outputs, _ = eval_run
    detections = head.decode(outputs)
    score_err, box_err = 0.0, 0.0
    for b, official in enumerate(bundle["get_bboxes"]):
        scores, labels, query = select_topk(outputs["cls_logits"][-1][b], head.cfg.max_num)
        ours = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(query, labels))}
        theirs = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(official["query_index"], official["labels"]))}
        assert set(ours) == set(theirs)
        det = detections[b]
        assert det.boxes.shape[0] == official["bboxes"].shape[0] == len(ours)   # nothing filtered in this bundle
        rows = torch.tensor([ours[k] for k in theirs])
        official_rows = torch.tensor(list(theirs.values()))
        boxes = det.boxes[rows].clone()
        boxes[:, 2] -= boxes[:, 5] / 2                                   # official get_bboxes: bottom centre
        torch.testing.assert_close(det.scores[rows], official["scores"][official_rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(det.labels[rows], official["labels"][official_rows])
        torch.testing.assert_close(boxes, official["bboxes"][official_rows], atol=1e-3, rtol=1e-4)
        score_err = max(score_err, _relative(det.scores[rows], official["scores"][official_rows]))
        box_err = max(box_err, _relative(boxes, official["bboxes"][official_rows]))
    _report("decoded boxes (relative)", {"scores": score_err, "boxes": box_err})


@pytest.fixture(scope="module")
def train_run(bundle, head):
    """Denoising forward (head.training only; sub-modules stay in eval) with the saved noise, then the loss."""
    train = bundle["train"]
    gt_boxes = []
    for boxes in train["gt_bboxes_3d"]:                                 # bundle GT: bottom centre -> gravity centre
        boxes = boxes.clone()
        boxes[:, 2] += boxes[:, 5] / 2
        gt_boxes.append(boxes)
    head.training = True
    try:
        with torch.no_grad():
            dn = prepare_denoising(gt_boxes, train["gt_labels_3d"], cfg=head.cfg, pc_range=head.pc_range,
                                   noise=train["dn"]["rand_prob"])
            outputs = head(*(bundle["inputs"][k] for k in ("pts_feat", "img_feat", "lidar2img")), _img_shape(bundle),
                           dn=dn)
            losses = head.loss(outputs, gt_boxes, train["gt_labels_3d"])
    finally:
        head.training = False
    return outputs, losses


def test_denoising_preparation_matches(bundle, head, train_run):
    outputs, _ = train_run
    dn, expected = outputs["dn"], bundle["train"]["dn"]
    assert dn.pad_size == expected["pad_size"]
    learned = head.reference_points.weight.unsqueeze(0).expand(dn.reference.shape[0], -1, -1)
    padded = torch.cat((dn.reference, learned), dim=1)
    torch.testing.assert_close(padded, expected["padded_reference_points"], atol=1e-6, rtol=0)
    assert torch.equal(~dn.attn_mask, expected["attn_mask"])           # official: True = blocked
    assert torch.equal(dn.labels, expected["known_labels_global"])
    # copies are group-major: copy i is GT i mod N, as the official known_labels_raw
    assert torch.equal(torch.cat(bundle["train"]["gt_labels_3d"]).repeat(dn.groups),
                       expected["known_labels_raw_global"])
    assert torch.equal(dn.batch_index, expected["batch_idx"][expected["known_indice"]])
    assert torch.equal(dn.slot_index, expected["map_known_indice"])
    torch.testing.assert_close(dn.boxes, expected["known_bboxs"])
    _report("denoising preparation (relative)",
            {"padded_reference_points": _relative(padded, expected["padded_reference_points"])})


def test_train_outputs_and_losses_match(bundle, train_run):
    outputs, losses = train_run
    reference = bundle["train"]["outputs"][0]
    errors = {}
    for key, expected in reference.items():
        if key == "dn_mask_dict":
            continue
        atol = 1e-3 if key.endswith("center") else 1e-4
        torch.testing.assert_close(outputs[key], expected, atol=atol, rtol=1e-4, msg=key)
        errors[key] = _relative(outputs[key], expected)
    _report("train outputs (relative)", errors)

    expected_losses = bundle["train"]["losses"]
    assert set(losses) == set(expected_losses)
    rel = {}
    for name, expected in expected_losses.items():
        torch.testing.assert_close(losses[name], expected, rtol=1e-4, atol=0, msg=name)
        rel[name] = ((losses[name] - expected).abs() / expected.abs()).item()
    _report("loss dict (relative)", rel)
