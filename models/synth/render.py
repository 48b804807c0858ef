"""Rendering one clip: a building with given attributes, drawn procedurally, as (T, S, S, 3) uint8 frames.

Every attribute is a big simple shape or a strong colour that survives downscaling to 64x64 (the demo
encoder's input); nuisance variation (building position and width, window count, sky noise, ground
colour, tree sizes, pan speed) makes clips with the same attributes differ as pixels.

The scene is drawn once per clip on a "world" canvas wider than the view (room for the pans), at
SUPERSAMPLE x the output size so the downscale anti-aliases the edges; each frame is a camera window
cropped from it and resized. Lengths are fractions of the view size (vw, vh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from capguard.models.synth.attributes import BuildingAttrs

SUPERSAMPLE = 2
WORLD_WIDTH = 1.4     # in view widths: a pan travels up to 0.4 of the view
GROUND_Y = 0.86       # the horizon and the building's base
FLOOR_H = 0.09        # one storey: 6 floors + a tiled roof still fit in the tightest zoom

WALL_RGB = {
    "grey": (128, 128, 134), "beige": (224, 202, 160), "brown": (125, 78, 42), "red": (192, 42, 38),
    "blue": (42, 84, 186), "white": (245, 245, 240), "yellow": (238, 196, 40),
}
DOOR_RGB = {"black": (22, 20, 22), "red": (210, 30, 36), "green": (30, 150, 60)}
LIGHT = {"day": (1.0, 1.0, 1.0), "sunset": (1.0, 0.9, 0.8), "night": (0.6, 0.6, 0.68)}  # RGB multipliers
SKY = {  # (zenith, horizon) colours of the sky gradient
    "day": ((70, 140, 230), (175, 212, 245)),
    "sunset": ((70, 55, 130), (252, 150, 70)),
    "night": ((4, 6, 22), (26, 30, 62)),
}
GLASS_RGB = {"day": (28, 36, 56), "sunset": (40, 30, 48)}  # dark glass; at night the windows are lit
LIT_RGB = (255, 236, 165)
ROOF_RGB = (70, 74, 86)                                           # charcoal roof tiles
GROUND_RGB = ((100, 100, 106), (86, 122, 66), (172, 158, 120))   # asphalt, grass, sand
LEAF_RGB, TRUNK_RGB = (46, 128, 52), (96, 64, 38)

Box = tuple[float, float, float, float]   # (x0, y0, x1, y1) in world pixels
RGB = tuple[int, ...]


@dataclass(frozen=True)
class _Nuisance:
    """What varies between clips with the same attributes: the pixels differ, the captions do not."""

    offset: float         # building centre minus world centre, view widths: position is not an attribute
    width: float          # building width, view widths
    windows: int          # windows per upper floor (3 or 4): floors are counted by rows, not columns
    wall_jitter: RGB      # added to the wall colour: "red" is a range of reds, not one RGB triple
    sky_jitter: RGB       # likewise for the sky gradient
    ground: RGB           # ground colour: asphalt, grass or sand, jittered
    pan: float            # pan distance, view widths: speed is not an attribute
    zoom: float           # zoom-in: the final camera window's scale (1.0 = no zoom)


def _sample_nuisance(rng: np.random.Generator) -> _Nuisance:
    def jitter(amount: int) -> RGB:
        return tuple(int(v) for v in rng.integers(-amount, amount + 1, size=3))

    base = GROUND_RGB[rng.integers(len(GROUND_RGB))]
    return _Nuisance(
        offset=float(rng.uniform(-0.07, 0.07)), width=float(rng.uniform(0.32, 0.44)),
        windows=int(rng.integers(3, 5)), wall_jitter=jitter(10), sky_jitter=jitter(14),
        ground=_shade(base, (1.0, 1.0, 1.0), jitter(14)),
        pan=float(rng.uniform(0.28, 0.4)), zoom=float(rng.uniform(0.72, 0.8)),
    )


def _shade(rgb: RGB, light: tuple[float, ...], jitter: RGB = (0, 0, 0)) -> RGB:
    """A colour under a light, clipped to 0..255: (200, 100, 50) under (1.0, 0.9, 0.8) -> (200, 90, 40)."""
    return tuple(int(np.clip(round((c + j) * k), 0, 255)) for c, j, k in zip(rgb, jitter, light, strict=True))


def _sky(time: str, nz: _Nuisance, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """The sky gradient with low-frequency brightness noise: (h, w, 3) uint8."""
    jitter = np.array(nz.sky_jitter, np.float32) * (0.3 if time == "night" else 1.0)  # no green nights
    zenith, horizon = (np.array(c, np.float32) + jitter for c in SKY[time])
    t = np.clip(np.linspace(0.0, 1.0 / GROUND_Y, h, dtype=np.float32), 0, 1)[:, None, None]   # (h, 1, 1)
    sky = zenith * (1 - t) + horizon * t                                                      # (h, 1, 3)
    coarse = Image.fromarray(rng.normal(0, 1, size=(4, 6)).astype(np.float32), mode="F")
    noise = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC))[:, :, None]            # (h, w, 1)
    return np.clip(sky + noise * (3 if time == "night" else 7), 0, 255).astype(np.uint8)      # (h, w, 3)


def _draw_sky_objects(draw: ImageDraw.ImageDraw, time: str, rng: np.random.Generator, ww: int, vh: int) -> None:
    """A low orange sun at sunset; a moon and a few stars at night; nothing by day."""
    ground_y = GROUND_Y * vh
    if time == "sunset":
        x, r = rng.uniform(0.1, 0.9) * ww, 0.09 * vh
        draw.ellipse((x - r, ground_y - r * 0.9, x + r, ground_y + r * 1.1), fill=(255, 186, 90))
    elif time == "night":
        for x, y in zip(rng.uniform(0, ww, 24), rng.uniform(0, 0.5 * vh, 24), strict=True):
            draw.rectangle((x, y, x + SUPERSAMPLE - 1, y + SUPERSAMPLE - 1), fill=(200, 200, 215))
        x, y, r = rng.uniform(0.1, 0.9) * ww, rng.uniform(0.08, 0.2) * vh, 0.05 * vh
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(232, 232, 212))


def _draw_building(
    draw: ImageDraw.ImageDraw, attrs: BuildingAttrs, nz: _Nuisance, rng: np.random.Generator, walls: Box, vh: int
) -> None:
    """Walls, a slab line between floors, one row of windows per floor, the door mid ground floor."""
    x0, top, x1, ground_y = walls
    cx, floor_h = (x0 + x1) / 2, FLOOR_H * vh
    wall = _shade(WALL_RGB[attrs.colour], LIGHT[attrs.time], nz.wall_jitter)
    trim = _shade(wall, (0.5,) * 3 if attrs.time == "night" else (0.68,) * 3)  # slabs, parapet, door frame
    draw.rectangle((x0, top, x1, ground_y), fill=wall)
    for floor in range(1, attrs.floors):
        y = ground_y - floor * floor_h
        draw.rectangle((x0, y - 0.007 * vh, x1, y + 0.007 * vh), fill=trim)

    margin = 0.12 * (x1 - x0)
    centres = np.linspace(x0 + margin, x1 - margin, nz.windows)
    win_w = 0.55 * (x1 - x0 - 2 * margin) / (nz.windows - 1)
    door_w = 0.24 * (x1 - x0)
    for floor in range(attrs.floors):
        bottom = ground_y - floor * floor_h
        # The ground floor keeps only the windows clear of the door.
        row = centres if floor else centres[np.abs(centres - cx) > (door_w + win_w) / 2 + 0.02 * vh]
        for x in row:
            glass = _shade(LIT_RGB, (rng.uniform(0.8, 1.0),) * 3) if attrs.time == "night" else GLASS_RGB[attrs.time]
            draw.rectangle((x - win_w / 2, bottom - 0.78 * floor_h, x + win_w / 2, bottom - 0.28 * floor_h), fill=glass)

    door_top, frame = ground_y - 0.86 * floor_h, 0.012 * vh
    door_light = (0.92, 0.9, 0.85) if attrs.time == "night" else LIGHT[attrs.time]  # a porch lamp at night
    draw.rectangle((cx - door_w / 2 - frame, door_top - frame, cx + door_w / 2 + frame, ground_y), fill=trim)
    draw.rectangle((cx - door_w / 2, door_top, cx + door_w / 2, ground_y), fill=_shade(DOOR_RGB[attrs.door], door_light))

    if attrs.roof == "flat":
        draw.rectangle((x0 - 0.01 * vh, top - 0.03 * vh, x1 + 0.01 * vh, top), fill=trim)   # parapet
    else:
        draw.rectangle((x0, top, x1, top + 0.025 * vh), fill=_shade(wall, (0.45,) * 3))   # eave shadow
        roof_light = (0.9, 0.9, 0.95) if attrs.time == "night" else LIGHT[attrs.time]  # moonlit: a silhouette
        draw.polygon(_hanok_roof(cx, top, (x1 - x0) / 2, vh), fill=_shade(ROOF_RGB, roof_light))


def _roof_height(roof: str, vh: int) -> float:
    return (0.03 if roof == "flat" else 0.12) * vh


def _hanok_roof(cx: float, top: float, half: float, vh: int) -> list[tuple[float, float]]:
    """The tiled roof's outline: eaves whose corners sweep up past the walls, concave slopes, a ridge."""
    eave_half, ridge_half = half * 1.42, half * 0.62
    height, lift = _roof_height("tiled", vh), 0.06 * vh
    eave_y, ridge_y = top + 0.015 * vh, top - height
    u = np.linspace(-1.0, 1.0, 41)
    eave = [(cx + x * eave_half, eave_y - lift * abs(x) ** 3) for x in u]                    # left -> right
    s = np.linspace(0.0, 1.0, 12)[1:]
    right = [(cx + eave_half - (eave_half - ridge_half) * v, eave_y - lift - (height - lift) * v**1.7) for v in s]
    ridge = [(cx + ridge_half * 0.4, ridge_y + 0.01 * vh), (cx - ridge_half * 0.4, ridge_y + 0.01 * vh)]
    left = [(x0 - 2 * (x0 - cx), y) for x0, y in reversed(right)]                              # mirror image
    return eave + right + ridge + left


def _draw_trees(draw: ImageDraw.ImageDraw, rng: np.random.Generator, walls: Box, light: tuple[float, ...], vh: int) -> None:
    """One tree each side, its crown over the wall's edge but clear of the windows (0.12 margin)."""
    x0, _, x1, ground_y = walls
    for edge, side in ((x0, -1), (x1, 1)):
        r = rng.uniform(0.07, 0.09) * vh
        x, crown_y = edge + side * 0.55 * r, ground_y - rng.uniform(0.2, 0.27) * vh
        draw.rectangle((x - 0.012 * vh, crown_y, x + 0.012 * vh, ground_y + 0.02 * vh), fill=_shade(TRUNK_RGB, light))
        leaf = _shade(LEAF_RGB, light, tuple(int(v) for v in rng.integers(-12, 13, size=3)))
        for dx, dy, k in ((0.0, 0.0, 1.0), (-0.5, 0.45, 0.8), (0.5, 0.45, 0.8)):
            bx, by = x + dx * r, crown_y + dy * r
            draw.ellipse((bx - k * r, by - k * r, bx + k * r, by + k * r), fill=leaf)


def _draw_world(attrs: BuildingAttrs, nz: _Nuisance, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box]:
    """The whole scene, (world image, building box with its roof); the view is (vw, vh) = SUPERSAMPLE * size."""
    vw = vh = size * SUPERSAMPLE
    ww = round(WORLD_WIDTH * vw)
    img = Image.fromarray(_sky(attrs.time, nz, rng, ww, vh))
    draw = ImageDraw.Draw(img)
    _draw_sky_objects(draw, attrs.time, rng, ww, vh)
    ground_y = GROUND_Y * vh
    draw.rectangle((0, ground_y, ww, vh), fill=_shade(nz.ground, LIGHT[attrs.time]))
    cx, half = ww / 2 + nz.offset * vw, nz.width * vw / 2
    walls = (cx - half, ground_y - attrs.floors * FLOOR_H * vh, cx + half, ground_y)
    _draw_building(draw, attrs, nz, rng, walls, vh)
    if attrs.trees:
        _draw_trees(draw, rng, walls, LIGHT[attrs.time], vh)
    return img, (walls[0], walls[1] - _roof_height(attrs.roof, vh), walls[2], walls[3])


def _camera(motion: str, nz: _Nuisance, building: Box, u: float, size: int) -> Box:
    """The camera window in world pixels at clip time u in [0, 1]."""
    vw = vh = size * SUPERSAMPLE
    ww = round(WORLD_WIDTH * vw)
    centred, d = (ww - vw) / 2, min(nz.pan * vw, ww - vw)
    if motion in ("pan_left", "pan_right"):
        # Panning right moves the camera right, so the scene slides left in frame; and vice versa.
        x = centred - d / 2 + d * u if motion == "pan_right" else centred + d / 2 - d * u
        return (x, 0.0, x + vw, float(vh))
    scale = 1.0 - (1.0 - nz.zoom) * u                # zoom_in: shrink the window onto the building
    w, h = vw * scale, vh * scale
    bx, by = (building[0] + building[2]) / 2, (building[1] + building[3]) / 2
    cx, cy = ww / 2 + (bx - ww / 2) * u, vh / 2 + (by - vh / 2) * u
    x0, y0 = min(max(cx - w / 2, 0.0), ww - w), min(max(cy - h / 2, 0.0), vh - h)
    return (x0, y0, x0 + w, y0 + h)


def render_frames(
    attrs: BuildingAttrs, rng: np.random.Generator, num_frames: int = 16, size: int = 128
) -> np.ndarray:
    """The clip's frames: (T, H, W, 3) uint8 with T = num_frames and H = W = size.

    The same attrs and rng state give the same pixels; another rng state moves and resizes the
    building and changes sky, ground and pan speed, but never an attribute.
    """
    if num_frames < 1 or size < 16:
        raise ValueError(f"render_frames needs num_frames >= 1 and size >= 16, got {num_frames} and {size}")
    nz = _sample_nuisance(rng)
    world, building = _draw_world(attrs, nz, rng, size)
    out = np.empty((num_frames, size, size, 3), np.uint8)                                    # (T, H, W, 3)
    for t in range(num_frames):
        u = t / (num_frames - 1) if num_frames > 1 else 0.0
        box = _camera(attrs.motion, nz, building, u, size)
        out[t] = np.asarray(world.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out
