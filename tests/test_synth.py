"""The synthetic building videos: captions, parsers, renderer, video files and the data set writer."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from capguard.models import synth
from capguard.models.synth import (
    ATTRIBUTE_NAMES,
    BuildingAttrs,
    all_attributes,
    attribute_accuracy,
    attributes_from_caption_en,
    attributes_from_caption_ko,
    caption_en,
    caption_ko,
    make_dataset,
    render_frames,
    sample_attributes,
    write_video,
)
from capguard.models.synth import dataset as synth_dataset

ALL = list(all_attributes())
EXAMPLE = BuildingAttrs(colour="brown", floors=2, roof="tiled", time="sunset", motion="pan_right", trees=True, door="red")
PLAIN = BuildingAttrs(colour="red", floors=3, roof="flat", time="day", motion="pan_left", trees=False, door="black")


# --- attributes and captions -------------------------------------------------------------------------


def test_all_attributes_is_every_valid_combination() -> None:
    assert len(ALL) == len(set(ALL)) == 7 * 6 * 2 * 3 * 3 * 2 * 3 - 6 * 2 * 3 * 3 * 2  # minus red door on red
    assert not any(a.colour == a.door == "red" for a in ALL)


@pytest.mark.parametrize(
    ("field", "value"), [("colour", "purple"), ("floors", 7), ("floors", True), ("roof", "dome"), ("door", "red"), ("trees", 1)]
)
def test_invalid_attributes_are_refused(field: str, value: object) -> None:
    base = replace(PLAIN, door="black")  # PLAIN is red: door="red" is the clash case
    with pytest.raises(ValueError, match=field if field != "door" else "red door on a red wall"):
        replace(base, **{field: value})


def test_sample_attributes_is_deterministic_and_covers_values() -> None:
    draws = [sample_attributes(np.random.default_rng(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    many = [sample_attributes(rng) for _ in range(400)]
    for name in ATTRIBUTE_NAMES:
        assert {getattr(a, name) for a in many} == set(synth.ALLOWED[name])


def test_example_captions() -> None:
    assert caption_ko(EXAMPLE) == "해질녘, 나무 옆에 선 빨간 문의 2층 갈색 기와지붕 한옥을 오른쪽으로 패닝한 영상"
    assert caption_en(EXAMPLE) == (
        "a two-storey brown hanok with a tiled roof and a red door, among trees at sunset, camera panning right"
    )
    tall = replace(EXAMPLE, floors=5)  # a five-storey tiled roof is a building, not a hanok
    assert "5층 갈색 기와지붕 건물" in caption_ko(tall) and "five-storey brown building" in caption_en(tall)
    assert caption_ko(replace(PLAIN, floors=1)).startswith("낮, 홀로 선 검은 문의 단층 빨간 평지붕 건물을")


@pytest.mark.parametrize("caption", [caption_ko, caption_en])
def test_captions_are_injective(caption) -> None:
    texts = [caption(a) for a in ALL]
    assert len(set(texts)) == len(ALL)


def test_korean_captions_are_short() -> None:
    longest = max(len(re.findall("[가-힣]", caption_ko(a))) for a in ALL)
    assert longest < 40


# --- caption parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "parse"), [(caption_ko, attributes_from_caption_ko), (caption_en, attributes_from_caption_en)]
)
def test_parser_round_trip(caption, parse) -> None:
    wrong = [a for a in ALL if parse(caption(a)) != a.to_dict()]
    assert wrong == []


def test_parsers_return_only_what_a_caption_states() -> None:
    assert attributes_from_caption_ko("도시의 한 건물과 그 주변") == {}
    assert attributes_from_caption_ko("낮은 건물") == {}            # "낮은" (low) is not "낮" (day)
    assert attributes_from_caption_ko("밤에 촬영한 파란 한옥") == {"time": "night", "colour": "blue", "roof": "tiled"}
    assert attributes_from_caption_en("A building in the city at night") == {"time": "night"}
    # The door's colour word must not be read as the wall's colour, in either order.
    assert attributes_from_caption_ko("빨간 문이 달린 회색 건물") == {"door": "red", "colour": "grey"}
    assert attributes_from_caption_en("a grey building, red door") == {"door": "red", "colour": "grey"}


def test_attribute_accuracy_scores_each_attribute() -> None:
    other = replace(EXAMPLE, time="night", floors=3)
    scores = attribute_accuracy(caption_ko(other), EXAMPLE)
    assert scores == {name: name not in ("time", "floors") for name in ATTRIBUTE_NAMES}
    assert all(attribute_accuracy(caption_en(EXAMPLE), EXAMPLE, lang="en").values())
    collapsed = attribute_accuracy("도시의 한 건물과 그 주변", EXAMPLE)  # a mode-collapse caption states nothing
    assert not any(collapsed.values())
    with pytest.raises(ValueError, match="'ko' or 'en'"):
        attribute_accuracy("x", EXAMPLE, lang="fr")


# --- rendering ------------------------------------------------------------------------------------------


def test_render_is_deterministic_by_seed() -> None:
    a = render_frames(EXAMPLE, np.random.default_rng(3), num_frames=4, size=64)
    b = render_frames(EXAMPLE, np.random.default_rng(3), num_frames=4, size=64)
    c = render_frames(EXAMPLE, np.random.default_rng(4), num_frames=4, size=64)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1.0  # nuisance variation: same attributes, other pixels


def test_night_is_darker_than_day() -> None:
    day = render_frames(replace(PLAIN, time="day"), np.random.default_rng(0), 1, 128)[0]
    night = render_frames(replace(PLAIN, time="night"), np.random.default_rng(0), 1, 128)[0]
    assert night.mean() < 0.5 * day.mean()
    wall = _wall_mask(day, "red")  # same seed, same geometry: the walls themselves are dimmer at night
    assert wall.sum() > 400 and night[wall].mean(0).max() < 0.75 * day[wall].mean(0).max()


def _wall_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """(H, W) bool: pixels close to the daylight wall colour."""
    return np.abs(frame.astype(int) - synth.WALL_RGB[colour]).sum(-1) < 60


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_camera_motion_moves_the_building(seed: int) -> None:
    size, shift = 64, {}
    for motion in ("pan_left", "pan_right", "zoom_in"):
        frames = render_frames(replace(PLAIN, motion=motion), np.random.default_rng(seed), 8, size)
        first, last = _wall_mask(frames[0], "red"), _wall_mask(frames[-1], "red")
        assert first.sum() > 50 and last.sum() > 50
        shift[motion] = (np.nonzero(last)[1].mean() - np.nonzero(first)[1].mean()) / size
        if motion == "zoom_in":
            assert last.sum() > 1.4 * first.sum()  # the building grows in frame
    # Panning left slides the scene right in frame, panning right slides it left, by a quarter view or more.
    assert shift["pan_left"] > 0.25 and shift["pan_right"] < -0.25
    assert abs(shift["zoom_in"]) < 0.15


@pytest.mark.parametrize("floors", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("roof", ["flat", "tiled"])
def test_floors_are_countable_rows_of_windows_at_64px(floors: int, roof: str) -> None:
    """The demo encoder sees 64x64: every floor must still be its own dark row of windows there."""
    attrs = replace(PLAIN, floors=floors, roof=roof, colour="beige", door="red", motion="zoom_in")
    for seed in range(3):
        frame = render_frames(attrs, np.random.default_rng(seed), 1, 128)[0]
        small = np.asarray(Image.fromarray(frame).resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
        glass = np.abs(small - synth.GLASS_RGB["day"]).sum(-1) < 150      # (64, 64) dark window pixels
        rows = glass.sum(1) >= 2                                            # (64,) rows holding windows
        runs = int(rows[0]) + int(np.count_nonzero(rows[1:] & ~rows[:-1]))
        assert runs == floors, f"seed {seed}: {runs} rows of windows for {floors} floors"


# --- video files and the data set ----------------------------------------------------------------------


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_write_video_round_trip_and_odd_sizes(tmp_path: Path) -> None:
    frames = render_frames(PLAIN, np.random.default_rng(0), 5, 64)
    decoded = _decode(write_video(frames, tmp_path / "a.mp4", fps=8))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # crf 18: close to the rendered pixels
    odd = _decode(write_video(frames[:, :63, :61], tmp_path / "odd.mp4"))  # yuv420p needs even sides
    assert odd.shape == (5, 64, 62, 3)
    with pytest.raises(ValueError, match="uint8"):
        write_video(frames.astype(np.float32), tmp_path / "bad.mp4")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_dataset_writes_videos_and_manifests(tmp_path: Path) -> None:
    kwargs = {"n_train": 6, "n_val": 3, "seed": 5, "size": 64, "seconds": 1.0, "fps": 8, "progress": False}
    manifests = make_dataset(tmp_path / "a", workers=1, **kwargs)
    assert set(manifests) == {"train", "val"}
    for split, n in (("train", 6), ("val", 3)):
        rows = [json.loads(line) for line in manifests[split].read_text(encoding="utf-8").splitlines()]
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        for row in rows:
            assert set(row) == {"id", "path", "caption_ko", "caption_en", "attributes"}
            attrs = BuildingAttrs(**row["attributes"])
            assert row["caption_ko"] == caption_ko(attrs) and row["caption_en"] == caption_en(attrs)
            assert row["path"].startswith(f"{split}/")
            frames = _decode(tmp_path / "a" / row["path"])
            assert frames.shape == (8, 64, 64, 3)

    # Same seed: identical manifests and video bytes, whether rendered in this process or in a pool.
    make_dataset(tmp_path / "b", workers=2, **kwargs)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    make_dataset(tmp_path / "c", workers=1, **{**kwargs, "seed": 6})
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()


def test_splits_are_balanced_per_attribute() -> None:
    train = synth_dataset._balanced_attributes(np.random.default_rng(0), 865)
    val = synth_dataset._balanced_attributes(np.random.default_rng(1), 97)
    for name in ("colour", "floors", "roof", "time", "motion", "trees"):  # door is redrawn on clashes
        counts = Counter(getattr(a, name) for a in val)
        assert set(counts) == set(synth.ALLOWED[name]) and max(counts.values()) - min(counts.values()) <= 1
    seen = {(name, getattr(a, name)) for a in train for name in ATTRIBUTE_NAMES}
    assert all((name, getattr(a, name)) in seen for a in val for name in ATTRIBUTE_NAMES)
    repeated = len({a for a in val} & set(train))
    assert repeated < 0.35 * len(val)  # mostly new combinations of seen values
