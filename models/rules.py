"""The guard's rules: ``GuardThresholds``, the rule names and ``tripped_rules``.

Kept apart from diversity.py (which needs rapidfuzz and sacrebleu to compute the figures) so that
validating a checkpoint's ``capguard.json`` guard section, or building server settings, imports
nothing heavier than dataclasses. The default values here are the only ones: the live guard
(capguard.server.guard) and the server settings (guard_* fields) read them from this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capguard.models.diversity import DiversityReport

# The live guard's window and pacing (capguard.server.guard.GuardSettings), here so the server settings can
# name them without importing the guard's metrics.
WINDOW = 100         # distinct videos judged together; the field report judged 97
MIN_CAPTIONS = 30    # no verdict below this: 3 repeats among 10 captions is noise, not collapse
# Hysteresis: a tripped rule clears after passing this many consecutive evaluations (observations after
# warm-up). 10 = a tenth of the default window: long enough that a ratio hovering on its line does not
# flap the status, short enough that a fixed checkpoint is cleared soon after its window turns healthy.
CLEAR_AFTER = 10

RULES = ("unique_ratio", "near_unique_ratio", "top_mode_share", "grounding_r1", "content_unique_ratio",
         "degenerate_share")  # names tripped_rules returns, in this order
NEAR_DUP_THRESHOLD = 0.9  # Indel similarity for "same caption": a 2-syllable swap in 35 is 0.94


def check_near_dup_threshold(threshold: float) -> None:
    """Raise unless 0 < threshold <= 1. Example: 0.9 -> None; 0 -> ValueError."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}; "
                         f"{NEAR_DUP_THRESHOLD} is the default")


@dataclass
class GuardThresholds:
    """When a window counts as collapsed (the documented defaults); any one rule tripping flags it."""

    min_unique_ratio: float = 0.5       # the field report's healthy line; every collapsed epoch sat below it
    min_near_unique_ratio: float = 0.5  # same line, counting one-word variants once (epochs 5-6)
    max_top_mode_share: float = 0.2    # one caption for more than 1 video in 5 is a mode, whatever the rest do
    # R@1 floor. Chance is 1/n (0.033 at the guard's 30-caption minimum, 0.01 at 100), so 0.1 is 3-10x
    # chance: a healthy captioner clears it even on a window of look-alike videos (all buildings), while
    # generic captions, which SigLIP rewards, cannot: R@1 <= (captions seen once) / n, and the report's
    # 9-of-97 epoch is capped at 0.093.
    min_grounding_r1: float = 0.1
    near_dup_threshold: float = NEAR_DUP_THRESHOLD
    # Distinct content-morpheme keys / captions (capguard.models.semantic): the exact-unique line read on content,
    # particles, endings and word order ignored. Healthy demo 0.96-0.98 (greedy or sampled), 97 re-wordings of one
    # generic sentence 0.12 (bench/RESULTS.md "Guard, second pass"): 0.5 sits far from both.
    min_content_unique_ratio: float = 0.5
    # Share of the window's captions that loop (capguard.models.degenerate: repeated sentence or phrase; a caption
    # merely cut at max_new_tokens does not count). A healthy captioner loops ~never (0 of the 776 recorded
    # demo/collapsed val captions), so 1 in 10 is already a broken decoder or checkpoint, while one odd video
    # (1 in 100) is not.
    max_degenerate_share: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_unique_ratio", "min_near_unique_ratio", "max_top_mode_share", "min_grounding_r1",
                     "min_content_unique_ratio", "max_degenerate_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GuardThresholds.{name} is a ratio in [0, 1], got {value}")
        check_near_dup_threshold(self.near_dup_threshold)


THRESHOLD_NAMES = tuple(f.name for f in fields(GuardThresholds))


def check_threshold_names(names: Iterable[str]) -> None:
    """Raise ValueError naming any key that is not a GuardThresholds field (a typo must not be ignored).

    Example: ["min_unique_ratio"] -> None; ["near_dup"] -> ValueError("unknown guard threshold(s)
    ['near_dup']; known: [...]").
    """
    unknown = set(names) - set(THRESHOLD_NAMES)
    if unknown:
        raise ValueError(f"unknown guard threshold(s) {sorted(unknown)}; known: {sorted(THRESHOLD_NAMES)}")


# rule -> (GuardThresholds field, "<" when the figure must stay at or above it, ">" when at or below)
RULE_LIMITS = {"unique_ratio": ("min_unique_ratio", "<"), "near_unique_ratio": ("min_near_unique_ratio", "<"),
               "top_mode_share": ("max_top_mode_share", ">"), "grounding_r1": ("min_grounding_r1", "<"),
               "content_unique_ratio": ("min_content_unique_ratio", "<"),
               "degenerate_share": ("max_degenerate_share", ">")}


def tripped_rules(report: DiversityReport, thresholds: GuardThresholds) -> list[str]:
    """Names of the guard rules the report breaks, in ``RULES`` order; nan/None figures never trip.

    grounding_r1 is checked only when the report has grounding; content_unique_ratio and degenerate_share only
    when the report carries them (None: not computed).

    Example: unique_ratio=0.01, near_unique_ratio=0.01, top_mode_share=1.0, grounding_r1=None,
    content_unique_ratio=0.01, degenerate_share=0.0 ->
    ["unique_ratio", "near_unique_ratio", "top_mode_share", "content_unique_ratio"].
    """
    tripped = []
    for rule, (field, op) in RULE_LIMITS.items():
        value, limit = getattr(report, rule), getattr(thresholds, field)
        if value is not None and (value < limit if op == "<" else value > limit):
            tripped.append(rule)
    return tripped


def explain_rule(report: DiversityReport, thresholds: GuardThresholds, rule: str) -> str:
    """One tripped rule in words, for logs and stop messages.

    Example: unique_ratio=0.01 -> "unique_ratio 0.01 < 0.5"; degenerate_share=0.3 -> "degenerate_share 0.30 > 0.1".
    """
    field, op = RULE_LIMITS[rule]
    value = getattr(report, rule)
    shown = "n/a" if value is None else f"{value:.2f}"
    return f"{rule} {shown} {op} {getattr(thresholds, field)}"


__all__ = ["CLEAR_AFTER", "RULE_LIMITS", "explain_rule", "MIN_CAPTIONS", "NEAR_DUP_THRESHOLD", "WINDOW", "RULES", "THRESHOLD_NAMES", "GuardThresholds", "check_near_dup_threshold",
           "check_threshold_names", "tripped_rules"]
