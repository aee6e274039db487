"""How long a config or `--set` mistake takes to be reported: `ldae pretrain --config final.yaml` with a misspelt key
and with a bad value (and every other stage with a misspelt key), against the same command with a valid config
(`--print-config`, which loads the stage and torch, as every error did before) and against starting Python alone.

    python benchmarks/cli_latency.py [--repeats 5] [--json docs/bench-cli-latency.json]

Each command runs `--repeats` times in a fresh process (wall time, interpreter start included) on a small image tree
written to a temp folder; prints the median and best of each and the ratios, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def write_tree(root: Path) -> Path:
    """root/{train,val}/{a,b}/<i>.png: 4 random 64x64 images per class and split."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def wall(argv: list[str], cwd: Path, expect: int) -> float:
    started = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    if res.returncode != expect:
        raise SystemExit(f"{' '.join(argv)}: exit {res.returncode}, expected {expect}\n{res.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "docs" / "bench-cli-latency.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_tree(Path(tmp) / "tree")
        ldae = [sys.executable, "-m", "ldae_cli", "pretrain", "--config", "final.yaml", "--data", str(tree)]
        commands = {  # name -> (argv, expected exit code)
            "python -c pass": ([sys.executable, "-c", "pass"], 0),
            "--set model.widht=3 (unknown key)": ([*ldae, "--set", "model.widht=3"], 1),
            "--set optim.lr=-1 (bad value)": ([*ldae, "--set", "optim.lr=-1"], 1),
            "--print-config (valid: loads the stage and torch)": ([*ldae, "--print-config"], 0),
        }
        stages = {
            "fit-pca": [],
            "train-tokenizer": ["--config", "tokenizer/patch-ae.yaml"],
            "probe": ["--config", "probe/small-fast.yaml"],
            "finetune": ["--config", "finetune/cifar10.yaml"],
            "detect": ["--config", "detect/cpu-tiny.yaml"],
        }
        for stage, config in stages.items():  # the other stages' typo, reported as early
            commands[f"--set no_such_key=1 ({stage})"] = (
                [sys.executable, "-m", "ldae_cli", stage, *config, "--data", str(tree), "--set", "no_such_key=1"],
                1,
            )
        times = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved, so that a burst of other load hits every command alike
            for name, (argv, code) in commands.items():
                times[name].append(wall(argv, Path(tmp), code))
    results = {
        name: {"median_s": round(statistics.median(t), 3), "best_s": round(min(t), 3)} for name, t in times.items()
    }
    errors = [name for name in results if name.startswith("--set")]
    valid = results["--print-config (valid: loads the stage and torch)"]["median_s"]
    python = results["python -c pass"]["median_s"]
    summary = {
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "commands": results,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine meanwhile
        "slowest_error_median_s": max(results[name]["median_s"] for name in errors),
        "valid_over_error": round(valid / max(results[name]["median_s"] for name in errors), 1),
        "error_over_python_start": round(max(results[name]["median_s"] for name in errors) / python, 1),
    }
    for name, r in results.items():
        print(f"{name:52s} median {r['median_s']:6.2f} s   best {r['best_s']:6.2f} s")
    print(
        f"slowest error: {summary['slowest_error_median_s']:.2f} s (median) = {summary['error_over_python_start']}x "
        f"a bare Python start; the valid command, which loads torch as every error did before, takes "
        f"{summary['valid_over_error']}x as long"
    )
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
