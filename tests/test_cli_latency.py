"""The reliability matrix's fast-failure row: a config or --set error of a new run (pretrain, fit-pca, train-tokenizer,
probe, finetune, detect) comes before torch is imported or any image read, in under a second
(benchmarks/cli_latency.py measures pretrain's), and leaves every file as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import one_line, snapshot, unchanged, write_pattern_tree

# runs `ldae ARGS` through the console script's main and reports, on its last stdout line, whether torch was imported
# by the time the command exited
PROBE = """
import sys
from ldae_cli.cli import main
sys.argv = ["ldae", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules)
"""

TREE = "TREE"  # replaced by the image tree's path
PRETRAIN = ["pretrain", "--config", "final.yaml", "--data", TREE]
CASES = [  # (id, arguments after `ldae`, fragments of the one-line error)
    (
        "unknown-key",
        [*PRETRAIN, "--set", "model.widht=3"],
        ["unknown config key 'model.widht'", "did you mean 'model.width'"],
    ),
    ("bad-value", [*PRETRAIN, "--set", "optim.lr=-1"], ["optim.lr must be > 0", "-1"]),
    ("bad-type", [*PRETRAIN, "--set", "optim.epochs=many"], ["optim.epochs", "expected a number", "many"]),
    ("not-key-value", [*PRETRAIN, "--set", "optim.epochs"], ["--set 'optim.epochs'", "expected KEY=VALUE"]),
    ("bad-choice", [*PRETRAIN, "--set", "model.size=huge"], ["model.size", "'huge' is not one of", "'half-L'"]),
    (
        "no-such-config",
        ["pretrain", "--config", "final-typo.yaml", "--data", TREE],
        ["config file 'final-typo.yaml' not found", "did you mean 'final.yaml'"],
    ),
    (
        "fit-pca-unknown-key",
        ["fit-pca", "--data", TREE, "--set", "pca.dimm=8"],
        ["unknown config key 'pca.dimm'", "did you mean 'pca.dim'"],
    ),
    (
        "fit-pca-bad-value",
        ["fit-pca", "--config", "demo/fmnist-pca", "--data", TREE, "--set", "pca.dim=0"],
        ["pca.dim", "between 1 and", "got 0"],
    ),
    (
        "train-tokenizer-unknown-key",
        ["train-tokenizer", "--config", "tokenizer/patch-ae", "--data", TREE, "--set", "loss.kl_wieght=0"],
        ["unknown config key 'loss.kl_wieght'", "did you mean 'loss.kl_weight'"],
    ),
    (
        "train-tokenizer-bad-value",
        ["train-tokenizer", "--config", "tokenizer/patch-ae", "--data", TREE, "--set", "report.images=0"],
        ["report.images", "must be positive"],
    ),
    (
        "probe-unknown-key",
        ["probe", "--config", "probe/ldae", "--data", TREE, "--set", "probe.blr=[0.1]"],
        ["unknown config key 'probe.blr'", "did you mean 'probe.blrs'"],
    ),
    (
        "probe-bad-value",
        ["probe", "--config", "probe/ldae", "--data", TREE, "--set", "probe.momentum=1"],
        ["probe.momentum must be in [0, 1)", "1"],
    ),
    (
        "finetune-unknown-key",
        ["finetune", "--config", "finetune/fmnist", "--data", TREE, "--set", "aug.mixpu=0"],
        ["unknown config key 'aug.mixpu'", "did you mean 'aug.mixup'"],
    ),
    (
        "finetune-bad-value",
        ["finetune", "--config", "finetune/fmnist", "--data", TREE, "--set", "aug.mix_prob=2"],
        ["aug.mix_prob is a probability in [0, 1]", "2"],
    ),
    (
        "detect-unknown-key",
        ["detect", "--config", "detect/cpu-tiny", "--data", TREE, "--set", "backbone.windw_size=4"],
        ["unknown config key 'backbone.windw_size'", "did you mean 'backbone.window_size'"],
    ),
    (
        "detect-bad-value",
        ["detect", "--config", "detect/cpu-tiny", "--data", TREE, "--set", "optim.lr=-1"],
        ["optim.lr must be > 0", "-1"],
    ),
]


@pytest.mark.parametrize("args, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_config_error_comes_before_torch_and_within_a_second(tmp_path, args, fragments):
    tree = write_pattern_tree(tmp_path / "images", per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    started = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *(str(tree) if a == TREE else a for a in args)],
        capture_output=True,
        text=True,
        cwd=work,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )
    wall = time.perf_counter() - started
    one_line(res, 1, *fragments)
    assert res.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert wall < 2.0, f"{wall:.2f} s (benchmarks/cli_latency.py: 0.2 s on 2 idle cores)"  # generous for a loaded CI
    unchanged(before)
    assert not list(work.iterdir())  # no run directory, no file
