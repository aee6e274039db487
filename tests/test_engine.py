"""The engine every training stage runs on: lr schedule, accumulation, the log/save/stop cadence, loss
logging, the NaN guard, the train state's save and restore, and evaluations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from ldae_cli.errors import LdaeError
from ldae_cli.runs.checkpoint import load_checkpoint
from ldae_cli.runs.distributed import DistContext
from ldae_cli.runs.logs import read_metrics
from ldae_cli.settings.optim import StepPlan, accumulation, lr_at
from ldae_cli.train.hooks import Description, Evaluation
from ldae_cli.train.session import RunConfig, Session
from ldae_cli.train.train_state import TrainState
from ldae_cli.train.trainer import LossMeter, Trainer


def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    total, warmup, peak, floor = 100, 10, 1.0, 0.1
    assert lr_at(0, total, warmup, peak, floor) == pytest.approx(0.1)
    assert lr_at(4, total, warmup, peak, floor) == pytest.approx(0.5)
    assert lr_at(warmup, total, warmup, peak, floor) == pytest.approx(peak)
    assert lr_at(55, total, warmup, peak, floor) == pytest.approx(floor + (peak - floor) * 0.5)
    assert lr_at(total, total, warmup, peak, floor) == pytest.approx(floor)
    mid = lr_at(30, total, warmup, peak, floor)
    assert mid == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 20 / 90)))


def test_accumulation_splits_the_global_batch():
    assert accumulation(256, None, 2) == (128, 1)
    assert accumulation(256, 32, 2) == (32, 4)
    with pytest.raises(LdaeError, match="not divisible by 3 ranks"):
        accumulation(256, None, 3)
    with pytest.raises(LdaeError, match="micro_batch 48 does not divide the per-rank batch 128"):
        accumulation(256, 48, 2)


@dataclass
class TinyConfig:
    run: RunConfig = field(default_factory=RunConfig)


def session_in(tmp_path, resume=None, **run) -> Session:
    cfg = TinyConfig(RunConfig(log_every=2, progress=False, device="cpu", **run))
    return Session("pretrain", "pretrain", cfg, DistContext(), tmp_path, resume)


class RecordingTrainer(Trainer):
    """Records the steps it saves at instead of writing checkpoints."""

    def save(self):
        self.saved = getattr(self, "saved", []) + [self.step]
        self.last_saved = self.step


def run_loop(tmp_path, steps, add, save_every=1000, stop_after=None, hooks=()):
    """Run `steps` empty optimizer steps, calling add(meter, step) each; log every 2 steps."""
    trainer = RecordingTrainer(
        session_in(tmp_path, save_every=save_every, stop_after_steps=stop_after),
        StepPlan(steps, 10, 4, lambda step: 0.1),
        TrainState({}, {}),
        hooks,
        losses=("loss", "kl"),
    )
    finished = trainer.fit(lambda step: add(trainer.meter, step))
    return read_metrics(tmp_path / "metrics.jsonl"), getattr(trainer, "saved", []), finished


def test_logs_saves_and_stops_on_cadence(tmp_path):
    records, saved, finished = run_loop(tmp_path, 8, lambda meter, step: meter.add("loss", 1.0), save_every=3)
    assert finished and saved == [3, 6, 8]  # every save_every steps and at the end
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]  # every log_every steps and at each save
    records, saved, finished = run_loop(
        tmp_path / "stopped", 8, lambda meter, step: meter.add("loss", 1.0), save_every=3, stop_after=5
    )
    # a stop saves, without a line off the cadence: the resumed run logs step 6 as an uninterrupted one does
    assert not finished and saved == [3, 5] and records[-1]["step"] == 4


def test_loss_meter_logs_means_per_term_since_the_last_line(tmp_path):
    def add(meter, step):
        meter.add("loss", torch.tensor(float(step) * 4), 4)  # a mean of `step` over 4 samples
        if step == 3:
            meter.add("kl", 0.5)

    records, _, _ = run_loop(tmp_path, 4, add)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["loss"] == pytest.approx(0.5) and "kl" not in records[0]
    assert records[1]["loss"] == pytest.approx(2.5) and records[1]["kl"] == pytest.approx(0.5)
    assert records[1]["lr"] == 0.1 and list(records[1])[:5] == ["step", "epoch", "loss", "kl", "lr"]


def test_non_finite_loss_stops_naming_the_steps_and_the_last_checkpoint(tmp_path):
    def add(meter, step):
        meter.add("loss", float("nan") if step == 2 else 1.0)

    with pytest.raises(
        LdaeError,
        match=r"loss became nan between steps 2 and 4; no checkpoint was written before "
        r"\(the run had not reached its first save\)\. Lower the lr",
    ):
        run_loop(tmp_path, 6, add)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2]


def test_add_all_equals_adding_each_term():
    one, each = LossMeter(("loss", "kl"), torch.device("cpu")), LossMeter(("loss", "kl"), torch.device("cpu"))
    for values in ([1.0, 0.5], [3.0, 1.5]):
        one.add_all(torch.tensor(values, dtype=torch.float64), 0.5)
        for name, v in zip(each.names, values):
            each.add(name, v, 0.5)
    assert one.take() == each.take() == {"loss": 4.0, "kl": 2.0}


def test_evaluations_run_on_cadence_and_the_last_one_after_the_final_checkpoint(tmp_path):
    events = []

    class Recording(RecordingTrainer):
        def save(self):
            events.append(("save", self.step))
            super().save()

    evaluation = Evaluation(
        lambda step: events.append(("eval", step)) or {"score": step}, every=lambda step: step % 3 == 0
    )
    trainer = Recording(
        session_in(tmp_path, save_every=1000), StepPlan(7, 10, 4, lambda s: 0.1), TrainState({}, {}), [evaluation]
    )
    assert trainer.fit(lambda step: trainer.meter.add("loss", 1.0))
    # an evaluation is saved with its step; the final one comes after the last checkpoint, then is saved too
    assert events == [("eval", 3), ("save", 3), ("eval", 6), ("save", 6), ("save", 7), ("eval", 7), ("save", 7)]
    assert evaluation.checkpoint(trainer) == ({}, {"eval": {"step": 7, "score": 7}})


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_train_state_round_trips_modules_optimizers_and_evaluations(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    evaluation = Evaluation(lambda step: {"top1": 50.0})
    state = TrainState(
        {"model": model}, {"optim": optimizer, "optim_disc": torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])}
    )
    trainer = Trainer(
        session_in(tmp_path),
        StepPlan(5, 2, 4, lambda s: 0.1),
        state,
        [evaluation, Description(lambda: ({"extra.table": torch.arange(3)}, {"note": "kept"}))],
    )
    trainer.step = 3
    evaluation.run(3)
    trainer.save()
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors", "pretrain")
    assert ck.extra["step"] == 3 and not ck.extra["finished"] and ck.extra["epoch"] == 1.5
    assert ck.extra["note"] == "kept" and ck.extra["eval"] == {"step": 3, "top1": 50.0}
    assert ck.extra["optimizers"]["optim_disc"] is None  # an optimizer that never stepped has no state yet
    assert torch.equal(ck.tensors["extra.table"], torch.arange(3))
    fresh, fresh_opt = _model_and_optimizer(1)
    assert TrainState.read(ck, {"model": fresh}, {"optim": fresh_opt}) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    exp_avg = lambda opt: next(iter(opt.state.values()))["exp_avg"]  # noqa: E731
    assert torch.equal(exp_avg(fresh_opt), exp_avg(optimizer))
    resumed = Trainer(
        session_in(tmp_path, resume=ck),
        StepPlan(5, 2, 4, lambda s: 0.1),
        TrainState({"model": fresh}, {"optim": fresh_opt}),
        [Evaluation(lambda step: {})],
    )
    assert resumed.step == 3 and resumed.hooks[0].eval == {"step": 3, "top1": 50.0}


def test_a_finished_run_does_nothing_unless_its_final_evaluation_is_missing(tmp_path, capsys):
    evaluation = Evaluation(lambda step: {"score": 1})
    trainer = RecordingTrainer(session_in(tmp_path), StepPlan(4, 2, 4, lambda s: 0.1), TrainState({}, {}), [evaluation])
    trainer.step = 4
    assert trainer.fit(lambda step: pytest.fail("a finished run trained again"))
    assert trainer.saved == [4] and evaluation.eval == {"step": 4, "score": 1}
    assert trainer.fit(lambda step: pytest.fail("a finished run trained again"))
    assert trainer.saved == [4] and "already finished" in capsys.readouterr().out


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    """Saves at steps 1 and 2; at step 3 the weights hold an infinity: the run stops naming the step-2 checkpoint,
    which is left as it was."""
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(
        session_in(tmp_path, save_every=1), StepPlan(5, 2, 4, lambda s: 0.1), TrainState({"model": model}, {})
    )

    def step(index):
        trainer.meter.add("loss", 1.0)
        if index == 2:
            with torch.no_grad():
                model.weight[0, 0] = float("inf")

    with pytest.raises(
        LdaeError,
        match=r"model.weight became non-finite by step 3; the last good checkpoint \(step 2\) "
        r"is kept in",
    ):
        trainer.fit(step)
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ck.extra["step"] == 2 and torch.isfinite(ck.tensors["model.weight"]).all()


def test_an_lr_schedule_overflow_stops_like_a_nan(tmp_path):
    trainer = RecordingTrainer(
        session_in(tmp_path), StepPlan(5, 2, 4, lambda s: 1e308 * 10 if s == 2 else 0.1), TrainState({}, {})
    )
    with pytest.raises(LdaeError, match=r"the lr schedule gives inf at step 2; no checkpoint was written before"):
        trainer.fit(lambda step: trainer.meter.add("loss", 1.0))
