"""How a run reports itself off a terminal and on dashboards: plain log lines when stdout is a file, TensorBoard
event files beside metrics.jsonl (read back with tensorboard's own reader), an offline W&B run when asked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

from helpers import REPO_ROOT, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TOKENS = {
    "tokenizer.patch": 4,
    "tokenizer.dim": 8,
    "optim.epochs": 3,
    "run.log_every": 2,
    "run.save_every": 4,
    "run.progress": True,
}


def test_off_a_terminal_every_log_is_a_plain_line_and_every_scalar_reaches_tensorboard(pattern_tree, tmp_path):
    out = tmp_path / "run"
    online = {"online_probe.per_class": 1, "online_probe.max_share": 1}  # on for 8 images per class
    sets = [a for s in tiny_overrides(pattern_tree, out, **TOKENS, **online) for a in ("--set", s)]
    with open(tmp_path / "stdout.txt", "w") as log:  # what nohup or a batch scheduler gives a job
        res = subprocess.run(
            [sys.executable, "-m", "ldae_cli", "pretrain", "--config", "final.yaml", *sets],
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "stdout.txt").read_text()
    lines = re.findall(
        r"^pretrain step (\d+)/6 ep [\d.]+  loss [\d.e-]+  lr [\d.e-]+  .* img/s  data wait \d+%  eta "
        r"\S+$",
        text,
        flags=re.M,
    )
    logged = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == [2, 4, 6] and [int(s) for s in lines] == logged, text
    assert "\x1b[" not in text  # no terminal control codes in a log file
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == logged
    records = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert all(abs(e.value - records[e.step]["loss"]) < 1e-6 for e in events.Scalars("loss"))
    assert {"lr", "data_wait", "online_knn_top1"} <= set(events.Tags()["scalars"])
    panel = "denoising (clean | noisy | denoised), evaluation images"
    assert [e.step for e in events.Images(panel)] == [4, 6]  # at each save


def test_tensorboard_can_be_turned_off_and_wandb_logs_offline(pattern_tree, tmp_path, monkeypatch):
    from ldae_cli.config import load_config
    from ldae_cli.stages import pretrain as stage

    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: (
        calls["init"].append(kw)
        or types.SimpleNamespace(
            log=lambda values, step: calls["log"].append((step, values)), finish=lambda: calls.update(finish=1)
        )
    )
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    cfg = load_config(
        stage.PretrainConfig,
        "final.yaml",
        tiny_overrides(
            pattern_tree, out, **{**TOKENS, "run.progress": False, "run.tensorboard": False, "run.wandb": True}
        ),
    )
    stage.run(cfg, "run")
    assert not (out / "tensorboard").exists()
    assert calls["init"][0]["mode"] == "offline" and calls["init"][0]["dir"] == str(out)
    assert [step for step, values in calls["log"] if "loss" in values] == [2, 4, 6] and calls["finish"] == 1
