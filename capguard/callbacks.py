"""Training callbacks that stop on mode collapse: transformers ``Trainer`` and Lightning.

    from capguard.callbacks import DiversityCallback
    trainer = Trainer(model=model, args=TrainingArguments(..., eval_strategy="epoch"), ...)
    DiversityCallback(generate, probe_videos, ids=probe_ids).attach(trainer)
    trainer.train()      # stops by itself after 4 collapsed, non-recovering evaluations in a row, saying why

    from capguard.callbacks import LightningDiversityCallback   # needs `pip install capguard[lightning]`
    L.Trainer(callbacks=[LightningDiversityCallback(generate, probe_videos)]).fit(module)

Both wrap one ``capguard.models.monitor.DiversityMonitor`` (the core ``capguard train`` uses): at each
evaluation they caption the fixed probe set with ``generate(videos) -> captions`` (the model being
trained; ``stack_generate`` / ``captioner_generate`` make one for capguard's own models), compute the
guard's figures (capguard.models.diversity), log them through the trainer's loggers, write
``captions-epoch-N.jsonl`` (the ``capguard evaluate --captions`` format; default directory: the trainer's
output / log directory), and stop training after ``patience`` evaluations in a row that are collapsed and
not recovering (no collapse figure up ``min_recovery`` on the previous evaluation: a run climbing out of a
dip is left alone; see capguard.models.monitor for the rule and the recorded runs behind its defaults).

Logging. transformers: the figures go through ``trainer.log`` (every ``report_to`` integration sees them:
TensorBoard, W&B, MLflow, ...) and into the evaluation's metrics as ``eval_capguard/...`` (usable as
``metric_for_best_model``). A ``TrainerCallback`` is not given its Trainer, hence ``attach(trainer)`` (or
``trainer=``); without it the figures reach ``state.log_history`` and the metrics only. Lightning:
``pl_module.log``, i.e. whatever loggers the Trainer has. The figures run on every rank of a distributed
run (the probe set is small and each rank must reach the same stop decision); only rank 0 writes files.

Importing this module needs transformers (a capguard dependency) but not lightning:
``LightningDiversityCallback`` is built on first use and raises ImportError naming the extra if lightning
is missing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from transformers import TrainerCallback

from capguard.models.monitor import (
    MIN_RECOVERY,
    DiversityMonitor,
    Generate,
    MonitorResult,
    captioner_generate,
    stack_generate,
)
from capguard.models.rules import GuardThresholds

log = logging.getLogger(__name__)
PREFIX = "capguard/"   # logged names: capguard/unique_ratio, capguard/collapsed, ...


def _monitor(generate, videos, monitor, **options) -> DiversityMonitor:
    if monitor is not None:
        return monitor
    if options.get("thresholds") is None:
        options["thresholds"] = GuardThresholds()
    return DiversityMonitor(generate, videos, **options)


def _whole_epoch(epoch: float | None) -> int | None:
    """1.0 -> 1; 1.37 (an evaluation within an epoch) or None -> None (the file is named by step)."""
    if epoch is None or not math.isclose(epoch, round(epoch), abs_tol=1e-6):
        return None
    return int(round(epoch))


class DiversityCallback(TrainerCallback):
    """A transformers ``TrainerCallback``: the probe set's diversity at every evaluation, a stop on collapse.

    generate, videos, ids, references, video_paths, out_dir, patience, ignore_first, min_recovery, thresholds:
    as in ``DiversityMonitor`` (or pass a ready ``monitor``). out_dir None: ``args.output_dir``. Runs on
    ``on_evaluate``; with ``eval_strategy="no"`` on every epoch end instead.
    """

    def __init__(self, generate: Generate | None = None, videos: Sequence | None = None, *, ids=None,
                 references=None, video_paths=None, out_dir=None, patience: int | None = 4, ignore_first: int = 0,
                 min_recovery: float = MIN_RECOVERY, thresholds: GuardThresholds | None = None, prefix: str = PREFIX,
                 trainer=None, monitor: DiversityMonitor | None = None):
        self.monitor = _monitor(generate, videos, monitor, ids=ids, references=references,
                                video_paths=video_paths, out_dir=out_dir, patience=patience,
                                ignore_first=ignore_first, min_recovery=min_recovery, thresholds=thresholds)
        self.prefix, self.trainer = prefix, trainer
        self.stopped: MonitorResult | None = None   # the evaluation that stopped training, if one did
        self._warned_unbound = False

    def attach(self, trainer) -> DiversityCallback:
        """Add this callback to trainer and log through it (``trainer.log``); returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.monitor.out_dir is None:
            self.monitor.out_dir = args.output_dir

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._check(state, control, metrics)

    def on_epoch_end(self, args, state, control, **kwargs):
        if getattr(args.eval_strategy, "value", args.eval_strategy) == "no":
            self._check(state, control, None)

    def _check(self, state, control, metrics: dict | None) -> None:
        epoch = _whole_epoch(state.epoch)
        if epoch is not None and any(h.epoch == epoch for h in self.monitor.history):
            epoch = None                                  # a second evaluation in one epoch: named by step
        result = self.monitor.evaluate(epoch=epoch, step=state.global_step, write=state.is_world_process_zero)
        figures = result.metrics(self.prefix)
        if metrics is not None:
            metrics.update({f"eval_{k}": v for k, v in figures.items()})
        if self.trainer is not None:
            self.trainer.log(dict(figures))
        else:
            state.log_history.append({**figures, "epoch": state.epoch, "step": state.global_step})
            if not self._warned_unbound:
                self._warned_unbound = True
                log.warning("DiversityCallback has no trainer: its figures reach state.log_history and the eval "
                            "metrics, not the trainer's loggers; use DiversityCallback(...).attach(trainer)")
        if result.should_stop:
            control.should_training_stop = True
            self.stopped = result


def _lightning_callback_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("LightningDiversityCallback needs Lightning: pip install 'capguard[lightning]' "
                              "(or lightning / pytorch-lightning)") from None
    return Callback


def _build_lightning_callback():
    class LightningDiversityCallback(_lightning_callback_base()):
        """A Lightning ``Callback``: the probe set's diversity after every validation epoch, a stop on
        collapse (``trainer.should_stop``). Arguments as ``DiversityCallback``; out_dir None: the trainer's
        log_dir (else default_root_dir). The sanity-check validation is skipped."""

        def __init__(self, generate: Generate | None = None, videos: Sequence | None = None, *, ids=None,
                     references=None, video_paths=None, out_dir=None, patience: int | None = 4,
                     ignore_first: int = 0, min_recovery: float = MIN_RECOVERY, thresholds: GuardThresholds | None = None,
                     prefix: str = PREFIX, monitor: DiversityMonitor | None = None):
            super().__init__()
            self.monitor = _monitor(generate, videos, monitor, ids=ids, references=references,
                                    video_paths=video_paths, out_dir=out_dir, patience=patience,
                                    ignore_first=ignore_first, min_recovery=min_recovery, thresholds=thresholds)
            self.prefix = prefix
            self.stopped: MonitorResult | None = None

        def on_fit_start(self, trainer, pl_module):
            if self.monitor.out_dir is None:
                self.monitor.out_dir = trainer.log_dir or trainer.default_root_dir

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            epoch = trainer.current_epoch + 1                 # 1-based, as the caption files and the reports
            if any(h.epoch == epoch for h in self.monitor.history):
                epoch = None                                  # val_check_interval < 1: named by step
            result = self.monitor.evaluate(epoch=epoch, step=trainer.global_step, write=trainer.is_global_zero)
            for name, value in result.metrics(self.prefix).items():
                pl_module.log(name, value, logger=True, prog_bar=name == f"{self.prefix}unique_ratio")
            if result.should_stop:
                trainer.should_stop = True
                self.stopped = result

    # pickling and Lightning's callback state key go by module + qualified name, not the factory's locals
    LightningDiversityCallback.__qualname__ = "LightningDiversityCallback"
    LightningDiversityCallback.__module__ = __name__
    return LightningDiversityCallback


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    if name == "LightningDiversityCallback":
        if name not in _LAZY:
            _LAZY[name] = _build_lightning_callback()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# LightningDiversityCallback is left out: a star import must work without lightning installed
__all__ = ["PREFIX", "DiversityCallback", "DiversityMonitor", "MonitorResult", "captioner_generate", "stack_generate"]
