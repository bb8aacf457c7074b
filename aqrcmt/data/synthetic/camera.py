"""The cameras: shaded objects over sky and ground, with lamps, night, rain and fog.

Each part of each object is a box whose faces are lit by the scene's sun (Lambert: ambient + diffuse), in its
class colour; lamps are emissive quads on the front (white) and rear (red) faces. Faces are painted far to near.
Night: a dark scene without sun in which the lamps still shine, plus sensor noise. Rain and fog: colours fade
towards a haze colour with distance (fog much faster) and the scene loses contrast.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from aqrcmt.data.synthetic.world import SceneConditions, SceneObject, rot_z

SKY, GROUND = (150, 185, 215), (95, 95, 95)                   # clear daylight background
_NIGHT_SKY, _NIGHT_GROUND = (8, 10, 18), (22, 22, 25)
_HAZE = (165, 168, 172)
_FRONT_LAMP, _REAR_LAMP = (255, 250, 225), (235, 25, 20)
_NIGHT_NOISE = 8.0                                            # std of the sensor noise at night (8-bit levels)
# Face -> (axis, sign) of its outward normal in the part's frame, and its corners' signs (x, y, z).
_FACES: tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...] = (
    (0, 1, ((1, -1, -1), (1, 1, -1), (1, 1, 1), (1, -1, 1))),
    (0, -1, ((-1, 1, -1), (-1, -1, -1), (-1, -1, 1), (-1, 1, 1))),
    (1, 1, ((1, 1, -1), (-1, 1, -1), (-1, 1, 1), (1, 1, 1))),
    (1, -1, ((-1, -1, -1), (1, -1, -1), (1, -1, 1), (-1, -1, 1))),
    (2, 1, ((-1, -1, 1), (1, -1, 1), (1, 1, 1), (-1, 1, 1))),
    (2, -1, ((-1, 1, -1), (1, 1, -1), (1, -1, -1), (-1, -1, -1))),
)


def background(conditions: SceneConditions) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(sky, ground) colours of a scene before haze and noise."""
    return (_NIGHT_SKY, _NIGHT_GROUND) if conditions.night else (SKY, GROUND)


def _haze(colour: np.ndarray, depth: float, conditions: SceneConditions) -> np.ndarray:
    """Fade towards the haze colour with distance (m): fog within tens of metres, rain over a few hundred."""
    length = 25.0 if conditions.fog else 150.0 if conditions.rain else math.inf
    fade = 1.0 - math.exp(-depth / length)
    haze = np.array(_HAZE) * (0.12 if conditions.night else 1.0)
    return colour * (1 - fade) + haze * fade


def _clip_near(poly: np.ndarray, near: float = 0.1) -> np.ndarray:
    """Clip a polygon (n, 3) in camera coordinates to z >= near (Sutherland-Hodgman against one plane)."""
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        if a[2] >= near:
            out.append(a)
        if (a[2] >= near) != (b[2] >= near):
            out.append(a + (near - a[2]) / (b[2] - a[2]) * (b - a))
    return np.array(out).reshape(-1, 3)


def _lamp_quads(obj: SceneObject, t: float) -> list[tuple[np.ndarray, int, tuple[int, int, int]]]:
    """(4, 3) global corners, facing sign (+1 front, -1 rear) and colour of each lamp of `obj` at time t."""
    w, l, h = obj.wlh
    rot, centre = rot_z(obj.yaw), obj.center(t) - np.array([0.0, 0.0, h / 2])
    quads = []
    for sign, lamps, colour in ((1, obj.cls.front_lamps, _FRONT_LAMP), (-1, obj.cls.rear_lamps, _REAR_LAMP)):
        for y0, y1, z0, z1 in lamps:
            local = np.array([[sign * l / 2, y * w, z * h] for y, z in ((y0, z0), (y1, z0), (y1, z1), (y0, z1))])
            quads.append((local @ rot.T + centre, sign, colour))
    return quads


def render_image(objects: list[SceneObject], t: float, cam2global: np.ndarray, intrinsic: np.ndarray,
                 size: tuple[int, int], conditions: SceneConditions, rng: np.random.Generator) -> Image.Image:
    """The image (W, H = size) of a level camera (cam2global (4, 4), x right, y down, z forward) at time t (s)."""
    width, height = size
    sky, ground = background(conditions)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in _haze(np.array(sky), 1e9, conditions)))
    draw = ImageDraw.Draw(image)
    ground_colour = _haze(np.array(ground), 30.0, conditions)
    draw.rectangle([0, int(round(intrinsic[1, 2])), width, height], fill=tuple(int(c) for c in ground_colour))
    global2cam = np.linalg.inv(cam2global)
    sun = np.array([math.cos(conditions.sun_elevation) * math.cos(conditions.sun_azimuth),
                    math.cos(conditions.sun_elevation) * math.sin(conditions.sun_azimuth),
                    math.sin(conditions.sun_elevation)])
    ambient, diffuse = (0.10, 0.0) if conditions.night else (0.45, 0.6)

    faces = []                                                   # (depth, polygon in camera frame, colour)
    for obj in objects:
        nearest = math.inf                                       # the object's nearest visible face
        for box in obj.part_boxes(t):
            rot = rot_z(float(box[6]))
            for axis, sign, corner_signs in _FACES:
                normal = rot[:, axis] * sign
                corners = box[:3] + (np.array(corner_signs) * box[3:6] / 2) @ rot.T
                poly = corners @ global2cam[:3, :3].T + global2cam[:3, 3]
                centre = poly.mean(axis=0)
                if np.dot(global2cam[:3, :3] @ normal, centre) >= 0:          # facing away from the camera
                    continue
                depth = float(np.linalg.norm(centre))
                shade = ambient + diffuse * max(0.0, float(normal @ sun))
                faces.append((depth, poly, _haze(np.array(obj.cls.colour) * min(shade, 1.0), depth, conditions)))
                nearest = min(nearest, depth)
        for quad, sign, colour in _lamp_quads(obj, t):            # painted over the object's own faces
            poly = quad @ global2cam[:3, :3].T + global2cam[:3, 3]
            facing = global2cam[:3, :3] @ (rot_z(obj.yaw)[:, 0] * sign)
            if np.dot(facing, poly.mean(axis=0)) < 0:
                faces.append((nearest - 1e-3, poly, _haze(np.array(colour, dtype=float), nearest, conditions)))
    for _, poly, colour in sorted(faces, key=lambda f: -f[0]):              # painter's algorithm: far first
        poly = _clip_near(poly)
        if len(poly) < 3:
            continue
        uv = poly @ intrinsic.T
        uv = uv[:, :2] / uv[:, 2:3]
        draw.polygon([(float(u), float(v)) for u, v in uv], fill=tuple(int(round(c)) for c in colour))
    if not conditions.night:
        return image
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, _NIGHT_NOISE, size=(height, width, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
