"""Pictures of what the model sees and predicts for one sample: BEV, the six cameras, the AQR maps.

- BEV (:func:`render_bev`): LiDAR points coloured by height (with its colour bar), the ego vehicle, range rings
  every 10 m, GT boxes (dashed, in :data:`GT_COLOR`) and predictions (solid, in the class colours, a line from the
  centre to the front, the score); x right, y up, metres.
- Cameras (:func:`render_cameras`): the six network inputs (test resize/crop) in the rig's layout
  (:data:`aqrcmt.structures.CAMERA_LAYOUT`), enlarged :data:`CAMERA_SCALE` times, the 3-D boxes projected with
  the batch's ``lidar2img``: GT thin in :data:`GT_COLOR`, predictions in the class colours with a cross on the
  front face and a label (class, score) on a dark patch above the box. Edges are clipped at a near plane in front
  of the camera (nothing behind it is drawn) and at the image border.
- AQR (:func:`render_aqr`): the rendered BEV and camera weight maps, each on its own colour scale, next to the
  mean |feature| they modulate; the rendered queries marked, the detections ringed; the BEV panels in metres,
  oriented as the BEV picture.

Pictures are (H, W, 3) uint8 RGB arrays (:func:`save_png` writes one; TensorBoard takes them as HWC).
Matplotlib draws through its Agg canvas (no global pyplot state), the camera views through PIL.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Polygon, Rectangle
from PIL import Image, ImageDraw, ImageFont

from aqrcmt.structures import CAMERA_LAYOUT, CAMERA_NAMES, CLASS_NAMES
from aqrcmt.data.box_geometry import bev_corners, box_corners
from aqrcmt.data.transforms import IMAGE_MEAN_BGR, IMAGE_STD_BGR
from aqrcmt.eval.predict import predict_dataset
from aqrcmt.models.aqr.monitor import AQRView
from aqrcmt.structures import Batch, Detections, SampleMeta

# One colour per class (RGB), in CLASS_NAMES order: car blue, truck orange, construction vehicle brown, bus red,
# trailer purple, barrier grey, motorcycle olive, bicycle cyan, pedestrian green, traffic cone yellow; ten hues
# apart, none of them the GT colour (magenta).
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 255), (255, 127, 14), (140, 86, 75), (214, 39, 40), (148, 103, 189),
    (160, 160, 160), (188, 189, 34), (23, 190, 207), (44, 200, 44), (255, 215, 0),
)
GT_COLOR = (255, 0, 255)
CAMERA_SCALE = 2                     # the camera mosaic shows the network inputs at twice their size
FONT_SIZE = 14                       # px, labels in the camera mosaic
NEAR_DEPTH = 0.1                     # m: box edges are cut where they come closer to the camera plane than this
# Corner pairs of box_corners (bottom/top of BEV corners 0..3): the bottom ring, the top ring, the verticals.
BOX_EDGES: tuple[tuple[int, int], ...] = ((0, 2), (2, 4), (4, 6), (6, 0), (1, 3), (3, 5), (5, 7), (7, 1),
                                          (0, 1), (2, 3), (4, 5), (6, 7))
FRONT_CROSS: tuple[tuple[int, int], ...] = ((0, 7), (1, 6))   # the diagonals of the front face (+dx side)
EGO_SIZE = (4.1, 1.8)                # m: length, width of the ego rectangle in the BEV picture
RING_STEP = 10.0                     # m


def class_color(label: int) -> tuple[int, int, int]:
    return CLASS_COLORS[int(label) % len(CLASS_COLORS)]


# --------------------------------------------------------------------------------------------------
# Box projection
# --------------------------------------------------------------------------------------------------
def _clip_to_rectangle(segments: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Liang-Barsky: (m, 4) segments (u0, v0, u1, v1) cut to [0, width - 1] x [0, height - 1]; (clipped, kept)."""
    start, delta = segments[:, :2], segments[:, 2:] - segments[:, :2]
    t0, t1 = np.zeros(len(segments)), np.ones(len(segments))
    kept = np.ones(len(segments), dtype=bool)
    for axis, limit in ((0, width - 1), (1, height - 1)):
        for p, q in ((-delta[:, axis], start[:, axis]), (delta[:, axis], limit - start[:, axis])):
            parallel = p == 0
            kept &= ~(parallel & (q < 0))
            ratio = np.divide(q, p, out=np.zeros_like(q), where=~parallel)
            t0 = np.where(~parallel & (p < 0), np.maximum(t0, ratio), t0)
            t1 = np.where(~parallel & (p > 0), np.minimum(t1, ratio), t1)
    kept &= t0 <= t1
    clipped = np.concatenate([start + t0[:, None] * delta, start + t1[:, None] * delta], axis=1)
    upper = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float64)
    return np.clip(clipped, 0.0, upper), kept                        # rounding noise at the border


def project_box_edges(boxes: np.ndarray, lidar2img: np.ndarray, image_hw: tuple[int, int],
                      edges: Sequence[tuple[int, int]] = BOX_EDGES) -> list[np.ndarray]:
    """The visible parts of each box's `edges` in one image: per box an (m, 4) array of (u0, v0, u1, v1) pixels.

    boxes: (n, >= 7) LiDAR frame; lidar2img: (4, 4) LiDAR -> pixels (row 2 gives the depth in m);
    image_hw: (H, W). Each edge is cut at the plane NEAR_DEPTH in front of the camera, then at the image border;
    an edge entirely behind that plane or outside the image is dropped (a box behind the camera gives m = 0).
    """
    if len(boxes) == 0:
        return []
    corners = box_corners(np.asarray(boxes, dtype=np.float64))
    projected = np.concatenate([corners, np.ones_like(corners[..., :1])], -1) @ np.asarray(lidar2img).T
    pairs = np.asarray(edges)
    a, b = projected[:, pairs[:, 0], :3], projected[:, pairs[:, 1], :3]          # (n, E, 3): u*d, v*d, d
    da, db = a[..., 2:], b[..., 2:]
    visible = ((da >= NEAR_DEPTH) | (db >= NEAR_DEPTH))[..., 0]
    safe = np.where(np.abs(db - da) > 1e-12, db - da, 1.0)
    cut = np.clip((NEAR_DEPTH - da) / safe, 0.0, 1.0)                          # where the edge meets the plane
    a_in = np.where(da < NEAR_DEPTH, a + cut * (b - a), a)
    b_in = np.where(db < NEAR_DEPTH, a + cut * (b - a), b)
    segments = np.concatenate([a_in[..., :2] / np.maximum(a_in[..., 2:], NEAR_DEPTH),
                               b_in[..., :2] / np.maximum(b_in[..., 2:], NEAR_DEPTH)], axis=-1)   # (n, E, 4)
    clipped, kept = _clip_to_rectangle(segments.reshape(-1, 4), image_hw[1], image_hw[0])
    kept = kept.reshape(visible.shape) & visible
    clipped = clipped.reshape(segments.shape)
    return [clipped[i][kept[i]] for i in range(len(boxes))]


def draw_boxes(image: np.ndarray, boxes: np.ndarray, lidar2img: np.ndarray,
               colors: Sequence[tuple[int, int, int]], texts: Optional[Sequence[str]] = None,
               width: int = 2, front_cross: bool = True) -> np.ndarray:
    """A copy of `image` (H, W, 3) uint8 with the 3-D `boxes` (n, >= 7) drawn through `lidar2img` (4, 4).

    colors: one RGB per box; texts: an optional label per box, written on a dark patch just above the box's highest
    visible point (below the image's top edge); front_cross: also draw the diagonals of the front face.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    edges = BOX_EDGES + FRONT_CROSS if front_cross else BOX_EDGES
    for i, segments in enumerate(project_box_edges(boxes, lidar2img, image.shape[:2], edges)):
        for u0, v0, u1, v1 in segments:
            draw.line([(float(u0), float(v0)), (float(u1), float(v1))], fill=tuple(colors[i]), width=width)
        if texts is not None and len(segments):
            us, vs = segments[:, 0::2].ravel(), segments[:, 1::2].ravel()
            _, top, right, bottom = draw.textbbox((0, 0), texts[i], font=font)
            u = float(np.clip(us.min(), 0, max(image.shape[1] - right, 0)))
            v = float(np.clip(vs.min() - bottom - 2, 0, image.shape[0]))
            draw.rectangle((u - 1, v + top - 1, u + right + 1, v + bottom + 1), fill=(0, 0, 0))
            draw.text((u, v), texts[i], fill=tuple(colors[i]), font=font)
    return np.asarray(canvas)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------
def denormalize_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(V, 3, H, W) normalised BGR network inputs -> (V, H, W, 3) uint8 RGB."""
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    bgr = array * IMAGE_STD_BGR[:, None, None] + IMAGE_MEAN_BGR[:, None, None]
    return np.clip(np.rint(bgr), 0, 255).astype(np.uint8)[:, ::-1].transpose(0, 2, 3, 1).copy()


def _figure_array(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_bev(points: np.ndarray, point_cloud_range: Sequence[float], gt_boxes: np.ndarray,
               gt_labels: np.ndarray, detections: Detections, title: str = "") -> np.ndarray:
    """BEV picture (H, W, 3) uint8 of points (N, >= 3), GT (n, >= 7) with labels (n,), and `detections`."""
    x_min, y_min, z_min, x_max, y_max, z_max = (float(v) for v in point_cloud_range)
    figure = Figure(figsize=(9, 8), dpi=100)
    ax = figure.add_subplot()
    ax.set_facecolor("black")
    heights = ax.scatter(points[:, 0], points[:, 1], c=points[:, 2], s=0.3, cmap="viridis", vmin=z_min, vmax=z_max,
                         linewidths=0)
    figure.colorbar(heights, ax=ax, shrink=0.7, pad=0.02, label="point height z (m, LiDAR frame)")
    for radius in np.arange(RING_STEP, max(abs(x_min), x_max, abs(y_min), y_max) * 1.5, RING_STEP):
        ax.add_patch(Circle((0, 0), radius, fill=False, color="0.5", lw=0.5, ls=":"))
        ax.text(radius * 0.7071, radius * 0.7071, f"{radius:.0f} m", color="0.6", fontsize=7)
    ax.add_patch(Rectangle((-EGO_SIZE[0] / 2, -EGO_SIZE[1] / 2), *EGO_SIZE, color="white"))
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 9)
    gt_color = np.array(GT_COLOR) / 255
    for corners in bev_corners(gt_boxes):
        ax.add_patch(Polygon(corners, closed=True, fill=False, ls="--", lw=1.2, color=gt_color))
    boxes = detections.boxes.detach().cpu().double().numpy().reshape(-1, 9)
    for box, corners, label, score in zip(boxes, bev_corners(boxes), detections.labels.tolist(),
                                          detections.scores.tolist()):
        color = np.array(class_color(label)) / 255
        ax.add_patch(Polygon(corners, closed=True, fill=False, lw=1.5, color=color))
        front = box[:2] + box[3] / 2 * np.array([np.cos(box[6]), np.sin(box[6])])
        ax.plot([box[0], front[0]], [box[1], front[1]], color=color, lw=1.5)
        ax.text(corners[:, 0].max(), corners[:, 1].max(), f"{score:.2f}", color="white", fontsize=8,
                bbox={"facecolor": color, "alpha": 0.6, "pad": 1, "linewidth": 0})
    ax.plot([], [], color=gt_color, ls="--", label=f"ground truth ({len(gt_boxes)})")
    for label in sorted(set(detections.labels.tolist())):
        count = int((detections.labels == label).sum())
        ax.plot([], [], color=np.array(class_color(label)) / 255, label=f"predicted {CLASS_NAMES[label]} ({count})")
    if not len(detections.labels):
        ax.plot([], [], color="white", label="no prediction shown")
    ax.legend(loc="upper right", fontsize=8, facecolor="0.2", labelcolor="white")
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title or "BEV: ground truth dashed, predictions solid (score on each)", fontsize=9)
    figure.tight_layout()
    return _figure_array(figure)


def render_cameras(images: np.ndarray, lidar2img: np.ndarray, gt_boxes: np.ndarray, detections: Detections
                   ) -> np.ndarray:
    """The six views (V, H, W, 3) uint8 RGB, enlarged :data:`CAMERA_SCALE` times, in the rig's layout
    (2 s H, 3 s W, 3) with GT and predicted boxes drawn."""
    views = images.shape[0]
    if views != len(CAMERA_NAMES) or np.shape(lidar2img) != (views, 4, 4):
        raise ValueError(f"render_cameras: expected {len(CAMERA_NAMES)} views and ({len(CAMERA_NAMES)}, 4, 4) "
                         f"projections, got {views} and {np.shape(lidar2img)}")
    height, width = images.shape[1] * CAMERA_SCALE, images.shape[2] * CAMERA_SCALE
    lidar2img = np.array(lidar2img, dtype=np.float64)
    lidar2img[:, :2] *= CAMERA_SCALE                                  # pixel rows u, v of the enlarged views
    font = ImageFont.load_default(size=FONT_SIZE)
    boxes = detections.boxes.detach().cpu().double().numpy().reshape(-1, 9)
    colors = [class_color(label) for label in detections.labels.tolist()]
    texts = [f"{CLASS_NAMES[label]} {score:.2f}" for label, score in zip(detections.labels.tolist(),
                                                                          detections.scores.tolist())]
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 9)
    mosaic = np.zeros((2 * height, 3 * width, 3), dtype=np.uint8)
    for v, name in enumerate(CAMERA_NAMES):
        enlarged = np.asarray(Image.fromarray(images[v]).resize((width, height), Image.Resampling.BILINEAR))
        view = draw_boxes(enlarged, gt_boxes, lidar2img[v], [GT_COLOR] * len(gt_boxes), width=1,
                          front_cross=False)
        view = draw_boxes(view, boxes, lidar2img[v], colors, texts)
        canvas = Image.fromarray(view)
        draw = ImageDraw.Draw(canvas)
        draw.rectangle(draw.textbbox((4, 4), name, font=font), fill=(0, 0, 0))
        draw.text((4, 4), name, fill=(255, 255, 255), font=font)
        row, col = CAMERA_LAYOUT[name]
        mosaic[row * height:(row + 1) * height, col * width:(col + 1) * width] = np.asarray(canvas)
    return mosaic


def render_aqr(view: AQRView, title: str = "", point_cloud_range: Optional[Sequence[float]] = None,
               detections: Optional[np.ndarray] = None) -> np.ndarray:
    """AQR picture (H, W, 3) uint8: BEV weight map and BEV features (left), camera weight maps (right, top) and
    camera features (right, bottom) in the rig's layout; each weight map on its own colour scale (its colour bar
    beside it); rendered queries as red dots.

    point_cloud_range: the BEV map's extent (x_min, y_min, z_min, x_max, y_max, z_max); given, the BEV panels are
    in metres (x right, y up, as :func:`render_bev`), else in map pixels. detections: (n, 2) x, y (m) of the
    detections, ringed in white on the BEV panels (needs `point_cloud_range`).
    """
    bev_map = view.bev_map.float().cpu().numpy()
    cam_maps = view.camera_maps.float().cpu().numpy()
    figure = Figure(figsize=(20, 10), dpi=80, layout="constrained")
    grid = figure.add_gridspec(4, 5)
    extent, to_bev = None, (lambda yx: yx[:, ::-1])                   # (y, x) pixels -> plotted (x, y)
    if point_cloud_range is not None:
        x_min, y_min, _, x_max, y_max, _ = (float(v) for v in point_cloud_range)
        extent = (x_min, x_max, y_min, y_max)
        cell = np.array([(x_max - x_min) / bev_map.shape[1], (y_max - y_min) / bev_map.shape[0]])
        to_bev = (lambda yx: np.array([x_min, y_min]) + (yx[:, ::-1] + 0.5) * cell)   # pixel centres -> metres

    def panel(spec, data: np.ndarray, name: str, points: np.ndarray, origin: str, bev: bool = False,
              scale_bar: bool = False):
        ax = figure.add_subplot(spec)
        image = ax.imshow(data, origin=origin, cmap="viridis", extent=extent if bev else None,
                          vmin=float(data.min()), vmax=max(float(data.max()), float(data.min()) + 1e-6))
        ax.autoscale(False)                                                      # keep the map's extent
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=4, c="red", linewidths=0)
        if bev and detections is not None and extent is not None and len(detections):
            ax.scatter(detections[:, 0], detections[:, 1], s=60, facecolors="none", edgecolors="white",
                       linewidths=1.2)
        ax.set_title(name, fontsize=9)
        if bev and extent is not None:
            ax.set_xlabel("x (m)", fontsize=8)
            ax.set_ylabel("y (m)", fontsize=8)
            ax.tick_params(labelsize=7)
        else:
            ax.axis("off")
        if scale_bar:
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)

    bev_points = np.zeros((0, 2)) if view.bev_queries is None else to_bev(view.bev_queries.float().cpu().numpy())
    ringed = "" if detections is None or extent is None else ", detections ringed"
    panel(grid[:2, :2], bev_map, f"BEV weight map (mean {bev_map.mean():.3g}, max {bev_map.max():.3g}){ringed}",
          bev_points, "lower", bev=True, scale_bar=True)
    if view.bev_features is not None:
        panel(grid[2:, :2], view.bev_features.cpu().numpy(), "BEV features (mean |x| over channels)", bev_points,
              "lower", bev=True, scale_bar=True)
    for v, name in enumerate(CAMERA_NAMES[: len(cam_maps)]):
        row, col = CAMERA_LAYOUT[name]
        points = np.zeros((0, 2))
        if view.camera_queries is not None and view.camera_valid is not None:
            points = view.camera_queries[:, v][view.camera_valid[:, v]].float().cpu().numpy()[:, ::-1]
        panel(grid[row, 2 + col], cam_maps[v], f"{name} map (mean {cam_maps[v].mean():.3g})", points, "upper",
              scale_bar=True)
        if view.camera_features is not None:
            panel(grid[2 + row, 2 + col], view.camera_features[v].cpu().numpy(), f"{name} features", points,
                  "upper")
    figure.suptitle(title or "AQR: weight maps (top) and the features they modulate (bottom); rendered queries as "
                    "red dots; each map on its own colour scale")
    return _figure_array(figure)


def sample_pictures(batch: Batch, index: int, detections: Detections, point_cloud_range: Sequence[float], *,
                    score_threshold: float = 0.3, aqr_view: Optional[AQRView] = None) -> dict[str, np.ndarray]:
    """The pictures of sample `index` of a CPU `batch`: "bev", "cameras" (with images), "aqr" (with a view).

    Only detections scoring at least `score_threshold` are drawn.
    """
    keep = detections.scores >= score_threshold
    shown = Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep])
    gt_boxes = batch.gt_boxes[index].numpy()
    gt_labels = batch.gt_labels[index].numpy()
    token = batch.metas[index].sample_token if batch.metas else ""
    pictures = {"bev": render_bev(batch.points[index].numpy(), point_cloud_range, gt_boxes, gt_labels, shown,
                                  title=f"{token}: ground truth dashed, predictions (score >= {score_threshold:g}) "
                                        "solid")}
    if batch.images is not None and batch.lidar2img is not None:
        pictures["cameras"] = render_cameras(denormalize_images(batch.images[index]),
                                             batch.lidar2img[index].double().numpy(), gt_boxes, shown)
    if aqr_view is not None:
        pictures["aqr"] = render_aqr(aqr_view, point_cloud_range=point_cloud_range,
                                     detections=shown.boxes[:, :2].detach().cpu().numpy())
    return pictures


SampleSink = Callable[[SampleMeta, Detections, dict[str, np.ndarray]], None]


def predict_with_pictures(detector: torch.nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu",
                          *, on_sample: SampleSink, score_threshold: float = 0.3
                          ) -> list[tuple[SampleMeta, Detections]]:
    """:func:`~aqrcmt.eval.predict.predict_dataset` that also hands each sample's pictures to `on_sample`.

    With AQR the forwards are monitored, so the first sample of every batch also gets its "aqr" picture
    (use batches of one for a picture per sample); a detector without ``pts_bbox_head`` (the onnx engine's
    OnnxDetector) gets none.
    """
    aqr = getattr(getattr(detector, "pts_bbox_head", None), "aqr", None)   # none in an exported graph
    point_cloud_range = detector.cfg.lidar.voxel.point_cloud_range

    def picture_batch(batch: Batch, detections: list[Detections]) -> None:
        view = aqr.monitor.last_view if aqr is not None else None
        for i, (meta, found) in enumerate(zip(batch.metas, detections)):
            on_sample(meta, found, sample_pictures(batch, i, found, point_cloud_range,
                                                   score_threshold=score_threshold,
                                                   aqr_view=view if i == 0 else None))

    with aqr.monitoring(True) if aqr is not None else contextlib.nullcontext():
        return predict_dataset(detector, loader, device, on_batch=picture_batch)


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 picture as a PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path, format="PNG")
    return path
