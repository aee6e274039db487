"""The reliability matrix's fast-failure row: a config or --set error of `ldae pretrain` comes before torch is imported
or any image read, in under a second (benchmarks/cli_latency.py measures it), and leaves every file as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import one_line, snapshot, unchanged, write_pattern_tree

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

CASES = [  # (id, arguments after `pretrain --config final.yaml --data TREE`, fragments of the one-line error)
    ("unknown-key", ["--set", "model.widht=3"], ["unknown config key 'model.widht'", "did you mean 'model.width'"]),
    ("bad-value", ["--set", "optim.lr=-1"], ["optim.lr must be > 0", "-1"]),
    ("bad-type", ["--set", "optim.epochs=many"], ["optim.epochs", "expected a number", "many"]),
    ("not-key-value", ["--set", "optim.epochs"], ["--set 'optim.epochs'", "expected KEY=VALUE"]),
    ("bad-choice", ["--set", "model.size=huge"], ["model.size", "'huge' is not one of", "'half-L'"]),
    ("no-such-config", ["--config", "final-typo.yaml"], ["config file 'final-typo.yaml' not found",
                                                         "did you mean 'final.yaml'"]),
]


@pytest.mark.parametrize("args, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_config_error_comes_before_torch_and_within_a_second(tmp_path, args, fragments):
    tree = write_pattern_tree(tmp_path / "images", per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE, "pretrain", "--config", "final.yaml", "--data", str(tree),
                          *args], capture_output=True, text=True, cwd=work, env={**os.environ, "COLUMNS": "200"},
                         timeout=60)
    wall = time.perf_counter() - started
    one_line(res, 1, *fragments)
    assert res.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert wall < 2.0, f"{wall:.2f} s (benchmarks/cli_latency.py: 0.2 s on 2 idle cores)"  # generous for a loaded CI
    unchanged(before)
    assert not list(work.iterdir())  # no run directory, no file
