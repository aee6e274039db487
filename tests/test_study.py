"""`ldae study` at toy size (two variants, two seeds, a baseline): it runs, skips what is finished, resumes what
was interrupted, and its table is the runs' own numbers; the online probe agrees with the offline one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import train_tiny
from ldae_cli.checkpoint import load_checkpoint

TOY_BUDGET = {
    "name": "toy",
    "description": "32x32 stripes, a 1 + 1 block model at width 32, 3 steps; fast probe, 3 epochs.",
    "pretrain": {"data.image_size": 32, "data.num_workers": 0, "tokenizer.patch": 4, "tokenizer.dim": 8,
                 "tokenizer.fit_patches": 4000, "model.size": "custom", "model.width": 32, "model.encoder_depth": 1,
                 "model.decoder_depth": 1, "model.num_heads": 2, "optim.batch_size": 8, "optim.epochs": 1.5,
                 "optim.warmup_epochs": 0.5, "run.compile": False, "run.progress": False, "run.log_every": 1,
                 "run.device": "cpu"},
    "probe_config": "probe/small-fast.yaml",
    "probe": {"probe.epochs": 3, "probe.batch_size": 8, "probe.blrs": [0.1, 10.0], "data.num_workers": 0,
              "run.progress": False, "run.device": "cpu"},
    "pretrain_minutes": 0.1,
    "probe_minutes": 0.1,
}
TOY_STUDY = {
    "name": "toy",
    "description": "l-DAE against the pixel DAE, at toy size.",
    "pretrain": "final.yaml",
    "variants": [{"name": "l-DAE", "paper": 64.5, "paper_row": "T3.5"},
                 {"name": "pixel DAE", "set": {"tokenizer.kind": "pixel", "tokenizer.dim": None,
                                               "tokenizer.latent_scale": "none"}}],
    "baselines": ["random-init"],
}


@pytest.fixture
def toy(tmp_path, pattern_tree):
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(TOY_BUDGET))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TOY_STUDY))
    return ["study", str(tmp_path / "study.yaml"), "--budget", str(tmp_path / "budget.yaml"), "--seeds", "2",
            "--out", str(tmp_path / "out"), "--source", "imagefolder", "--data", str(pattern_tree)]


def test_a_study_runs_resumes_skips_and_tables_the_runs_own_numbers(toy, run_main, tmp_path):
    out = tmp_path / "out"
    stopped = run_main(*toy, "--set", "run.stop_after_steps=1")  # interrupted: its first pretrain stops at step 1
    assert stopped.returncode == 1 and "stopped before its last step" in stopped.stderr
    first = out / "pretrain" / "l-dae-s0" / "checkpoint.safetensors"
    assert load_checkpoint(first).extra["step"] == 1
    done = run_main(*toy)
    assert done.returncode == 0, done.stderr
    assert "pretrain l-DAE, seed 0 (resume)" in done.stdout
    assert load_checkpoint(first).extra["finished"] and load_checkpoint(first).extra["step"] == 3
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["l-DAE", "pixel DAE", "random init (same network)"]
    for row in results["rows"]:
        runs = {r["seed"]: json.loads((Path(r["probe"]) / "results.json").read_text()) for r in row["runs"]}
        assert sorted(runs) == [0, 1]
        linear = [runs[s]["best_top1"] for s in (0, 1)]
        assert row["linear_mean"] == round(sum(linear) / 2, 2)
        assert row["linear_std"] == round(abs(linear[0] - linear[1]) / 2 ** 0.5, 2)
        assert row["knn_mean"] == round((runs[0]["knn_top1"] + runs[1]["knn_top1"]) / 2, 2)
    table = (out / "results.md").read_text()
    l_dae = results["rows"][0]
    assert f"| l-DAE | {l_dae['linear_mean']:.2f} ± {l_dae['linear_std']:.2f} |" in table and "64.5 (T3.5)" in table
    assert (out / "results.png").stat().st_size > 1000
    again = run_main(*toy)  # everything is finished: nothing runs again
    assert again.returncode == 0 and "0 pretrain run(s) and 0 probe(s) to go" in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


def test_every_bundled_study_and_budget_loads(run_main):
    from ldae_cli.stages.study import load
    from ldae_cli.study import BudgetConfig, StudyConfig

    from ldae_cli.config import BUNDLED_CONFIGS

    for name in sorted(p.stem for p in (BUNDLED_CONFIGS / "study").glob("*.yaml")):
        assert load("study", name, StudyConfig).variants
    assert {load("budget", b, BudgetConfig).name for b in ("cpu", "gpu", "paper")} == {"cpu", "gpu", "paper"}
    res = run_main("study", "no-such-study")
    assert res.returncode == 1 and "pixel-vs-latent" in res.stderr


def test_the_online_probe_agrees_with_the_offline_one(pattern_tree, tmp_path):
    """The k-NN logged at the last step (live weights) is the k-NN of the saved checkpoint, read back and folded
    as `ldae probe` reads it, on the same eval subset."""
    from ldae_cli.config import config_from_dict
    from ldae_cli.data import DataConfig, build_dataset
    from ldae_cli.distributed import DistContext
    from ldae_cli.engine_probe import OnlineProbe, OnlineProbeConfig
    from ldae_cli.pretrained import load_pretrained

    ckpt = train_tiny("final.yaml", pattern_tree, tmp_path / "pre", **{"tokenizer.patch": 4, "tokenizer.dim": 8,
                                                                       "optim.epochs": 2, "optim.ema": 0.9})
    logged = [json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in logged if "online_knn_top1" in r]
    assert [r["step"] for r in online] == [1, 2, 3, 4]  # a quarter of 4 steps apart, and the last one
    pre = load_pretrained(ckpt)  # the EMA weights, as the probe reads them
    cfg = config_from_dict(DataConfig, load_checkpoint(ckpt).config["data"])
    subset = build_dataset(replace(cfg, limit=OnlineProbeConfig().images), "eval", augment=False, seed=0)
    offline = OnlineProbe(OnlineProbeConfig(), None, subset, None, 0, 0)
    knn, linear = offline.measure(pre, DistContext())
    assert online[-1]["online_knn_top1"] == round(knn, 2)
    assert online[-1]["online_linear_top1"] == round(linear, 2)
    assert torch.isfinite(torch.tensor([knn, linear])).all()
