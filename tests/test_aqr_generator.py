"""AQR weight generator: window gathering, equality with a dense masked attention, initialisation, names."""
import pytest
import torch
import torch.nn.functional as F

from aqrcmt.config import AQRGeneratorConfig
from aqrcmt.models.aqr.generator import (AQRWeightGenerator, LocalCrossAttention, gather_window_indices,
                                         window_offsets)
from aqrcmt.models.aqr.projection import Projection

C, BEV, CAM, V = 16, (6, 7), (4, 9), 3


def test_window_offsets_row_major():
    off = window_offsets(3)
    assert off.tolist()[:4] == [[-1, -1], [-1, 0], [-1, 1], [0, -1]] and off.shape == (9, 2)
    with pytest.raises(ValueError, match="odd"):
        window_offsets(4)


def test_windows_are_cropped_not_wrapped():
    center = torch.tensor([[[0, 0], [2, 6], [5, 3]]])                   # corner, right edge, bottom edge
    view = torch.tensor([[0, 1, 2]])
    index, keep = gather_window_indices(center, view, torch.tensor([[True, True, False]]), BEV, 3)
    assert keep[0].sum(-1).tolist() == [4, 6, 0]                          # third query: masked entirely
    h, w = BEV
    kept = index[0, 1][keep[0, 1]]
    ys, xs = (kept - h * w) // w, (kept - h * w) % w
    assert torch.all(ys.sub(2).abs() <= 1) and torch.all(xs >= 5)       # never column 0 of the next row
    assert torch.all(index[0, 1] // (h * w) == 1)                         # stays in view 1


def _inputs(batch=2, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bev_x = torch.randn(batch, C, *BEV, generator=g)
    cam_x = torch.randn(batch * V, C, *CAM, generator=g)
    bev_pos = torch.randn(BEV[0] * BEV[1], C, generator=g)
    cam_pos = torch.randn(batch * V, *CAM, C, generator=g)
    query_pos = torch.randn(batch, queries, C, generator=g)
    bev = Projection(torch.rand(batch, queries, 1, 2, generator=g) * torch.tensor(BEV),
                     torch.ones(batch, queries, 1, dtype=torch.bool), BEV)
    cam_valid = torch.rand(batch, queries, V, generator=g) > 0.5
    cam_valid[0, 0] = False                                               # a query no camera sees
    cameras = Projection(torch.rand(batch, queries, V, 2, generator=g) * torch.tensor(CAM), cam_valid, CAM)
    return query_pos, bev_x, bev_pos, cam_x, cam_pos, bev, cameras


def _dense_reference(gen: AQRWeightGenerator, query_pos, bev_x, bev_pos, cam_x, cam_pos, bev, cameras):
    """The same layer with a (Q x all tokens) boolean mask built from the geometry (the fork's formulation)."""
    b, q, _ = query_pos.shape
    rb, rc = gen.cfg.bev_window // 2, gen.cfg.camera_window // 2
    yy, xx = torch.meshgrid(torch.arange(BEV[0]), torch.arange(BEV[1]), indexing="ij")
    cy, cx = bev.coords[:, :, 0, 0].floor()[..., None, None], bev.coords[:, :, 0, 1].floor()[..., None, None]
    bev_allowed = ((yy - cy).abs() <= rb) & ((xx - cx).abs() <= rb)                    # (B, Q, H, W)
    view, seen = cameras.first_valid_view()
    vv, cyy, cxx = torch.meshgrid(torch.arange(V), torch.arange(CAM[0]), torch.arange(CAM[1]), indexing="ij")
    pix = cameras.coords.gather(2, view[..., None, None].expand(b, q, 1, 2))[:, :, 0].floor()
    cam_allowed = ((vv == view[..., None, None, None]) & ((cyy - pix[..., 0, None, None, None]).abs() <= rc)
                   & ((cxx - pix[..., 1, None, None, None]).abs() <= rc) & seen[..., None, None, None])
    allowed = torch.cat([bev_allowed.flatten(2), cam_allowed.flatten(2)], dim=-1)    # (B, Q, N)
    bev_tokens = bev_x.flatten(2).transpose(1, 2)
    cam_tokens = cam_x.view(b, V, C, -1).permute(0, 1, 3, 2).reshape(b, -1, C)
    keys = torch.cat([bev_tokens + bev_pos + gen.bev_type_embed, cam_tokens + cam_pos.reshape(b, -1, C)
                      + gen.rv_type_embed], 1)
    values = torch.cat([bev_tokens, cam_tokens], 1)
    layer = gen.encoder.layers[0]
    proj = layer.attentions[0].attn
    heads = gen.cfg.num_heads
    split = lambda t: t.view(b, t.shape[1], heads, C // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(proj.project(query_pos, 0)), split(proj.project(keys, 1)),
                                         split(proj.project(values, 2)), attn_mask=allowed[:, None])
    target = layer.norms[0](proj.out_proj(out.transpose(1, 2).reshape(b, q, C)))
    target = layer.norms[1](layer.ffns[0](target))
    return torch.sigmoid(gen.weight_predictor(gen.encoder.post_norm(target)))


def test_gathered_windows_equal_dense_masked_attention():
    torch.manual_seed(0)
    gen = AQRWeightGenerator(AQRGeneratorConfig(num_heads=4, ffn_dim=32, dropout=0.0, camera_window=3,
                                                bev_window=3), C).eval()
    torch.nn.init.normal_(gen.weight_predictor.weight)                     # spread outputs so errors show
    inputs = _inputs()
    lidar_w, camera_w = gen(*inputs)
    expected = _dense_reference(gen, *inputs)
    torch.testing.assert_close(torch.stack([lidar_w, camera_w], -1), expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 0.05


def test_use_type_embed_false_leaves_the_embeddings_out_as_the_fork_did():
    torch.manual_seed(0)
    cfg = AQRGeneratorConfig(num_heads=4, ffn_dim=32, dropout=0.0, camera_window=3, bev_window=3)
    gen = AQRWeightGenerator(cfg, C).eval()
    torch.nn.init.normal_(gen.weight_predictor.weight)
    inputs = _inputs()
    with_embed = torch.stack(gen(*inputs), -1)
    gen.cfg = AQRGeneratorConfig(**{**vars(cfg), "use_type_embed": False})
    without = torch.stack(gen(*inputs), -1)
    with torch.no_grad():
        gen.bev_type_embed.mul_(100.0)
        gen.rv_type_embed.mul_(100.0)
    assert torch.equal(torch.stack(gen(*inputs), -1), without)          # the embeddings are not used at all
    assert (with_embed - without).abs().max() > 1e-4


@pytest.mark.parametrize("activation,bias,start", [("sigmoid", 2.0, 0.8808), ("tanh", 1.5, 0.9051)])
def test_initial_weights(activation, bias, start):
    gen = AQRWeightGenerator(AQRGeneratorConfig(ffn_dim=32, activation=activation, bias_init=bias), C).eval()
    lidar_w, camera_w = gen(*_inputs())
    for w in (lidar_w, camera_w):
        assert abs(w.mean().item() - start) < 0.02 and (w - start).abs().max() < 0.05


def test_parameter_names_follow_the_fork():
    shapes = {k: tuple(v.shape) for k, v in AQRWeightGenerator(AQRGeneratorConfig(), 256).state_dict().items()}
    assert shapes["encoder.layers.0.attentions.0.attn.in_proj_weight"] == (768, 256)
    assert shapes["encoder.layers.0.attentions.0.attn.out_proj.weight"] == (256, 256)
    assert shapes["encoder.layers.0.ffns.0.layers.0.0.weight"] == (1024, 256)
    assert shapes["encoder.layers.0.ffns.0.layers.1.weight"] == (256, 1024)
    assert shapes["encoder.layers.0.norms.1.bias"] == (256,)
    assert shapes["encoder.post_norm.weight"] == (256,)
    assert shapes["weight_predictor.weight"] == (2, 256) and shapes["bev_type_embed"] == (256,)
    assert len(shapes) == 18


def _window_attention_inputs(batch=2, queries=5, tokens=30, bev_keys=4, camera_keys=6):
    torch.manual_seed(0)
    attention = LocalCrossAttention(C, num_heads=4, dropout=0.0).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.5)                           # biases too: they must cancel right
    query, keys, values = torch.randn(batch, queries, C), torch.randn(batch, tokens, C), torch.randn(batch, tokens, C)
    index = torch.randint(0, tokens, (batch, queries, bev_keys + camera_keys))
    keep = torch.rand(batch, queries, bev_keys + camera_keys) > 0.3
    keep[..., 0] = keep[..., bev_keys] = True                               # every group keeps a key
    return attention, (query, keys, values, index), keep, bev_keys


def test_per_modality_attention_is_the_mean_of_each_window_attended_alone():
    attention, inputs, keep, split = _window_attention_inputs()
    bev_only, camera_only = keep.clone(), keep.clone()
    bev_only[..., split:] = False
    camera_only[..., :split] = False
    expected = 0.5 * (attention(*inputs, bev_only) + attention(*inputs, camera_only))
    torch.testing.assert_close(attention(*inputs, keep, split), expected, rtol=1e-5, atol=1e-5)
    assert (attention(*inputs, keep) - expected).abs().max() > 1e-3      # one joint softmax is another thing


def test_per_modality_attention_of_a_query_no_camera_sees_uses_half_its_bev_window():
    attention, (query, keys, values, index), keep, split = _window_attention_inputs()
    keep[0, 0, split:] = False                                             # query 0 of sample 0: no camera key
    query.requires_grad_(True)
    out = attention(query, keys, values, index, keep, split)
    bev_only = keep.clone()
    bev_only[..., split:] = False
    alone = attention(query, keys, values, index, bev_only)
    bias = attention.attn.out_proj.bias
    torch.testing.assert_close(out[0, 0], 0.5 * (alone[0, 0] + bias), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(query.grad).all() and query.grad[0, 0].abs().sum() > 0


def test_sensor_evidence_starts_at_zero_and_learns():
    """Off or freshly on, the weights are the same (identity start stays exact); the offset layer gets gradient."""
    cfg = AQRGeneratorConfig(num_heads=4, ffn_dim=32, dropout=0.0, camera_window=3, bev_window=3)
    torch.manual_seed(0)
    plain = AQRWeightGenerator(cfg, C, identity_start=True).eval()
    torch.manual_seed(0)
    with_evidence = AQRWeightGenerator(AQRGeneratorConfig(**{**vars(cfg), "sensor_evidence": True}), C,
                                       identity_start=True, bev_size=BEV, sensor_pixel=(3.0, 3.5)).eval()
    inputs = _inputs()
    lidar_w, camera_w = with_evidence(*inputs)
    assert torch.equal(torch.stack([lidar_w, camera_w]), torch.stack(plain(*inputs)))
    assert torch.all(lidar_w == 1.0) and torch.all(camera_w == 1.0)
    (lidar_w - 2 * camera_w).sum().backward()
    assert with_evidence.weight_predictor.weight.grad.abs().max() > 0      # the head sees the evidence at once
    with pytest.raises(ValueError, match="bev_size and sensor_pixel"):
        AQRWeightGenerator(AQRGeneratorConfig(sensor_evidence=True), C)


def test_sensor_evidence_measures_the_query_sector_and_view():
    """A LiDAR that returns only in one sector and a camera that sees only in one view: each query's evidence is
    log(1 + the mean norm there) where it looks, 0 elsewhere."""
    from aqrcmt.models.aqr.generator import SensorEvidence
    evidence = SensorEvidence(C, sectors=4, bev_size=BEV, sensor_pixel=(3.0, 3.5))   # sector 2: 0..90 deg
    bev_x = torch.zeros(1, C, *BEV)
    bev_x[0, 0, 3:, 4:] = 2.0                                              # every cell of sector 2, norm 2
    cam_x = torch.zeros(V, C, *CAM)
    cam_x[1, 0] = 3.0                                                      # view 1 sees norm 3 everywhere
    bev_coords = torch.tensor([[[5.0, 6.0], [1.0, 1.0], [5.0, 1.0]]])     # sector 2, sector 0, sector 3
    view, seen = torch.tensor([[1, 0, 1]]), torch.tensor([[True, True, False]])
    offsets = evidence.measure(bev_x, cam_x, bev_coords, view, seen)
    rows, cols = torch.meshgrid(torch.arange(BEV[0]) + 0.5 - 3.0, torch.arange(BEV[1]) + 0.5 - 3.5, indexing="ij")
    assert (evidence.sector_of(rows, cols) == 2).sum() == 9                 # exactly the filled cells
    expected_lidar = torch.tensor([2.0, 0.0, 0.0]).log1p()
    torch.testing.assert_close(offsets[0, :, 0], expected_lidar)
    torch.testing.assert_close(offsets[0, :, 1], torch.tensor([3.0, 0.0, 0.0]).log1p())


@pytest.mark.parametrize("evidence", [True, False])
def test_a_supervised_router_learns_a_dropped_lidar_from_its_evidence(evidence):
    """Samples whose BEV features are 4x weaker (a dropped LiDAR) beside strong camera features: trained against
    targets 0 (dropped) / 1 (working) at the study's learning rate, the router separates them only with the
    sensor evidence (in the windows the weak BEV tokens drown in the camera tokens and the LayerNorms)."""
    cfg = AQRGeneratorConfig(num_heads=4, ffn_dim=32, dropout=0.0, camera_window=3, bev_window=3,
                             sensor_evidence=evidence)
    torch.manual_seed(0)
    gen = AQRWeightGenerator(cfg, C, identity_start=True, bev_size=BEV, sensor_pixel=(3.0, 3.5))
    optimizer = torch.optim.Adam(gen.parameters(), lr=1e-2)

    def batch(seed):
        query_pos, bev_x, bev_pos, cam_x, cam_pos, bev, cameras = _inputs(batch=4, queries=8, seed=seed)
        dropped = torch.tensor([True, False, True, False])
        bev_x = torch.where(dropped[:, None, None, None], 0.25 * bev_x, bev_x)
        return (query_pos, bev_x, bev_pos, 4.0 * cam_x, cam_pos, bev, cameras), dropped

    for step in range(60):
        inputs, dropped = batch(100 + step)
        lidar_w, _ = gen(*inputs)
        loss = ((lidar_w - (~dropped).float()[:, None]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        inputs, dropped = batch(7)
        lidar_w, _ = gen(*inputs)
    failed, intact = lidar_w[dropped].mean().item(), lidar_w[~dropped].mean().item()
    print(f"evidence {evidence}: dropped {failed:.3f}, working {intact:.3f}")
    if evidence:
        assert failed <= 0.3 and intact >= 0.7
    else:
        assert failed > 0.3 or intact < 0.7
