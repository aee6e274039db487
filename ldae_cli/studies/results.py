"""A study's numbers, read back from its runs: every probe's results.json, every run's resolved settings from its
own checkpoint, and each row against the row it is compared with over paired seeds (the variants of one seed share
run.seed): the mean difference, its standard error and a verdict computed from the two, nothing read into them.
Paths are relative to the study directory."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

from ldae_cli.config import config_from_dict, to_dict
from ldae_cli.runs.checkpoint import read_metadata
from ldae_cli.runs.logs import read_metrics
from ldae_cli.runs.rundir import CHECKPOINT, METRICS
from ldae_cli.settings.evaluation import ProbeConfig
from ldae_cli.settings.training import PretrainConfig
from ldae_cli.studies import patchspace
from ldae_cli.studies.runner import Plan, Row, Run, Timings, relative
from ldae_cli.studies.spec import PAPER_NOTE, data_key

NO_DIFFERENCE = "no difference shown"
# the linear top-1 is the head the probe's `select` chose (results from before it: the best on the eval split)
MEASURES = {"linear": "selected_top1", "knn": "knn_top1"}


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: bisection on its distribution function (Simpson's rule on the density)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:  # for x >= 0
        f = [c * (1 + (x * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + x / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    """Row minus reference, seed by seed: mean, standard error, t(0.975, n - 1) and the verdict, 'ahead' or
    'behind' only when |mean| > t x standard error."""
    seeds = sorted(set(values) & set(reference))
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"seeds": n, "mean": round(mean, 2), "se": None, "t": None, "verdict": NO_DIFFERENCE}
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    t = t_quantile(0.975, n - 1)
    verdict = "ahead" if mean > t * se else "behind" if mean < -t * se else NO_DIFFERENCE
    return {"seeds": n, "mean": round(mean, 2), "se": round(se, 2), "t": round(t, 2), "verdict": verdict}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return round(mean, 2), None
    return round(mean, 2), round(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)), 2)


def wall_seconds(records: list[dict]) -> float | None:
    """A run's training time over all its invocations (each restarts `time_s` from zero when it resumes)."""
    total, last = 0.0, 0.0
    for r in records:
        if "time_s" in r:
            total, last = (total + last, r["time_s"]) if r["time_s"] < last else (total, r["time_s"])
    return round(total + last, 1) if records else None


def stored(ckpt: Path, cls: type):
    """The config a run of the study ran, as the typed config its engine read (and its checkpoint's metadata)."""
    meta = read_metadata(ckpt)
    return config_from_dict(cls, meta["config"]), meta


def objective_text(cfg: PretrainConfig) -> str:
    """What a run's objective did, in words (its `objective` and that objective's own section)."""
    if cfg.objective == "mae":
        mae = cfg.mae
        return (
            f"MAE, {mae.mask_ratio:.0%} of patches hidden, decoder width {mae.decoder_width}, "
            f"{mae.decoder_depth} blocks, {mae.decoder_heads} heads, "
            f"{'normalised' if mae.norm_pix_loss else 'raw'} pixel targets"
        )
    if cfg.objective == "mocov3":
        moco = cfg.mocov3
        return (
            f"MoCo v3, tau {moco.temperature:g}, momentum {moco.momentum:g}"
            f"{' to 1 (cosine)' if moco.momentum_cosine else ''}, heads {moco.mlp_dim} hidden, {moco.dim} out"
        )
    d = cfg.diffusion
    return (
        f"{d.schedule} noise, predict {d.target}, loss weight {d.loss_weight}, {d.input_space} in, {d.output_space} out"
    )


def augmentation_text(data) -> str:
    crop = f"random-resized crops of scale {data.crop_scale}" if data.crop == "random-resized" else "center crops"
    return crop + (" and flips" if data.hflip else "")


def pretrain_settings(ckpt: Path) -> dict:
    """What a pretrain run ran, from the resolved config and metadata in its own checkpoint."""
    cfg, meta = stored(ckpt, PretrainConfig)
    data, tok, optim, extra = cfg.data, cfg.tokenizer, cfg.optim, meta["extra"]
    width, encoder, decoder, heads = cfg.model.resolved()
    full = tok.patch * tok.patch * 3
    return {
        "data": data.source,
        "image_size": data.image_size,
        "patch": tok.patch,
        "tokens": (data.image_size // tok.patch) ** 2,
        "D": full,
        "tokenizer": tok.kind,
        "d": extra["tokenizer"].get("dim") or full,
        "latent_scale": tok.latent_scale + (f" of d = {tok.scale_dim}" if tok.scale_dim else ""),
        "model": f"width {width}, {encoder} + {decoder} blocks, {heads} heads",
        "batch": optim.batch_size,
        "epochs": optim.epochs,
        "steps": extra["total_steps"],
        "lr": optim.base_lr(),
        "warmup_epochs": optim.warmup_epochs,
        "ema": optim.ema,
        "optimizer": f"AdamW betas {tuple(optim.betas)}, weight decay {optim.weight_decay:g}",
        "augmentation": augmentation_text(data),
        "objective": objective_text(cfg),
        **(patchspace.noise_scale(ckpt) if cfg.objective == "ldae" else {}),
    }  # MAE and MoCo add no noise


def probe_settings(run: Run) -> dict:
    """Every setting of the probe's section (fast worded as its mode, batch_size as batch) and the data it read."""
    cfg = stored(run.out / CHECKPOINT, ProbeConfig)[0]
    probe = to_dict(cfg.probe)
    mode = (
        "fast mode (features of center crops, extracted once)"
        if probe.pop("fast")
        else "full mode (MAE's: random-resized crops and flips every epoch)"
    )
    return {
        "mode": mode,
        "batch": probe.pop("batch_size"),
        **probe,
        "limit": cfg.data.limit,
        "eval_split": cfg.data.eval_split,
    }


def dataset_identity(plan: Plan, ckpts: list[Path]) -> list[dict]:
    """Each distinct training set the study's pretrains read: the identity their checkpoints record (a sha256 of
    the training data) where they record one, else the source and its path relative to the study directory."""
    seen = []
    for ckpt in ckpts:
        cfg, meta = stored(ckpt, PretrainConfig)
        facts = plan.facts[data_key(cfg.data)]
        identity = meta["extra"].get("data_identity")
        entry = {
            "source": cfg.data.source,
            "path": os.path.relpath(facts.location, plan.out),
            "train_sha256": identity.get("train") if isinstance(identity, dict) else identity,
            "train_images": facts.train_images,
            "native_size": facts.native,
        }
        if entry not in seen:
            seen.append(entry)
    return seen


def row_results(plan: Plan, row: Row, seeds: int) -> dict:
    runs = []
    for seed in range(seeds):
        result = json.loads((row.probes[seed].out / "results.json").read_text())
        pretrain = row.pretrains[seed]
        linear = result.get(MEASURES["linear"], result["best_top1"])
        runs.append(
            {
                "seed": seed,
                "linear": linear,
                "knn": result[MEASURES["knn"]],
                "probe": relative(row.probes[seed].out, plan.out),
                "pretrain": relative(pretrain.out, plan.out),
                "probe_s": result.get("seconds"),
                "pretrain_s": None if row.baseline else wall_seconds(read_metrics(pretrain.out / METRICS)),
            }
        )
    variant = row.variant
    ckpt = row.pretrains[0].out / CHECKPOINT
    out = {
        "name": row.name,
        "family": variant.family if variant else None,
        "versus": row.versus,
        "baseline": row.baseline,
        "runs": runs,
        "paper": variant.paper if variant else None,
        "paper_row": variant.paper_row if variant else None,
        "paper_source": variant.paper_source if variant else None,
        "probe": probe_settings(row.probes[0]),
        "settings": None if row.baseline else pretrain_settings(ckpt),
    }
    for metric in MEASURES:
        values = [r[metric] for r in runs if r[metric] is not None]
        out[metric] = dict(zip(("mean", "std"), mean_std(values)))
    return out


def collect(plan: Plan, seeds: int, budget_file: dict, command: str) -> dict:
    """results.json of the first `seeds` seeds (all complete)."""
    rows = [row_results(plan, row, seeds) for row in plan.rows]
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        if row["versus"] is not None:
            for metric in MEASURES:
                values = {r["seed"]: r[metric] for r in row["runs"] if r[metric] is not None}
                reference = {r["seed"]: r[metric] for r in by_name[row["versus"]]["runs"] if r[metric] is not None}
                row[metric]["paired"] = paired(values, reference) if values and reference else None
    ckpts = list(dict.fromkeys(row.pretrains[s].out / CHECKPOINT for row in plan.rows for s in range(seeds)))
    timings = Timings(plan.out).runs
    return {
        "study": plan.study.name,
        "description": plan.study.description.strip(),
        "paper_note": (plan.study.paper_note or PAPER_NOTE).strip(),
        "budget": budget_file,
        "seeds": list(range(seeds)),
        "seeds_planned": plan.seeds,
        "reference": plan.reference,
        "variants": [dataclasses.asdict(row.variant) for row in plan.rows if row.variant is not None],
        "baselines": list(plan.study.baselines),
        "dataset": dataset_identity(plan, ckpts),
        "patch_space": patchspace.tables(plan.out, ckpts, {r["settings"]["d"] for r in rows if r["settings"]}),
        "minutes": round(sum(t["seconds"] for t in timings.values()) / 60, 1),
        "rows": rows,
        "command": command,
    }
