"""Procedural building videos with Korean and English reference captions: the demo data set.

No real video data ships with capguard, so the demo captioner is trained on synthetic clips in the
field report's domain (buildings: "POSCO E&C grey building", "2000s hanok, brown gate"). Each clip
shows one building whose *attributes* (colour, floors, roof, time of day, camera motion, trees,
door colour) are drawn from small vocabularies; the reference captions are one deterministic
template per language, so a caption states every attribute and a parser can read them back to
score generated captions attribute by attribute.

Every attribute is a big simple shape or a strong colour that survives downscaling to 64x64 (the
demo encoder's input); see render.py.

    attrs = sample_attributes(np.random.default_rng(0))
    frames = render_frames(attrs, np.random.default_rng(1), num_frames=16, size=128)  # (16, 128, 128, 3)
    write_video(frames, "clip.mp4", fps=8)
    caption_ko(attrs)  # "해질녘, 나무 옆에 선 빨간 문의 2층 갈색 기와지붕 한옥을 오른쪽으로 패닝한 영상"    make_dataset("data/synth")  # train/*.mp4, val/*.mp4, train.jsonl, val.jsonl

The package: attributes.py (vocabularies, caption templates, parsers, attribute accuracy), render.py (the
procedural renderer) and dataset.py (mp4 writing and the train/val data set).
"""

from capguard.models.synth.attributes import (
    ALLOWED,
    ATTRIBUTE_NAMES,
    COLOURS,
    DOORS,
    FLOORS,
    MOTIONS,
    ROOFS,
    TIMES,
    TREES,
    BuildingAttrs,
    all_attributes,
    attribute_accuracy,
    attributes_from_caption_en,
    attributes_from_caption_ko,
    caption_en,
    caption_ko,
    sample_attributes,
)
from capguard.models.synth.dataset import make_dataset, write_video
from capguard.models.synth.render import DOOR_RGB, GLASS_RGB, WALL_RGB, render_frames

__all__ = [
    "ALLOWED", "ATTRIBUTE_NAMES", "COLOURS", "DOORS", "DOOR_RGB", "FLOORS", "GLASS_RGB", "MOTIONS", "ROOFS", "TIMES",
    "TREES", "WALL_RGB", "BuildingAttrs", "all_attributes", "attribute_accuracy", "attributes_from_caption_en",
    "attributes_from_caption_ko", "caption_en", "caption_ko", "make_dataset", "render_frames", "sample_attributes",
    "write_video",
]
