"""Training callbacks under a real transformers Trainer and a real Lightning Trainer.

The model is tiny and its captions are its own: four linear heads read a video's feature vector and pick
its time of day, colour, floors and roof, and the caption is the sentence those words make. Trained on
the true attributes it captions the held-out probe videos apart (healthy); trained on data where every
target is the same "average" building (the field report's root cause: the model converges to the safe
generic caption) its captions collapse onto one sentence within an epoch or two. The callbacks, at their
default settings, must stop the second run, naming the rules, and let the first run finish.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from capguard.callbacks import DiversityCallback
from capguard.models.captions_file import read_captions_file
from capguard.models.evaluate.captions import evaluate_captions

WORDS = (("낮", "밤", "해질녘", "새벽"), ("빨간", "회색", "베이지색", "파란"), ("2층", "5층", "9층", "14층"),
         ("평지붕", "기와지붕", "돔지붕", "박공지붕"))
FEATURES = 16


def make_videos(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 16) features and (n, 4) attribute labels: one-hot attributes plus noise and distractor dims."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n, 4), generator=g)                                  # (n, 4)
    x = torch.cat([F.one_hot(labels, 4).flatten(1).float()[:, :12] + 0.3 * torch.randn(n, 12, generator=g),
                   torch.randn(n, FEATURES - 12, generator=g)], dim=1)                 # (n, 16)
    return x, labels


def caption(attributes: list[int]) -> str:
    t, c, f, r = (WORDS[k][v] for k, v in enumerate(attributes))
    return f"{t}에 홀로 선 {c} {f} {r} 건물"


class AttributeCaptioner(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.Linear(FEATURES, 16)           # 4 heads x 4 values

    def forward(self, x, labels=None):
        logits = self.heads(x).view(-1, 4, 4)           # (B, attribute, value)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) if labels is not None else None
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def captions(self, x: torch.Tensor) -> list[str]:
        return [caption(row) for row in self.heads(x).view(-1, 4, 4).argmax(-1).tolist()]


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, labels):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


PROBE_X, PROBE_LABELS = make_videos(40, seed=1)
PROBE_IDS = [f"probe-{i:02d}" for i in range(40)]
REFERENCES = [caption(row) for row in PROBE_LABELS.tolist()]


def training_set(collapsing: bool) -> Rows:
    x, labels = make_videos(240, seed=2)
    if collapsing:   # every target is the one "average" building
        labels = torch.zeros_like(labels)
    return Rows(x, labels)


def test_probe_references_are_healthy():
    """The premise: the true captions of the probe set pass every guard rule."""
    from capguard.models.diversity import diversity_report
    from capguard.models.rules import GuardThresholds, tripped_rules

    assert tripped_rules(diversity_report(REFERENCES), GuardThresholds()) == []


class LogRecorder:
    """Stands in for TensorBoard/W&B/MLflow: what a report_to integration receives in on_log."""

    def __init__(self):
        self.logs = []
        self.eval_metrics = []   # the dicts trainer.evaluate() returns (and metric_for_best_model reads)


def hf_run(tmp_path, collapsing: bool):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    recorder = LogRecorder()

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            recorder.logs.append(dict(logs or {}))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            recorder.eval_metrics.append(metrics)

    model = AttributeCaptioner()
    data = training_set(collapsing)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=6, per_device_train_batch_size=24,
                             learning_rate=0.3, optim="sgd", lr_scheduler_type="constant", eval_strategy="epoch",
                             save_strategy="no", logging_strategy="epoch", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=Rows(PROBE_X, PROBE_LABELS),
                      callbacks=[Recorder()])
    callback = DiversityCallback(lambda videos: model.captions(torch.stack(list(videos))), list(PROBE_X),
                                 ids=PROBE_IDS, references=REFERENCES).attach(trainer)
    trainer.train()
    return trainer, callback, recorder


@pytest.mark.slow
def test_hf_trainer_stops_a_collapsing_run_and_says_why(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="capguard")
    trainer, callback, recorder = hf_run(tmp_path, collapsing=True)
    assert callback.stopped is not None
    stopped_at = callback.stopped.epoch
    assert stopped_at is not None and stopped_at < 6 and trainer.state.epoch == pytest.approx(stopped_at)
    assert [h.status for h in callback.monitor.history][-4:] == ["collapsed"] * 4
    assert "unique_ratio" in callback.stopped.tripped and callback.stopped.recovering is False
    reason = callback.stopped.reason
    assert "stopping training" in reason and "unique_ratio" in reason and "patience 4" in reason
    assert reason in caplog.text
    # the figures reached the trainer's loggers and the eval metrics
    logged = [log for log in recorder.logs if "capguard/unique_ratio" in log]
    assert len(logged) == stopped_at and logged[-1]["capguard/collapsed"] == 1.0
    assert all("eval_capguard/unique_ratio" in metrics for metrics in recorder.eval_metrics)
    # one caption file per evaluation, in the format capguard evaluate --captions reads
    files = sorted((tmp_path / "hf").glob("captions-epoch-*.jsonl"))
    assert [f.name for f in files] == [f"captions-epoch-{e}.jsonl" for e in range(1, stopped_at + 1)]
    last = read_captions_file(files[-1])
    assert [r.video for r in last.rows] == PROBE_IDS and last.rows[0].reference == REFERENCES[0]
    report = evaluate_captions(files, tmp_path / "report", scorer="none")
    assert report["verdicts"][f"captions-epoch-{stopped_at}"] == "collapsed"


@pytest.mark.slow
def test_hf_trainer_lets_a_healthy_run_finish(tmp_path):
    trainer, callback, recorder = hf_run(tmp_path, collapsing=False)
    assert callback.stopped is None and trainer.state.epoch == pytest.approx(6)
    assert [h.status for h in callback.monitor.history] == ["ok"] * 6
    assert callback.monitor.history[-1].report.unique_ratio > 0.8
    assert len(list((tmp_path / "hf").glob("captions-epoch-*.jsonl"))) == 6


def lightning_run(tmp_path, collapsing: bool):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from capguard.callbacks import LightningDiversityCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = AttributeCaptioner()

        def training_step(self, batch, _):
            return self.net(batch["x"], batch["labels"])["loss"]

        def validation_step(self, batch, _):
            self.log("val_loss", self.net(batch["x"], batch["labels"])["loss"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    module = Module()
    loader = torch.utils.data.DataLoader(training_set(collapsing), batch_size=24, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(Rows(PROBE_X, PROBE_LABELS), batch_size=40)
    callback = LightningDiversityCallback(lambda videos: module.net.captions(torch.stack(list(videos))),
                                          list(PROBE_X), ids=PROBE_IDS)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path / "pl"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(module, loader, val)
    return trainer, callback


@pytest.mark.slow
def test_lightning_stops_a_collapsing_run_and_logs_through_its_logger(tmp_path):
    trainer, callback = lightning_run(tmp_path, collapsing=True)
    assert callback.stopped is not None and "unique_ratio" in callback.stopped.reason
    # current_epoch counts finished epochs; the sanity-check validation was not counted as an evaluation
    assert trainer.current_epoch == callback.stopped.epoch < 6 and len(callback.monitor.history) == trainer.current_epoch
    metrics = (tmp_path / "pl").rglob("metrics.csv")
    text = next(metrics).read_text()
    assert "capguard/unique_ratio" in text and "capguard/collapsed" in text
    files = sorted(p.name for p in (tmp_path / "pl").rglob("captions-epoch-*.jsonl"))
    assert files == [f"captions-epoch-{e}.jsonl" for e in range(1, callback.stopped.epoch + 1)]


@pytest.mark.slow
def test_lightning_lets_a_healthy_run_finish(tmp_path):
    trainer, callback = lightning_run(tmp_path, collapsing=False)
    assert callback.stopped is None and trainer.current_epoch == 6
    assert [h.status for h in callback.monitor.history] == ["ok"] * 6


@pytest.mark.slow
def test_callbacks_import_without_lightning():
    """capguard.callbacks imports with lightning hidden; the Lightning callback then names the extra."""
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "import capguard.callbacks as c\n"
            "try:\n    c.LightningDiversityCallback\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "ImportError" in out.stdout and "capguard[lightning]" in out.stdout


def test_monitor_checks_its_inputs(tmp_path):
    from capguard.models.monitor import DiversityMonitor

    with pytest.raises(ValueError, match="probe set"):
        DiversityMonitor(lambda v: v, ["one"])
    with pytest.raises(ValueError, match="ids"):
        DiversityMonitor(lambda v: v, ["a", "b"], ids=["x"])
    monitor = DiversityMonitor(lambda v: ["same"] * (len(v) - 1), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 captions for 3"):
        monitor.evaluate(epoch=1)
    monitor = DiversityMonitor(lambda v: [1, 2, 3], ["a", "b", "c"])
    with pytest.raises(TypeError, match="str"):
        monitor.evaluate(epoch=1)
    # a healthy evaluation resets the streak; ignore_first does not count the first ones
    same, distinct = ["a"] * 6, ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    outputs = iter([same, distinct, same, same])
    monitor = DiversityMonitor(lambda v: next(outputs), list("uvwxyz"), patience=2, ignore_first=1,
                               out_dir=tmp_path)
    results = [monitor.evaluate(epoch=e) for e in range(1, 5)]
    assert [r.streak for r in results] == [0, 0, 1, 2] and [r.should_stop for r in results] == [0, 0, 0, 1]
    assert json.loads((tmp_path / "captions-epoch-4.jsonl").read_text().splitlines()[0]) == {"video": "0",
                                                                                             "caption": "a"}
    assert importlib.import_module("capguard.callbacks").DiversityMonitor is DiversityMonitor


@pytest.mark.slow
def test_capguard_models_work_out_of_the_box(tmp_path, video_files):
    """stack_generate (a loaded CaptionStack, with its scorer: SigLIP and grounding) and captioner_generate
    (a Captioner being trained) caption the probe set as the monitor wants it."""
    from capguard.callbacks import captioner_generate, stack_generate
    from capguard.models.components import init_checkpoint
    from capguard.models.monitor import DiversityMonitor
    from capguard.models.stack import load_stack
    from capguard.models.video import sample_frames

    stack = load_stack(init_checkpoint(tmp_path / "tiny", "mlp2x_gelu", seed=0), device="cpu")
    probe = [sample_frames(p, 4, max_side=stack.frame_side).frames for p in video_files[:4]]
    monitor = DiversityMonitor(stack_generate(stack), probe, video_paths=video_files[:4], out_dir=tmp_path / "run",
                               patience=None)
    result = monitor.evaluate(epoch=1)
    assert result.siglip_mean is not None and result.report.grounding_r1 is not None and not result.should_stop
    rows = read_captions_file(tmp_path / "run" / "captions-epoch-1.jsonl").rows
    assert [r.video_path.resolve() for r in rows] == [p.resolve() for p in video_files[:4]]   # relative, resolvable
    assert [r.caption for r in rows] == result.captions
    stack.captioner.train()
    captions = captioner_generate(stack.captioner, stack.config.generation, batch_size=3)(probe)
    assert captions == result.captions and stack.captioner.training   # same greedy captions; mode restored
