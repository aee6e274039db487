"""What `ldae pretrain --config final.yaml --dry-run` costs on this machine, and how its speed estimate (FLOPs and a
timed transformer MLP, `dryrun.estimate_images_per_second`) compares with the measured speed of a real training step.

    python benchmarks/dry_run.py [--repeats 2] [--final] [--json docs/bench-dry-run.json]

(a) Wall time of the dry run of final.yaml (the 350M-parameter network) on a small image tree (with
    --set optim.batch_size=8 to fit it), at the tree's native 64 px and at 256 px (256 tokens), against
    `--print-config` of the same command (the config, data and torch loaded, nothing planned), each in a fresh process.
(b) The `cpu` study budget's network (configs/study/budget/cpu.yaml): the estimate against optimizer steps of the
    real network at the budget's batch on synthetic images, timed here (median of 3 after a warm-up); the budget
    file records ~580 img/s for whole training runs on 2 idle cores. With --final, the same for final.yaml's network
    at 64 px (batch 32).
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_latency import write_tree  # noqa: E402


def wall(argv: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    if res.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {res.returncode}\n{res.stderr[-2000:]}")
    return time.perf_counter() - started, res.stdout


def speeds_of(config: str | None, overrides: list[str], batch: int) -> dict:
    """A pretrain network's training images per second: estimated, and measured on synthetic optimizer steps of
    `batch` images (the median of 3 after a warm-up)."""
    import torch

    from ldae_cli.config import load_config
    from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
    from ldae_cli.model.models import build_model
    from ldae_cli.model.objectives import build_objective
    from ldae_cli.model.tokenizers import load_tokenizer
    from ldae_cli.settings.training import PretrainConfig
    from ldae_cli.train.dryrun import estimate_images_per_second, seconds_per_image
    from ldae_cli.train.engine_pretrain import stand_in, synthetic_step

    cfg = load_config(PretrainConfig, config, [*overrides, "run.device=cpu", f"optim.batch_size={batch}"])
    estimated, sentence = estimate_images_per_second(cfg)
    tokenizer = (
        stand_in(cfg.tokenizer)
        if cfg.tokenizer.kind == "pca" and not cfg.tokenizer.path
        else load_tokenizer(cfg.tokenizer)[0]
    )  # a PCA the run would fit, else the configured one (MAE's pixels)
    denoiser = Denoiser(cfg.diffusion, tokenizer, NoiseSchedule(cfg.diffusion), cfg.data.image_size)
    objective = build_objective(cfg, denoiser, build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid))
    measured = 1 / seconds_per_image(synthetic_step(cfg, objective, batch, torch.device("cpu")), batch)
    return {
        "estimated_img_s": round(estimated, 1),
        "measured_img_s": round(measured, 1),
        "estimate_over_measured": round(estimated / measured, 2),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "estimate_says": sentence,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "docs" / "bench-dry-run.json"))
    parser.add_argument("--final", action="store_true", help="also time final.yaml's network (about a minute)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_tree(Path(tmp) / "tree")
        command = [
            sys.executable,
            "-m",
            "ldae_cli",
            "pretrain",
            "--config",
            "final.yaml",
            "--data",
            str(tree),
            "--set",
            "optim.batch_size=8",
        ]
        dry, large, config, shown = [], [], [], ""
        for _ in range(args.repeats):
            seconds, shown = wall([*command, "--dry-run"], Path(tmp))
            dry.append(seconds)
            large.append(wall([*command, "--set", "data.image_size=256", "--dry-run"], Path(tmp))[0])
            config.append(wall([*command, "--print-config"], Path(tmp))[0])
    budget = yaml.safe_load((ROOT / "configs" / "study" / "budget" / "cpu.yaml").read_text())["pretrain"]
    speeds = {"cpu budget": speeds_of(None, [f"{k}={v}" for k, v in budget.items()], budget["optim.batch_size"])}
    if args.final:  # the 350M-parameter network at the tree's native 64 px (16 tokens): about a minute on 2 cores
        speeds["final.yaml at 64 px"] = speeds_of("final.yaml", ["data.image_size=64"], 32)
    summary = {
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "load_average_1m": os.getloadavg()[0],
        "final_dry_run_s": round(statistics.median(dry), 2),
        "final_dry_run_at_256px_s": round(statistics.median(large), 2),
        "final_print_config_s": round(statistics.median(config), 2),
        "dry_run_over_print_config": round(statistics.median(dry) / statistics.median(config), 2),
        "final_time_row": next((line for line in shown.splitlines() if "img/s" in line), "").strip(" │|"),
        "speeds": speeds,
    }
    print(
        f"final.yaml --dry-run: {summary['final_dry_run_s']:.1f} s at the tree's 64 px, "
        f"{summary['final_dry_run_at_256px_s']:.1f} s at 256 px (medians of {args.repeats}); --print-config of the "
        f"same command {summary['final_print_config_s']:.1f} s: {summary['dry_run_over_print_config']}x"
    )
    for name, r in speeds.items():
        print(
            f"{name}: estimated {r['estimated_img_s']:,.1f} img/s, measured {r['measured_img_s']:,.1f} img/s "
            f"(synthetic steps of batch {r['batch']}, {r['threads']} threads): estimate / measured = "
            f"{r['estimate_over_measured']}"
        )
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
