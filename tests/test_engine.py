"""The training pieces every stage shares: lr schedule, accumulation, loss logging and the NaN guard."""

from __future__ import annotations

import math

import pytest
import torch

from ldae_cli.distributed import DistContext
from ldae_cli.engine import LossMeter, RunConfig, TrainLoop, accumulation, finished_already, lr_at
from ldae_cli.errors import LdaeError
from ldae_cli.reporting import MetricsLog, read_metrics


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


def run_loop(tmp_path, steps, add, saved=None, save_every=1000, stop_after=None, **values):
    """Run `steps` empty optimizer steps, calling add(meter, step) each; log every 2 steps."""
    run = RunConfig(log_every=2, save_every=save_every, progress=False, stop_after_steps=stop_after)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    meter = LossMeter(("loss", "kl"), torch.device("cpu"))
    saved = [] if saved is None else saved
    with TrainLoop("pretrain", run, tmp_path, DistContext(), 0, steps, 10, 4) as loop:
        while loop.running:
            add(meter, loop.step)
            if loop.end_step(metrics, meter, "Lower the lr.", saved.append, **values):
                break
    return read_metrics(metrics.path)


def test_end_step_logs_saves_and_stops_on_cadence(tmp_path):
    saved = []
    records = run_loop(tmp_path, 8, lambda meter, step: meter.add("loss", 1.0), saved, save_every=3)
    assert saved == [3, 6, 8]  # every save_every steps and at the end
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]  # every log_every steps and at each save
    saved.clear()
    records = run_loop(tmp_path / "stopped", 8, lambda meter, step: meter.add("loss", 1.0), saved, save_every=3,
                       stop_after=5)
    assert saved == [3, 5] and records[-1]["step"] == 5  # a stop saves first


def test_loss_meter_logs_means_per_term_since_the_last_line(tmp_path):
    def add(meter, step):
        meter.add("loss", torch.tensor(float(step) * 4), 4)  # a mean of `step` over 4 samples
        if step == 3:
            meter.add("kl", 0.5)

    records = run_loop(tmp_path, 4, add, lr=0.1)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["loss"] == pytest.approx(0.5) and "kl" not in records[0]
    assert records[1]["loss"] == pytest.approx(2.5) and records[1]["kl"] == pytest.approx(0.5)
    assert records[1]["lr"] == 0.1 and list(records[1])[:5] == ["step", "epoch", "loss", "kl", "lr"]


def test_non_finite_loss_stops_naming_the_steps_and_the_last_checkpoint(tmp_path):
    def add(meter, step):
        meter.add("loss", float("nan") if step == 2 else 1.0)

    with pytest.raises(LdaeError, match=r"loss became nan between steps 2 and 4; the last good checkpoint "
                                        r"\(step 0\) is kept in .*Lower the lr\."):
        run_loop(tmp_path, 6, add)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2]


def test_finished_already(capsys):
    assert not finished_already(3, 10, DistContext())
    assert finished_already(10, 10, DistContext())
    assert "already finished" in capsys.readouterr().out


def test_add_all_equals_adding_each_term():
    one, each = LossMeter(("loss", "kl"), torch.device("cpu")), LossMeter(("loss", "kl"), torch.device("cpu"))
    for values in ([1.0, 0.5], [3.0, 1.5]):
        one.add_all(torch.tensor(values, dtype=torch.float64), 0.5)
        for name, v in zip(each.names, values):
            each.add(name, v, 0.5)
    assert one.take() == each.take() == {"loss": 4.0, "kl": 2.0}
