"""The building attributes: their vocabularies (Korean and English words), the caption templates, and the
parsers that read the attributes back from a (generated) caption, so captions are scored attribute by
attribute (``attribute_accuracy``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

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
CLASHES = {("red", "red")}


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
        for name, allowed in ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed or type(value) is not type(allowed[0]):  # True == 1: check the type too
                raise ValueError(f"BuildingAttrs.{name}={value!r} is not one of {list(allowed)}")
        if (self.colour, self.door) in CLASHES:
            raise ValueError(f"a {self.door} door on a {self.colour} wall is not drawn; choose another door colour")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ALLOWED: dict[str, tuple[Any, ...]] = {
    "colour": tuple(COLOURS), "floors": FLOORS, "roof": tuple(ROOFS), "time": tuple(TIMES),
    "motion": tuple(MOTIONS), "trees": tuple(TREES), "door": tuple(DOORS),
}
ATTRIBUTE_NAMES = tuple(f.name for f in fields(BuildingAttrs))


def all_attributes() -> Iterator[BuildingAttrs]:
    """Every valid attribute combination (4320 of them), in a fixed order."""
    for values in itertools.product(*(ALLOWED[name] for name in ATTRIBUTE_NAMES)):
        combo = dict(zip(ATTRIBUTE_NAMES, values, strict=True))
        if (combo["colour"], combo["door"]) not in CLASHES:
            yield BuildingAttrs(**combo)


def sample_attributes(rng: np.random.Generator) -> BuildingAttrs:
    """One combination, each attribute uniform and independent (door redrawn on a colour clash)."""
    combo = {name: ALLOWED[name][rng.integers(len(ALLOWED[name]))] for name in ATTRIBUTE_NAMES}
    while (combo["colour"], combo["door"]) in CLASHES:
        combo["door"] = ALLOWED["door"][rng.integers(len(DOORS))]
    return BuildingAttrs(**combo)


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
