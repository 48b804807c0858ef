"""Offline evaluation: caption one data set with several checkpoints and say which of them collapsed.

    report = evaluate(["runs/mlp/epoch-1", "runs/mlp/epoch-2"], "data/synth/val.jsonl", "out/eval")
    report["checkpoints"][0]["diversity"], report["verdicts"], report["warnings"]
    watch("runs/mlp", "data/synth/val.jsonl", "out/eval", interval=30)  # one report, a row per new epoch

This reproduces the field report's tables (docs/field-report.en.md): per checkpoint the unique captions, the
diversity, SigLIP and a representative caption, plus what that report lacked: near-duplicate modes,
grounding R@1, a verdict from the live guard's own rules, and the SigLIP-vs-diversity relation whose
sign was the report's trap (E5-v3: SigLIP rose while diversity fell).

Every diversity figure comes from capguard.models.diversity, the functions the server's guard uses. This module
adds only what needs references or several checkpoints: BLEU and chrF (sacrebleu), CIDEr-D (hand-written,
see ``cider_d``), attribute accuracy (capguard.models.synth) and a Spearman rank correlation (numpy, ``spearman``).

Outputs in out_dir, each rewritten atomically after every checkpoint so a reader (the server, a browser
refresh) never sees half a file: report.json (the dict ``evaluate`` returns), captions.jsonl (one line
per checkpoint x video) and report.html (capguard.models.report.render_html).

The package, one concern per module: dataset.py (what is captioned), metrics.py (reference and
cross-checkpoint metrics), rows.py (a row per checkpoint and the report, pure functions), runner.py
(``Evaluator`` and ``evaluate``: decoding once, checkpoints in turn, atomic writes), watch.py (a
training run's new checkpoints as they appear) and captions.py (``evaluate_captions``: caption files
written by any pipeline, one row per file, the same rows and report).
"""

from capguard.models.evaluate.dataset import VIDEO_EXTENSIONS, Dataset, VideoItem, load_dataset, natural_key
from capguard.models.evaluate.metrics import (
    attribute_scores,
    bleu_tokenizer,
    caption_tokens,
    cider_d,
    metric_notes,
    rank_average,
    reference_metrics,
    spearman,
)
from capguard.models.evaluate.rows import (
    REPORT_VERSION,
    ROW_KEYS,
    build_report,
    checkpoint_row,
    report_warnings,
)
from capguard.models.evaluate.runner import Evaluator, component_paths, evaluate
from capguard.models.evaluate.watch import find_checkpoints, watch

__all__ = [
    "REPORT_VERSION", "ROW_KEYS", "VIDEO_EXTENSIONS", "Dataset", "Evaluator", "VideoItem", "attribute_scores",
    "bleu_tokenizer", "build_report", "caption_tokens", "checkpoint_row", "cider_d", "component_paths", "evaluate",
    "find_checkpoints", "load_dataset", "metric_notes", "natural_key", "rank_average", "reference_metrics",
    "report_warnings", "spearman", "watch",
]
