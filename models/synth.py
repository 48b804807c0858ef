"""Procedural building videos with Korean and English reference captions: the demo data set.

No real video data ships with capguard, so the demo captioner is trained on synthetic clips in the
field report's domain (buildings: "POSCO E&C grey building", "2000s hanok, brown gate"). Each clip
shows one building whose *attributes* (colour, floors, roof, time of day, camera motion, trees,
door colour) are drawn from small vocabularies; the reference captions are one deterministic
template per language, so a caption states every attribute and a parser can read them back to
score generated captions attribute by attribute.

Every attribute is a big simple shape or a strong colour that survives downscaling to 64x64 (the
demo encoder's input); nuisance variation (building position and width, window count, sky noise,
ground colour, tree sizes, pan speed) makes clips with the same attributes differ as pixels.

    attrs = sample_attributes(np.random.default_rng(0))
    frames = render_frames(attrs, np.random.default_rng(1), num_frames=16, size=128)  # (16, 128, 128, 3)
    write_video(frames, "clip.mp4", fps=8)
    caption_ko(attrs)  # "해질녘, 나무 옆에 선 빨간 문의 2층 갈색 기와지붕 한옥을 오른쪽으로 패닝한 영상"
    make_dataset("data/synth")  # train/*.mp4, val/*.mp4, train.jsonl, val.jsonl
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Vocabularies: value -> (Korean words, English words). Korean colour words are the adnominal forms
# used before a noun ("빨간 건물", "회색 건물").

COLOURS = {
    "grey": ("회색", "grey"),
    "beige": ("베이지색", "beige"),
    "brown": ("갈색", "brown"),
    "red": ("빨간", "red"),
    "blue": ("파란", "blue"),
    "white": ("흰", "white"),
    "yellow": ("노란", "yellow"),
}
FLOORS = (1, 2, 3, 4, 5, 6)
ROOFS = {"flat": ("평지붕", "flat"), "tiled": ("기와지붕", "tiled")}
TIMES = {"day": ("낮", "in daylight"), "sunset": ("해질녘", "at sunset"), "night": ("밤", "at night")}
MOTIONS = {
    "pan_left": ("왼쪽으로 패닝한", "panning left"),
    "pan_right": ("오른쪽으로 패닝한", "panning right"),
    "zoom_in": ("줌인한", "zooming in"),
}
TREES = {True: ("나무 옆에 선", "among trees"), False: ("홀로 선", "standing alone")}
DOORS = {"black": ("검은", "black"), "red": ("빨간", "red"), "green": ("초록색", "green")}
STOREYS_EN = {1: "single", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# A red door on a red wall would be invisible as a door colour, so that pair is never drawn.
_CLASHES = {("red", "red")}


@dataclass(frozen=True)
class BuildingAttrs:
    colour: str   # wall colour: the report's captions lead with it ("grey building", "beige building")
    floors: int   # 1..6, one row of windows per floor, so it is countable at 64x64
    roof: str     # "flat" or "tiled" (hanok roof with upturned eaves: a silhouette, not a texture)
    time: str     # "day" | "sunset" | "night": sky colour, wall lighting, lit windows at night
    motion: str   # "pan_left" | "pan_right" | "zoom_in": the only attribute that needs several frames
    trees: bool   # a tree on each side: a second object the caption must mention or not
    door: str     # "black" | "red" | "green": a small but saturated region, a test of detail

    def __post_init__(self) -> None:
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed or type(value) is not type(allowed[0]):  # True == 1: check the type too
                raise ValueError(f"BuildingAttrs.{name}={value!r} is not one of {list(allowed)}")
        if (self.colour, self.door) in _CLASHES:
            raise ValueError(f"a {self.door} door on a {self.colour} wall is not drawn; choose another door colour")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ALLOWED: dict[str, tuple[Any, ...]] = {
    "colour": tuple(COLOURS), "floors": FLOORS, "roof": tuple(ROOFS), "time": tuple(TIMES),
    "motion": tuple(MOTIONS), "trees": tuple(TREES), "door": tuple(DOORS),
}
ATTRIBUTE_NAMES = tuple(f.name for f in fields(BuildingAttrs))


def all_attributes() -> Iterator[BuildingAttrs]:
    """Every valid attribute combination (4320 of them), in a fixed order."""
    for values in itertools.product(*(_ALLOWED[name] for name in ATTRIBUTE_NAMES)):
        combo = dict(zip(ATTRIBUTE_NAMES, values, strict=True))
        if (combo["colour"], combo["door"]) not in _CLASHES:
            yield BuildingAttrs(**combo)


def sample_attributes(rng: np.random.Generator) -> BuildingAttrs:
    """One combination, each attribute uniform and independent (door redrawn on a colour clash)."""
    combo = {name: _ALLOWED[name][rng.integers(len(_ALLOWED[name]))] for name in ATTRIBUTE_NAMES}
    while (combo["colour"], combo["door"]) in _CLASHES:
        combo["door"] = _ALLOWED["door"][rng.integers(len(DOORS))]
    return BuildingAttrs(**combo)


# ---------------------------------------------------------------------------------------------------
# Captions


def _noun(attrs: BuildingAttrs, lang: str) -> str:
    """A low tiled-roof building is a hanok; a tall one is a building with a tiled roof."""
    hanok = attrs.roof == "tiled" and attrs.floors <= 2
    return ("한옥" if hanok else "건물") if lang == "ko" else ("hanok" if hanok else "building")


def caption_ko(attrs: BuildingAttrs) -> str:
    """The Korean reference caption: every attribute, one template.

    BuildingAttrs("brown", 2, "tiled", "sunset", "pan_right", True, "red") ->
    "해질녘, 나무 옆에 선 빨간 문의 2층 갈색 기와지붕 한옥을 오른쪽으로 패닝한 영상"
    """
    floors = "단층" if attrs.floors == 1 else f"{attrs.floors}층"
    return (
        f"{TIMES[attrs.time][0]}, {TREES[attrs.trees][0]} {DOORS[attrs.door][0]} 문의 {floors} "
        f"{COLOURS[attrs.colour][0]} {ROOFS[attrs.roof][0]} {_noun(attrs, 'ko')}을 {MOTIONS[attrs.motion][0]} 영상"
    )


def caption_en(attrs: BuildingAttrs) -> str:
    """The English reference caption, the same facts as caption_ko.

    BuildingAttrs("brown", 2, "tiled", "sunset", "pan_right", True, "red") ->
    "a two-storey brown hanok with a tiled roof and a red door, among trees at sunset, camera panning right"
    """
    return (
        f"a {STOREYS_EN[attrs.floors]}-storey {COLOURS[attrs.colour][1]} {_noun(attrs, 'en')} "
        f"with a {ROOFS[attrs.roof][1]} roof and a {DOORS[attrs.door][1]} door, "
        f"{TREES[attrs.trees][1]} {TIMES[attrs.time][1]}, camera {MOTIONS[attrs.motion][1]}"
    )


# ---------------------------------------------------------------------------------------------------
# Caption parsers: read back whatever attributes a (generated) caption states. Each table is
# (pattern, value), tried in order; the first match wins. Synonyms a captioner might produce are
# accepted, so a paraphrase is not scored as wrong.

_H = "가-힣"  # a Hangul syllable: Korean words are matched only when not part of a longer word
_KO_RULES: dict[str, list[tuple[str, Any]]] = {
    "door": [(r"(검은|검정색?|까만)\s?(대)?문", "black"), (r"(빨간|빨간색|붉은)\s?(대)?문", "red"),
             (r"(초록색?|녹색)\s?(대)?문", "green")],
    "colour": [(r"회색|잿빛", "grey"), (r"베이지색?", "beige"), (r"갈색", "brown"),
               (r"빨간|빨간색|붉은", "red"), (r"파란|파란색|푸른", "blue"), (r"흰|흰색|하얀", "white"),
               (r"노란|노란색", "yellow")],
    "floors": [(r"단층", 1), (r"(\d+)\s?층", "int")],
    "roof": [(r"기와", "tiled"), (r"평지붕|평평한 지붕", "flat"), (r"한옥", "tiled")],
    "time": [(r"해질녘|노을|석양|해 질 녘", "sunset"), (rf"(?<![{_H}])(밤|야간|한밤)(에|의)?(?![{_H}])", "night"),
             (rf"(?<![{_H}])(낮|한낮|주간)(에|의)?(?![{_H}])", "day")],
    "motion": [(r"왼쪽", "pan_left"), (r"오른쪽", "pan_right"), (r"줌\s?인|확대|다가", "zoom_in")],
    "trees": [(r"홀로|나무(가|도)? 없", False), (r"나무", True)],
}
_EN_RULES: dict[str, list[tuple[str, Any]]] = {
    "door": [(r"\b(black|dark) (door|gate)", "black"), (r"\bred (door|gate)", "red"),
             (r"\bgreen (door|gate)", "green")],
    "colour": [(r"\bgr[ae]y\b", "grey"), (r"\bbeige\b", "beige"), (r"\bbrown\b", "brown"),
               (r"\bred\b", "red"), (r"\bblue\b", "blue"), (r"\bwhite\b", "white"), (r"\byellow\b", "yellow")],
    "floors": [(r"\b(single|one)[- ]stor", 1), (r"\btwo[- ]stor", 2), (r"\bthree[- ]stor", 3),
               (r"\bfour[- ]stor", 4), (r"\bfive[- ]stor", 5), (r"\bsix[- ]stor", 6), (r"\b(\d+)[- ]stor", "int")],
    "roof": [(r"\btiled?\b", "tiled"), (r"\bflat[- ]roof|\bflat\b", "flat"), (r"\bhanok\b", "tiled")],
    "time": [(r"\bsunset\b|\bdusk\b", "sunset"), (r"\bnight\b", "night"), (r"\bday(light|time)?\b", "day")],
    "motion": [(r"\bpan(ning|s)? left\b", "pan_left"), (r"\bpan(ning|s)? right\b", "pan_right"),
               (r"\bzoom(ing|s)? in\b", "zoom_in")],
    "trees": [(r"\balone\b|\bno trees\b|\bwithout trees\b", False), (r"\btrees?\b", True)],
}


def _parse(text: str, rules: Mapping[str, list[tuple[str, Any]]]) -> dict[str, Any]:
    """Apply each attribute's table; a value of "int" means "the number the pattern captured"."""
    found: dict[str, Any] = {}
    for name, table in rules.items():
        for pattern, value in table:
            match = re.search(pattern, text)
            if match is None:
                continue
            if value == "int":
                value = int(match.group(1))
            found[name] = value
            if name == "door":  # "빨간 문" must not also be read as the wall colour
                text = text[: match.start()] + " " + text[match.end():]
            break
    return found


def attributes_from_caption_ko(text: str) -> dict[str, Any]:
    """The attributes a Korean caption states, and only those.

    "밤, 홀로 선 검은 문의 5층 회색 평지붕 건물을 줌인한 영상" ->
    {"door": "black", "colour": "grey", "floors": 5, "roof": "flat", "time": "night",
     "motion": "zoom_in", "trees": False};  "도시의 한 건물" -> {}
    """
    return _parse(text, _KO_RULES)


def attributes_from_caption_en(text: str) -> dict[str, Any]:
    """The attributes an English caption states, and only those.

    "a building in the city at night" -> {"time": "night"}
    """
    return _parse(text.lower(), _EN_RULES)


def attribute_accuracy(pred_caption: str, attrs: BuildingAttrs, lang: str = "ko") -> dict[str, bool]:
    """Per attribute: does the caption state the true value? An attribute it omits counts as wrong.

    ("낮, 홀로 선 ...", attrs with time="night") -> {"time": False, ...}
    """
    parsers = {"ko": attributes_from_caption_ko, "en": attributes_from_caption_en}
    if lang not in parsers:
        raise ValueError(f"lang={lang!r}: captions are parsed in 'ko' or 'en'")
    found = parsers[lang](pred_caption)
    truth = attrs.to_dict()
    return {name: name in found and found[name] == truth[name] for name in ATTRIBUTE_NAMES}


# ---------------------------------------------------------------------------------------------------
# Rendering. The scene is drawn once per clip on a "world" canvas wider than the view (room for the
# pans), at SUPERSAMPLE x the output size so the downscale anti-aliases the edges; each frame is a
# camera window cropped from it and resized. Lengths are fractions of the view size (vw, vh).

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


# ---------------------------------------------------------------------------------------------------
# Video files and the data set


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (yuv420p) whose bytes are reproducible run to run.

    yuv420p needs even sides: an odd height or width is padded by repeating the last row or column.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"write_video wants (T, H, W, 3) uint8 frames with T >= 1, got {frames.shape} {frames.dtype}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        # Reproducible bytes need one thread AND no macroblock tree: with mbtree on, this x264 build gave
        # up to 3 different files for the same frames in 15 single-threaded runs; with it off, 12 clips
        # x 15 runs gave one file per clip. Quality is not the point of these clips.
        options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _balanced_attributes(rng: np.random.Generator, n: int) -> list[BuildingAttrs]:
    """n combinations in which every attribute's values appear equally often (within one).

    Each attribute is drawn independently, so combinations are random, but no value goes missing from
    a split of at least 7 clips: validation combinations are new pairings of values seen in training.
    """
    columns: dict[str, list[Any]] = {}
    for name in ATTRIBUTE_NAMES:
        values = _ALLOWED[name]
        k = len(values)
        idx = np.concatenate([np.tile(np.arange(k), n // k), rng.choice(k, n % k, replace=False)])
        columns[name] = [values[i] for i in rng.permutation(idx)]
    rows = [dict(zip(ATTRIBUTE_NAMES, vals, strict=True)) for vals in zip(*columns.values(), strict=True)]
    for row in rows:
        while (row["colour"], row["door"]) in _CLASHES:
            row["door"] = _ALLOWED["door"][rng.integers(len(DOORS))]
    return [BuildingAttrs(**row) for row in rows]


def _video_seed(seed: int, split: str, index: int) -> list[int]:
    """The rendering seed of one clip: independent of worker count and of the other splits' sizes."""
    return [seed, zlib.crc32(split.encode()), index]


def _render_job(job: tuple[dict[str, Any], list[int], str, int, int, int]) -> str:
    attrs, seed, path, num_frames, size, fps = job
    frames = render_frames(BuildingAttrs(**attrs), np.random.default_rng(seed), num_frames, size)
    write_video(frames, path, fps)
    return path


def make_dataset(
    out_dir: str | Path,
    n_train: int = 865,
    n_val: int = 97,
    seed: int = 0,
    size: int = 128,
    seconds: float = 2.0,
    fps: int = 8,
    splits: Mapping[str, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Render the demo data set; returns {split: manifest path}.

    Writes out_dir/<split>/<split>-00000.mp4 ... and out_dir/<split>.jsonl, one line per clip:
    {"id", "path" (relative to out_dir), "caption_ko", "caption_en", "attributes"}. The default sizes
    are the field report's 865 training and 97 validation videos; `splits` ({"train": 10, "test": 5})
    replaces n_train/n_val. Same seed, same manifests and same video bytes, whatever `workers` is
    (default: one process per CPU core, at most 2; 1 renders in this process).
    """
    splits = dict(splits) if splits is not None else {"train": n_train, "val": n_val}
    if any(n < 0 for n in splits.values()):
        raise ValueError(f"split sizes must be >= 0, got {splits}")
    num_frames = max(1, round(seconds * fps))
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs, manifests, records = [], {}, {}
    for split, n in splits.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        records[split] = []
        for i, attrs in enumerate(_balanced_attributes(rng, n)):
            rel = f"{split}/{split}-{i:05d}.mp4"
            records[split].append({"id": f"{split}-{i:05d}", "path": rel, "caption_ko": caption_ko(attrs),
                                   "caption_en": caption_en(attrs), "attributes": attrs.to_dict()})
            jobs.append((attrs.to_dict(), _video_seed(seed, split, i), str(out_dir / rel), num_frames, size, fps))
    _log_split_overlap(records)

    workers = workers or min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="rendering videos", unit="video", disable=not progress)
    if workers == 1:
        for job in jobs:
            _render_job(job)
            bar.update()
    else:
        # fork where there is one: spawn re-runs the caller's unguarded script in every worker (a pool
        # that never starts). The workers only use numpy, PIL and PyAV, none of torch's threads.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=8):
                bar.update()
    bar.close()

    for split, rows in records.items():
        manifests[split] = out_dir / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d videos (%d frames of %dx%d at %d fps) to %s", len(jobs), num_frames, size, size, fps, out_dir)
    return manifests


def _log_split_overlap(records: Mapping[str, list[dict[str, Any]]]) -> None:
    """Log how the other splits relate to train: unseen values (bad) and repeated combinations."""
    if "train" not in records:
        return
    seen = {(k, v) for r in records["train"] for k, v in r["attributes"].items()}
    combos = {tuple(sorted(r["attributes"].items())) for r in records["train"]}
    for split, rows in records.items():
        if split == "train" or not rows:
            continue
        unseen = sorted({(k, v) for r in rows for k, v in r["attributes"].items()} - seen, key=str)
        repeated = sum(tuple(sorted(r["attributes"].items())) in combos for r in rows)
        if unseen:
            log.warning("split %s has attribute values never seen in train: %s; make train larger", split, unseen)
        log.info("split %s: %d/%d attribute combinations also occur in train (%.0f%%)",
                 split, repeated, len(rows), 100 * repeated / len(rows))
