"""CmtHead: queries with 3-D reference points decode a joint BEV + camera token memory into boxes.

Forward (official ``CmtHead.forward_single``, junjie18/CMT ``projects/mmdet3d_plugin/models/dense_heads/cmt_head.py``):
shared 3x3 conv on the BEV map -> denoising queries (training) -> position
encodings of BEV cells, image cells and queries -> [AQR feature modulation] -> 6-layer decoder -> grouped
task heads -> centre / height mapped to metres through the reference points. ``loss`` gives the 24
official terms (Hungarian matching + denoising, every layer), ``decode`` the NMS-free detections.
Sub-module names equal the official ``pts_bbox_head.*`` checkpoint keys. The LiDAR-only release
(``with_camera=False``: no rv_embedding, final_kernel 3) and the camera-only release (``with_lidar=False``:
no shared_conv, image memory only) are the same class.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from aqrcmt.config import AQRConfig, HeadConfig
from aqrcmt.models.assigner import hungarian_assign, match_cost
from aqrcmt.models.bbox_coder import ROT_CODES, box_codes, decode_detections, encode_boxes, oriented_box_codes
from aqrcmt.models.camera_geometry import projection_matrices
from aqrcmt.models.denoising import Denoising
from aqrcmt.models.local_attention import LocalAttention
from aqrcmt.models.locality import cross_attention_locality_bias
from aqrcmt.models.losses import heading_axis_l1, sigmoid_focal_loss, weighted_l1_loss
from aqrcmt.models.position_encoding import (
    bev_grid_coords, image_ray_points, inverse_sigmoid, pos2embed, query_ray_points, ray_depths, read_bev_map,
)
from aqrcmt.models.task_head import SeparateTaskHead
from aqrcmt.models.transformer import CmtTransformer
from aqrcmt.models.aqr.routing import router_loss
from aqrcmt.structures import SENSOR_DROPPED, Detections, SensorStates

# Official DN classification normaliser: expected positives = N * (sphere / cube volume) = N pi/6 split^3,
# with pi written as 3.14159 in the official code.
_DN_PI = 3.14159
_NEG_CLS_AVG_WEIGHT = 0.1


# Where the BEV heading map is supervised in each GT box: (along, across) as fractions of (dx, dy), a 3 x 3 grid.
_FOOTPRINT_POINTS = tuple((along, across) for along in (-0.3, 0.0, 0.3) for across in (-0.3, 0.0, 0.3))


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias) -> BatchNorm2d -> ReLU; keys ``conv.weight``, ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class CmtHead(nn.Module):
    """The CMT detection head.

    cfg: head hyper-parameters; pc_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres; bev_size:
    (H, W) of the BEV map; with_lidar / with_camera: which memories exist; aqr: optional AQR modulation.
    """

    def __init__(self, cfg: HeadConfig, *, pc_range: tuple[float, ...], bev_size: tuple[int, int],
                 with_lidar: bool, with_camera: bool, aqr: Optional[AQRConfig] = None) -> None:
        super().__init__()
        if not (with_lidar or with_camera):
            raise ValueError("CmtHead needs with_lidar or with_camera")
        if len(pc_range) != 6:
            raise ValueError(f"pc_range needs 6 values, got {pc_range}")
        cfg.validate()
        self.cfg = cfg
        self.pc_range = tuple(float(v) for v in pc_range)
        self.bev_size = tuple(bev_size)
        self.with_lidar, self.with_camera = with_lidar, with_camera
        hidden = cfg.hidden_dim

        self.shared_conv = ConvBNReLU(cfg.in_channels, hidden) if with_lidar else None
        self.bev_heading = None
        if with_lidar and cfg.bev_heading_weight > 0:     # the BEV features -> (sin, cos) of the heading per cell
            self.bev_heading = nn.Sequential(nn.Conv2d(cfg.in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                             nn.Conv2d(hidden, 2, 1))
        self.transformer = CmtTransformer(cfg.num_layers, hidden, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                                          cfg.checkpointing)
        self.reference_points = nn.Embedding(cfg.num_query, 3)
        nn.init.uniform_(self.reference_points.weight, 0.0, 1.0)
        self.bev_embedding = _mlp(2 * hidden, hidden, hidden)
        self.rv_embedding = _mlp(3 * cfg.depth_num, 4 * hidden, hidden) if with_camera else None
        heads = {"center": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2, "cls_logits": cfg.num_classes}
        self.task_heads = nn.ModuleList([SeparateTaskHead(hidden, heads, groups=cfg.num_layers,
                                                          head_conv=cfg.head_conv, final_kernel=cfg.final_kernel)])
        self.register_buffer("bev_coords", bev_grid_coords(self.bev_size), persistent=False)
        self.register_buffer("depths", ray_depths(cfg.depth_num, self.pc_range[3]), persistent=False)
        self.register_buffer("code_weights", torch.tensor(cfg.code_weights, dtype=torch.float32), persistent=False)

        self.aqr = None
        if aqr is not None and aqr.enabled:
            from aqrcmt.models.aqr.module import AQRModulation
            self.aqr = AQRModulation(aqr, head_cfg=cfg, pc_range=self.pc_range, bev_size=self.bev_size)

    # ---------------------------------------------------------------------------------------------
    # Position encodings
    # ---------------------------------------------------------------------------------------------
    def bev_position_embedding(self) -> Tensor:
        """Embedding of every BEV cell: (H * W, C)."""
        return self.bev_embedding(pos2embed(self.bev_coords, self.cfg.hidden_dim))

    def image_position_embedding(self, feat_size: tuple[int, int], img2lidar: Tensor,
                                 img_shape: tuple[int, int]) -> Tensor:
        """Camera-ray embedding of every image-feature cell: img2lidar (B, V, 4, 4) -> (B * V, h, w, C)."""
        rays = image_ray_points(img2lidar.flatten(0, 1), feat_size, img_shape, self.depths, self.pc_range)
        return self.rv_embedding(rays)

    def query_embedding(self, reference: Tensor, lidar2img: Optional[Tensor], img2lidar: Optional[Tensor],
                        img_shape: tuple[int, int]) -> tuple[Tensor, Optional[Tensor]]:
        """(BEV part, camera part or None) of the query position embedding, each (B, Nq, C).

        The camera part sums the ray embedding over the views that see the query (0 when none does).
        """
        # A clamp into (0, 1) written as the official code writes it (the reference goes through logit space and
        # back): x for eps <= x <= 1 - eps, eps / (1 + eps - x) below and x / (x + eps) above (eps = 1e-5).
        # Kept as this round trip rather than x.clamp(eps, 1 - eps) because the two differ by an ulp inside
        # the range and in the gradient at the edges, and the parity tests compare to the official outputs.
        reference = inverse_sigmoid(reference).sigmoid()
        bev = self.bev_embedding(pos2embed(reference, self.cfg.hidden_dim))
        if not self.with_camera:
            return bev, None
        rays, visible = query_ray_points(reference, lidar2img, img2lidar, img_shape, self.depths, self.pc_range)
        camera = (self.rv_embedding(rays) * visible.unsqueeze(-1)).sum(dim=2)
        return bev, camera

    # ---------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------
    def forward(self, bev_feat: Optional[Tensor], img_feat: Optional[Tensor], lidar2img: Optional[Tensor],
                img_shape: tuple[int, int], dn: Optional[Denoising] = None) -> dict:
        """Predict boxes for every decoder layer.

        bev_feat: (B, in_channels, H, W) or None; img_feat: (B * 6, C, h, w) or None; lidar2img: (B, 6, 4, 4)
        float64 (needed with cameras); img_shape: (H, W) of the (padded) images. dn: the training batch's
        denoising queries from :func:`~aqrcmt.models.denoising.prepare_denoising` (built by the caller, outside
        torch.compile, so that varying GT counts do not recompile the head), or None.
        Returns {key: (L, B, Nq, k)} for center (m), height (m, carries log dx), dim, rot, vel, cls_logits
        (with ``bev_heading_weight`` > 0 also heading_flip: > 0 where rot points against the BEV heading map at
        the box centre); with denoising also ``dn_<key>`` (L, B, P, k); ``bev_heading`` (B, 2, H, W) that map;
        ``dn`` holds the :class:`Denoising` record or None, ``aqr_routing`` the AQR query weights
        (:class:`~aqrcmt.models.aqr.routing.QueryRouting`) or None.
        """
        x, x_img, batch = self._check_inputs(bev_feat, img_feat, lidar2img)
        outputs: dict = {}
        if x is not None:
            if self.bev_heading is not None:
                outputs["bev_heading"] = self.bev_heading(x)
            x = self.shared_conv(x)

        reference = self.reference_points.weight.unsqueeze(0).expand(batch, -1, -1)
        if dn is not None:
            reference = torch.cat((dn.reference.to(reference), reference), dim=1)
        num_dn = dn.pad_size if dn is not None else 0

        l2i = i2l = bev_pos = rv_pos = None
        if self.with_camera:
            l2i, i2l = projection_matrices(lidar2img)
            rv_pos = self.image_position_embedding(x_img.shape[-2:], i2l, img_shape)
        if self.with_lidar:
            bev_pos = self.bev_position_embedding()
        bev_query, rv_query = self.query_embedding(reference, l2i, i2l, img_shape)
        query_pos = bev_query if rv_query is None else bev_query + rv_query

        routing = None
        if self.aqr is not None:
            x, x_img, routing = self.aqr(x, x_img, query_pos=query_pos, bev_pos=bev_pos, rv_pos=rv_pos,
                                         reference_points=reference, lidar2img=lidar2img, img_shape=img_shape,
                                         num_dn=num_dn)

        locality = None
        if self.cfg.locality_enabled:
            prior = dict(pc_range=self.pc_range, sigma_bev=self.cfg.locality_sigma_bev,
                         sigma_camera=self.cfg.locality_sigma_camera, lidar2img=lidar2img if self.with_camera else None,
                         img_shape=img_shape, camera_feature_size=tuple(x_img.shape[-2:]) if self.with_camera else None)
            if self.cfg.local_attention_sigmas > 0:
                local = LocalAttention(reference, bev_size=self.bev_size, window=self.cfg.local_attention_sigmas,
                                       bev_memory=self.with_lidar, **prior)
                # a traced graph's shapes may not depend on the data: the same attention as a dense bias there
                locality = local.dense_bias() if torch.compiler.is_compiling() else local
            else:
                locality = cross_attention_locality_bias(reference, bev_size=self.bev_size if self.with_lidar else None,
                                                         **prior)
        features = self.transformer(query_pos, x, bev_pos, x_img, rv_pos,
                                    dn.attn_mask if dn is not None else None, cross_attn_bias=locality)
        preds = self.task_heads[0](torch.nan_to_num(features))
        preds = self._to_metres(preds, inverse_sigmoid(reference))
        if "bev_heading" in outputs:
            preds["heading_flip"] = self._against_bev_heading(preds, outputs["bev_heading"])

        outputs.update(dn=dn, aqr_routing=routing)
        for key in preds:
            outputs[key] = preds[key][:, :, num_dn:]
            if dn is not None:
                outputs["dn_" + key] = preds[key][:, :, :num_dn]
        return outputs

    def _check_inputs(self, bev_feat: Optional[Tensor], img_feat: Optional[Tensor],
                      lidar2img: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor], int]:
        cfg = self.cfg
        batch = None
        if self.with_lidar:
            if bev_feat is None or bev_feat.dim() != 4 or bev_feat.shape[1] != cfg.in_channels:
                raise ValueError(f"bev_feat must be (B, {cfg.in_channels}, H, W), got "
                                 f"{None if bev_feat is None else tuple(bev_feat.shape)}")
            if tuple(bev_feat.shape[-2:]) != self.bev_size:
                raise ValueError(f"bev_feat spatial size {tuple(bev_feat.shape[-2:])} != bev_size {self.bev_size}")
            batch = bev_feat.shape[0]
        elif bev_feat is not None:
            raise ValueError("bev_feat given to a head built with with_lidar=False")
        if self.with_camera:
            if lidar2img is None or lidar2img.dim() != 4 or lidar2img.shape[-2:] != (4, 4):
                raise ValueError(f"lidar2img must be (B, V, 4, 4), got "
                                 f"{None if lidar2img is None else tuple(lidar2img.shape)}")
            views = lidar2img.shape[1]
            batch = lidar2img.shape[0] if batch is None else batch
            if (img_feat is None or img_feat.dim() != 4 or img_feat.shape[1] != cfg.hidden_dim
                    or img_feat.shape[0] != batch * views or lidar2img.shape[0] != batch):
                raise ValueError(f"img_feat must be (B * {views}, {cfg.hidden_dim}, h, w) with B = {batch}, got "
                                 f"{None if img_feat is None else tuple(img_feat.shape)}")
        elif img_feat is not None:
            raise ValueError("img_feat given to a head built with with_camera=False")
        return bev_feat, img_feat, batch

    def _to_metres(self, preds: dict[str, Tensor], reference_logit: Tensor) -> dict[str, Tensor]:
        """centre = sigmoid(out + logit(ref_xy)) over the x/y range; height likewise with ref_z over z."""
        low = reference_logit.new_tensor(self.pc_range[:3])
        span = reference_logit.new_tensor(self.pc_range[3:6]) - low
        preds = dict(preds)
        preds["center"] = (preds["center"] + reference_logit[..., :2]).sigmoid() * span[:2] + low[:2]
        preds["height"] = (preds["height"] + reference_logit[..., 2:3]).sigmoid() * span[2:] + low[2:]
        return preds

    # ---------------------------------------------------------------------------------------------
    # Loss
    # ---------------------------------------------------------------------------------------------
    def loss(self, outputs: dict, gt_boxes: list[Tensor], gt_labels: list[Tensor],
             sensors: Optional[SensorStates] = None) -> dict[str, Tensor]:
        """The official loss terms in fp32: ``loss_cls``, ``loss_bbox`` (last layer), ``d{i}.loss_*`` (earlier
        layers) and the same with ``dn_`` for the denoising queries (when training with denoising); with router
        supervision (``model.aqr.router_loss_weight`` > 0) also ``loss_router``; with the BEV heading output
        ``loss_bev_heading``.

        gt_boxes: B tensors (n_b, 9) gravity-centre boxes; gt_labels: B tensors (n_b,); sensors: the batch's
        sensor states (None: every sensor intact).
        """
        codes = box_codes(outputs).float()
        device = codes.device
        with torch.autocast(device_type=device.type, enabled=False):
            gt_boxes = [b.to(device).float() for b in gt_boxes]
            gt_labels = [lab.to(device).long() for lab in gt_labels]
            terms = self._matching_losses(outputs["cls_logits"].float(), codes, gt_boxes, gt_labels)
            dn = outputs.get("dn")
            if dn is not None:
                terms.update(self._denoising_losses(outputs, dn))
            elif self.training and self.cfg.use_dn:  # no GT in the batch: keep the keys, add zero
                zero = outputs["cls_logits"].float().sum((1, 2, 3)) * 0.0
                terms.update({"dn_" + name: zero for name in list(terms)})
            losses = {}
            if "bev_heading" in outputs:
                lidar_dropped = ((sensors.lidar == SENSOR_DROPPED).tolist() if sensors is not None
                                 else [False] * len(gt_boxes))
                losses["loss_bev_heading"] = self._bev_heading_loss(outputs["bev_heading"].float(), gt_boxes,
                                                                    lidar_dropped)
        if self.aqr is not None and self.aqr.cfg.router_loss_weight > 0:
            routing = outputs["aqr_routing"]
            if sensors is None:
                sensors = SensorStates.intact(routing.camera_visible.shape[0], routing.camera_visible.shape[-1])
            losses["loss_router"] = self.aqr.cfg.router_loss_weight * router_loss(routing, sensors)
        last = codes.shape[0] - 1
        for name, per_layer in terms.items():
            per_layer = torch.nan_to_num(per_layer)
            losses[name] = per_layer[last]
            for layer in range(last):
                losses[f"d{layer}.{name}"] = per_layer[layer]
        return losses

    def _matching_losses(self, logits: Tensor, codes: Tensor, gt_boxes: list[Tensor],
                         gt_labels: list[Tensor]) -> dict[str, Tensor]:
        """Hungarian-matched focal and L1 losses per decoder layer (L,): logits (L, B, Q, C), codes (L, B, Q, 10)."""
        cfg = self.cfg
        layers, batch, queries, num_classes = logits.shape
        labels = torch.full((layers, batch, queries), num_classes, dtype=torch.long, device=logits.device)
        targets = codes.new_zeros(codes.shape)
        positive = torch.zeros(layers, batch, queries, dtype=torch.bool, device=logits.device)
        for b, (boxes, sample_labels) in enumerate(zip(gt_boxes, gt_labels)):
            if boxes.shape[0] == 0:
                continue
            gt_codes = encode_boxes(boxes)
            cost = match_cost(logits[:, b], codes[:, b], sample_labels, gt_codes, self.code_weights,
                              cls_weight=cfg.loss_cls_weight, reg_weight=cfg.loss_bbox_weight,
                              alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
            pairs = hungarian_assign(cost)
            layer_index = torch.cat([torch.full_like(q, layer) for layer, (q, _) in enumerate(pairs)])
            query_index = torch.cat([q for q, _ in pairs])
            gt_index = torch.cat([g for _, g in pairs])
            labels[layer_index, b, query_index] = sample_labels[gt_index]
            targets[layer_index, b, query_index] = gt_codes[gt_index]
            positive[layer_index, b, query_index] = True

        num_pos = self._normalizer(positive.flatten(1).sum(1).float())
        num_neg = self._normalizer(torch.full_like(num_pos, batch * queries)) - num_pos
        cls_norm = (num_pos + _NEG_CLS_AVG_WEIGHT * num_neg).clamp(min=1.0)
        focal = sigmoid_focal_loss(logits, labels, cfg.focal_alpha, cfg.focal_gamma).flatten(1).sum(1)
        weight = (positive & torch.isfinite(targets).all(-1)).unsqueeze(-1) * self.code_weights
        l1 = weighted_l1_loss(codes, targets, weight).flatten(1).sum(1)
        l1 = l1 + self._heading_axis_loss(codes, targets, weight)
        return {"loss_cls": cfg.loss_cls_weight * focal / cls_norm,
                "loss_bbox": cfg.loss_bbox_weight * l1 / num_pos.clamp(min=1.0)}

    def _denoising_losses(self, outputs: dict, dn: Denoising) -> dict[str, Tensor]:
        """Focal loss with the noised labels and L1 to the clean boxes on every denoising query, per layer (L,)."""
        cfg = self.cfg
        index = (slice(None), dn.batch_index, dn.slot_index)
        logits = outputs["dn_cls_logits"].float()[index]                     # (L, N, C)
        codes = box_codes(outputs, "dn_").float()[index]                      # (L, N, 10)
        targets = encode_boxes(dn.boxes.float())
        count = self._normalizer(logits.new_tensor(float(dn.labels.numel())))
        cls_norm = (count * _DN_PI / 6 * cfg.dn_split ** 3).clamp(min=1.0)
        focal = sigmoid_focal_loss(logits, dn.labels.expand(logits.shape[:2]), cfg.focal_alpha, cfg.focal_gamma)
        weight = torch.isfinite(targets).all(-1, keepdim=True) * self.code_weights
        l1 = weighted_l1_loss(codes, targets, weight).flatten(1).sum(1)
        l1 = l1 + self._heading_axis_loss(codes, targets, weight)
        return {"dn_loss_cls": cfg.loss_cls_weight * focal.flatten(1).sum(1) / cls_norm,
                "dn_loss_bbox": cfg.loss_bbox_weight * l1 / count.clamp(min=1.0)}

    def _heading_axis_loss(self, codes: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
        """The front/back-blind heading term per layer: codes / targets / weight (L, ..., 10) -> (L,)."""
        if self.cfg.heading_axis_weight == 0:
            return codes.new_zeros(codes.shape[0])
        axis_weight = self.cfg.heading_axis_weight * (weight[..., ROT_CODES] != 0).all(-1)
        return heading_axis_l1(codes[..., ROT_CODES], targets[..., ROT_CODES], axis_weight).flatten(1).sum(1)

    def _bev_heading_loss(self, heading_map: Tensor, gt_boxes: list[Tensor], lidar_dropped: list[bool]) -> Tensor:
        """``bev_heading_weight`` x the L1 between the (sin, cos) map (B, 2, H, W), read bilinearly at 3 x 3 points
        spread over each GT box's footprint (the map is read at predicted centres, not the true ones), and
        (sin, cos) of the box's yaw, averaged over the points inside the BEV range (none of a sample whose LiDAR
        was dropped: its map has nothing to read the heading from)."""
        low, high = heading_map.new_tensor(self.pc_range[:2]), heading_map.new_tensor(self.pc_range[3:5])
        spread = heading_map.new_tensor(_FOOTPRINT_POINTS)                          # (9, 2) fractions of (dx, dy)
        total, count = heading_map.sum() * 0.0, heading_map.new_zeros(())   # the map takes part in every step
        for b, boxes in enumerate(gt_boxes):
            if lidar_dropped[b]:
                continue
            yaw = boxes[:, 6:7]
            along, across = spread[:, 0] * boxes[:, 3:4], spread[:, 1] * boxes[:, 4:5]       # (n, 9) metres
            xy = torch.stack((boxes[:, 0:1] + along * torch.cos(yaw) - across * torch.sin(yaw),
                              boxes[:, 1:2] + along * torch.sin(yaw) + across * torch.cos(yaw)), dim=-1)
            target = torch.cat((torch.sin(yaw), torch.cos(yaw)), dim=-1).unsqueeze(1)          # (n, 1, 2)
            counted = ((xy > low) & (xy < high)).all(-1) & torch.isfinite(target).all(-1)       # (n, 9)
            sampled = read_bev_map(heading_map[b:b + 1], torch.nan_to_num(xy).view(1, -1, 2), self.pc_range)
            error = (sampled.view(xy.shape) - torch.nan_to_num(target)).abs().sum(-1)
            total = total + torch.where(counted, error, torch.zeros_like(error)).sum()
            count = count + counted.sum()
        return self.cfg.bev_heading_weight * total / self._normalizer(count.float()).clamp(min=1.0)

    def _against_bev_heading(self, preds: dict[str, Tensor], heading_map: Tensor) -> Tensor:
        """Minus the dot product of each query's (sin, cos) with the heading map (B, 2, H, W) read bilinearly at its
        centre: (L, B, Q, 1), > 0 where the two point apart (the decoded box is turned by 180 degrees)."""
        layers, batch, queries, _ = preds["rot"].shape
        centres = preds["center"].transpose(0, 1).reshape(batch, layers * queries, 2)
        sampled = read_bev_map(heading_map, centres, self.pc_range).view(batch, layers, queries, 2).transpose(0, 1)
        return -(preds["rot"] * sampled.to(preds["rot"].dtype)).sum(-1, keepdim=True)

    def _normalizer(self, local_count: Tensor) -> Tensor:
        """A loss normaliser: the local count, or its mean over processes with `sync_loss_normalizers`."""
        if not (self.cfg.sync_loss_normalizers and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            return local_count
        total = local_count.detach().clone()
        torch.distributed.all_reduce(total)
        return total / torch.distributed.get_world_size()

    # ---------------------------------------------------------------------------------------------
    # Decoding
    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, outputs: dict) -> list[Detections]:
        """NMS-free detections of the last decoder layer, gravity-centre boxes (see aqrcmt.structures)."""
        return decode_detections(outputs["cls_logits"][-1], oriented_box_codes(outputs)[-1],
                                 max_num=self.cfg.max_num, post_center_range=self.cfg.post_center_range,
                                 score_threshold=self.cfg.score_threshold)
