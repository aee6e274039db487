"""What `ldae study --jobs N` buys on this machine: one tiny study (l-DAE and the pixel DAE, 2 seeds: 4 pretrains and 4
probes on a 2,000-image subset of CIFAR-10 at 32 px) run one after another, then with --jobs N, each from an empty
study folder, timed start to end in a fresh `ldae study` process (process starts, PCA fits and probes included).

One after another each child gets every core (torch's threads = cores); N at once each gets cores / N. On a CPU the
thread count can change a float's last bits, so the two studies' numbers are compared and the answer printed.

    python benchmarks/study_parallel.py [--jobs 2] [--json docs/bench-study-parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

STUDY = {
    "name": "bench-parallel",
    "description": "l-DAE against the pixel DAE at benchmark size: what --jobs buys.",
    "pretrain": "final.yaml",
    "reference": "l-DAE",
    "variants": [
        {"name": "l-DAE"},
        {
            "name": "pixel DAE",
            "set": {"tokenizer.kind": "pixel", "tokenizer.dim": None, "tokenizer.latent_scale": "none"},
        },
    ],
}
BUDGET = {
    "name": "bench",
    "pretrain": {
        "data.image_size": 32,
        "data.limit": 2000,
        "data.num_workers": 0,
        "tokenizer.patch": 8,
        "tokenizer.dim": 16,
        "tokenizer.fit_patches": 20000,
        "model.size": "custom",
        "model.width": 64,
        "model.encoder_depth": 2,
        "model.decoder_depth": 2,
        "model.num_heads": 2,
        "optim.batch_size": 64,
        "optim.epochs": 6,
        "optim.warmup_epochs": 0.5,
        "run.compile": False,
        "run.log_every": 10,
        "online_probe.enabled": False,
    },
    "probe_config": "probe/small-fast.yaml",
    "probe": {"data.limit": 2000, "data.num_workers": 0, "probe.epochs": 10},
    "images_per_second": 1000.0,
    "probe_minutes": 0.3,
}


def run_study(folder: Path, jobs: int) -> tuple[float, list]:
    out = folder / f"jobs{jobs}"
    command = [
        sys.executable, "-m", "ldae_cli", "study", str(folder / "study.yaml"), "--budget", str(folder / "budget.yaml"),
        "--source", "cifar10", "--seeds", "2", "--out", str(out), "--jobs", str(jobs),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    done = subprocess.run(command, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"ldae study --jobs {jobs} failed:\n{done.stderr[-3000:]}")
    rows = json.loads((out / "results.json").read_text())["rows"]
    return seconds, [(row["name"], row["linear"]["mean"], row["knn"]["mean"]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "study.yaml").write_text(yaml.safe_dump(STUDY))
        (folder / "budget.yaml").write_text(yaml.safe_dump(BUDGET))
        serial, serial_rows = run_study(folder, 1)
        parallel, parallel_rows = run_study(folder, args.jobs)
    result = {
        "machine": f"{os.cpu_count()} CPU cores",
        "study": "2 variants (l-DAE, pixel DAE) x 2 seeds: 4 pretrains + 4 probes, CIFAR-10 subset of 2,000 at 32 px",
        "budget": BUDGET,
        "serial_seconds": round(serial, 1),
        f"jobs{args.jobs}_seconds": round(parallel, 1),
        "ratio_serial_over_parallel": round(serial / parallel, 2),
        "same_numbers": serial_rows == parallel_rows,
        "rows_serial": serial_rows,
        f"rows_jobs{args.jobs}": parallel_rows,
    }
    print(
        f"one after another: {serial:.1f} s; --jobs {args.jobs}: {parallel:.1f} s; ratio {serial / parallel:.2f}x "
        f"on {os.cpu_count()} cores; same numbers: {serial_rows == parallel_rows}"
    )
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
