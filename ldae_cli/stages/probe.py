"""`ldae probe`: linear probing of a pretrained encoder, MAE's protocol, several lrs at once.

The encoder is the pretrain checkpoint folded at fixed t into a plain ViT (clean input by default,
or the level-t latent noise added), cut at any block, average-pooled. Full mode (the paper's
protocol: crops and flips every epoch) or fast mode (features extracted once, plus k-NN); see
engine_probe.

Baselines read against every result: `--random-init` (the same ViT, untrained) and
`probe.features: pixels` (the same head on raw pixels).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from rich.table import Table

from ldae_cli.config import load_config
from ldae_cli.data.discovery import NoData, check_splits, settle_data
from ldae_cli.data.pipeline import build_dataset
from ldae_cli.data.plots import save_probe_chart
from ldae_cli.data.sources import open_source
from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import (
    FeatureEncoder,
    encoder_features,
    load_encoder,
    load_pretrained,
    named,
    pixel_features,
    pretraining_data,
    timm_export,
    vit_features,
)
from ldae_cli.runs import rundir
from ldae_cli.runs.checkpoint import Checkpoint, read_metadata
from ldae_cli.runs.distributed import DistContext, amp_dtype, resolve_device
from ldae_cli.runs.logs import console
from ldae_cli.train import engine_probe
from ldae_cli.train.dryrun import Plan, print_config, seconds_per_image, start_of, state_bytes, world_size
from ldae_cli.train.engine_probe import RESUMABLE, ProbeConfig
from ldae_cli.train.session import (
    CHECKPOINT,
    kept_config,
    load_run_config,
    refuse_force,
    refuse_inputs_inside,
    same_parent,
    session,
    settle_image_size,
    verified_parent,
)


def default_config(ckpt_path: str | None, given: bool) -> tuple[dict, str]:
    """The data the encoder was pretrained on (MAE probing crops for training), so `ldae probe --ckpt X` needs
    nothing else: what a pretrain checkpoint or an `ldae export` file or folder records, when it is still there
    (pretrained.pretraining_data); and why not, for the line asking for --data. `given`: the command line names it."""
    if ckpt_path is None:
        return {}, "no --ckpt records any"
    if timm_export(ckpt_path) is None and (kind := read_metadata(ckpt_path)["kind"]) not in ("pretrain", "encoder"):
        raise LdaeError(
            f"{ckpt_path}: is a '{kind}' checkpoint; probe reads a pretrain checkpoint, an "
            "`ldae export` file or a `--format timm` folder"
        )
    data, why = pretraining_data(ckpt_path, given)
    return {"data": {**data, "crop": "random-resized", "crop_scale": [0.08, 1.0], "hflip": True}}, why


def run_name(ckpt: str | None, config_name: str | None, random_init: bool, cfg: ProbeConfig) -> str:
    """runs/probe/<run>[-random-init]-<data>[-<config>]: named after the encoder's run and the data probed on, so
    probes of two runs, or of one run on two datasets, never meet. An encoder probe without --ckpt is refused here,
    the first thing a run and a --dry-run do."""
    if cfg.probe.features != "encoder":
        base: str = cfg.probe.features
    elif ckpt is None:
        raise LdaeError(
            "probe needs --ckpt (a pretrain checkpoint or an `ldae export` file or folder), also for "
            "--random-init (its architecture)"
        )
    else:
        path = Path(ckpt)
        base = (
            path.parent.name
            if path.name in (CHECKPOINT, "model.safetensors")
            else path.stem
            if path.is_file()
            else path.name
        )
        base += "-random-init" if random_init else ""
    base += f"-{rundir.data_name(cfg.data)}"
    return f"{base}-{Path(config_name).stem}" if config_name else base


def results_table(rows: list[dict], knn: float | None, title: str, chosen: int | None = None) -> Table:
    """The heads, the reported one (`chosen`; default: the best on the eval split) marked *."""
    table = Table(title=title)
    for col in ("head", "blr", "lr", "train loss", "top-1", "top-5"):
        table.add_column(col, justify="right")
    best = max(range(len(rows)), key=lambda i: rows[i]["top1"]) if chosen is None else chosen
    for i, r in enumerate(rows):
        mark = " *" if i == best else ""
        loss = "diverged" if r["train_loss"] is None else f"{r['train_loss']:.3g}"
        table.add_row(f"{i}{mark}", f"{r['blr']:.3g}", f"{r['lr']:.3g}", loss, f"{r['top1']:.2f}", f"{r['top5']:.2f}")
    if knn is not None:
        table.add_row("k-NN", "", "", "", f"{knn:.2f}", "")
    return table


def settle(cfg: ProbeConfig) -> None:
    """Raw pixels: a new run's null data.image_size is the images' own size (an encoder's input size is checked
    against data.image_size in build_encoder)."""
    if cfg.probe.features == "pixels" and cfg.data.image_size is None:
        settle_image_size(cfg.data, 1)


def build_encoder(cfg: ProbeConfig, ckpt_path: str | None, random_init: bool, device) -> FeatureEncoder:
    settings = cfg.probe
    if settings.features == "pixels":
        return pixel_features(cfg.data.settled_size)
    assert ckpt_path is not None  # run_name refused an encoder probe without one
    if timm_export(ckpt_path) is not None or read_metadata(ckpt_path)["kind"] == "encoder":
        if settings.noisy_input:
            raise LdaeError(
                f"{ckpt_path}: an exported encoder reads clean images (its t is folded in); probe.noisy_input "
                "needs the pretrain checkpoint"
            )
        vit, kwargs, source = load_encoder(ckpt_path, depth=settings.depth)
        if tuple(kwargs["img_size"]) != (cfg.data.image_size,) * 2:
            raise LdaeError(
                f"data.image_size is {cfg.data.image_size} but {ckpt_path} takes {kwargs['img_size'][0]}; "
                f"set data.image_size={kwargs['img_size'][0]}"
            )
        return vit_features(
            vit, kwargs, source, device, amp_dtype(cfg.run.precision, device), cfg.run.seed if random_init else None
        )
    pre = load_pretrained(ckpt_path, settings.ema)
    if cfg.data.image_size != pre.image_size:
        raise LdaeError(
            f"data.image_size is {cfg.data.image_size} but {ckpt_path} was pretrained at "
            f"{pre.image_size}; probe at the pretraining size"
        )
    return encoder_features(
        pre,
        settings.t,
        settings.depth,
        settings.noisy_input,
        device,
        amp_dtype(cfg.run.precision, device),
        cfg.run.seed if random_init else None,
    )


def run(
    cfg: ProbeConfig,
    ckpt: str | None,
    random_init: bool = False,
    config_name: str | None = None,
    resume: Checkpoint | None = None,
    force: bool = False,
) -> dict:
    name = run_name(ckpt, config_name, random_init, cfg)
    with session("probe", "probe", cfg, name, resume, force, config_file=config_name, resumable=RESUMABLE) as s:
        check_splits(cfg.data, [cfg.data.split_name("train"), cfg.data.split_name("eval")])  # before any feature
        encoder = build_encoder(cfg, ckpt, random_init, s.ctx.device)
        eval_ds = build_dataset(cfg.data, "eval", augment=False, seed=cfg.run.seed)
        train_ds = build_dataset(cfg.data, "train", augment=not cfg.probe.fast, seed=cfg.run.seed)
        num_classes = train_ds.num_classes
        if num_classes < 2:
            raise LdaeError(f"probing needs labelled data with 2+ classes; {cfg.data.source} gives {num_classes}")
        if s.ctx.is_main:
            console.print(
                f"probe: {encoder.description}; {len(train_ds):,} train / {len(eval_ds):,} eval images, "
                f"{num_classes} classes, {'fast (cached features)' if cfg.probe.fast else 'full protocol'}"
            )
        about = {
            "checkpoint": ckpt,
            "random_init": random_init,
            "features": cfg.probe.features,
            "t": cfg.probe.t,
            "depth": cfg.probe.depth,
            "noisy_input": cfg.probe.noisy_input,
        }

        def show(results: dict) -> None:
            console.print(
                results_table(
                    results["heads"],
                    results["knn_top1"],
                    f"linear probe: {encoder.description}",
                    results["selected_head"],
                )
            )
            console.print(f"{engine_probe.summary(results)}; wrote {s.output('results.json')} and {s.checkpoint}")

        results = engine_probe.train(s, encoder, train_ds, eval_ds, about, show)
        if results and s.ctx.is_main:  # {} when stopped early
            save_probe_chart(results, s.output("results.png"))
        return results


def dry_run(
    cfg: ProbeConfig,
    ckpt: str | None,
    random_init: bool,
    config_name: str | None,
    resume: Checkpoint | None,
    force: bool,
) -> Plan:
    """--dry-run: the checks and plan of a probe, with the encoder's feature extraction timed; nothing written."""
    world, settings = world_size(), cfg.probe
    name = run_name(ckpt, config_name, random_init, cfg)
    out_dir = rundir.resolve("probe", "probe", cfg.run.out_dir, name, resume.path if resume else None)
    start = start_of(
        out_dir, "probe", "probe", force, resume.extra["step"] if resume else None, kept_config(config_name, out_dir)
    )
    check_splits(cfg.data, [cfg.data.split_name("train"), cfg.data.split_name("eval")])
    train, held_out = open_source(cfg.data, "train"), open_source(cfg.data, "eval")
    images = min(len(train), cfg.data.limit or len(train))
    trained = images - (engine_probe.held_out(images) if settings.select == "holdout" else 0)
    plan = engine_probe.head_plan(settings, trained, cfg.run.seed, DistContext(rank=0, world=world))
    steps = plan.total_steps
    device = resolve_device(cfg.run.device)
    encoder = build_encoder(cfg, ckpt, random_init, device)
    classes = len(train.classes)
    params = encoder.dim * classes * len(settings.blrs)  # the heads; the encoder is frozen
    size = cfg.data.settled_size
    sample = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, device=device)
    extracted = images + len(held_out) if settings.fast else steps * plan.batch_size + len(held_out)
    return Plan(
        "probe",
        out_dir,
        start,
        images,
        plan.batch_size,
        world,
        1,
        plan.batch_size // world,
        steps,
        plan.steps_per_epoch,
        plan.batch_size / 256 * max(settings.blrs),
        params,
        state_bytes(params, 1),
        seconds_per_image(lambda: encoder.fn(sample, 0), 8),
        f"the encoder's features measured on 8 synthetic images on {device}; "
        + ("fast mode: features of every image once" if settings.fast else "full mode: every step's images"),
        [f"encoder: {encoder.description}; {classes} classes, {len(settings.blrs)} heads"],
        extracted,
    )


SMALL_DATA = "probe/small-fast.yaml"


def protocol(overrides: list[str], flags: dict, base: dict | None) -> str | None:
    """Without --config: the small-data protocol (SMALL_DATA) when a batch of the defaults (and --set) is more than
    the training images, said either way; None keeps the defaults. A config that does not load is left to the real
    load to report."""
    try:
        trial = load_config(ProbeConfig, None, overrides, flags, base)
        settle_data(trial.data)
        source = open_source(replace(trial.data, verify=False), "train")
    except LdaeError:
        return None
    images, s = min(len(source), trial.data.limit or len(source)), trial.probe
    if s.batch_size <= images:
        console.print(
            f"probe: {images:,} training images: {'fast mode' if s.fast else 'the full protocol'}, batch "
            f"{s.batch_size:,} (--config names another)"
        )
        return None
    whose = "a fast-mode" if s.fast else "the full protocol's"
    console.print(
        f"probe: {images:,} training images, fewer than {whose} batch {s.batch_size:,}: using the "
        f"small-data protocol ({Path(SMALL_DATA).with_suffix('')})"
    )
    return SMALL_DATA


def main(
    config: str | None,
    overrides: list[str],
    flags: dict,
    resume: str | None = None,
    *,
    ckpt: str | None = None,
    random_init: bool = False,
    force: bool = False,
    cont: bool = False,
    preview: str | None = None,
) -> dict | None:
    refuse_force(resume, cont, force)
    name = Path(config).stem if config else None
    base, why = default_config(ckpt, named(flags)) if resume is None else (None, "")
    if config is None and resume is None:  # no protocol named: the data's size picks one (the run keeps its name)
        config = protocol(overrides, flags, base)
    try:
        cfg, resume_ckpt = load_run_config(
            ProbeConfig, "probe", config, overrides, flags, resume, RESUMABLE, cont, base, adjust=settle
        )
    except NoData:
        raise LdaeError(f"probe: nothing names the data to probe on: {why}; give --data DIR") from None
    if base and not why and base["data"].get("path") == cfg.data.path:
        console.print(f"data: {cfg.data.path or cfg.data.source}, which {ckpt} was pretrained on")
    if random_init and cfg.probe.features != "encoder":
        raise LdaeError(
            f"--random-init probes an untrained encoder, but probe.features is '{cfg.probe.features}' "
            "(the raw-image baseline, no encoder); give one of them"
        )
    if resume_ckpt is None and ckpt is not None:
        refuse_inputs_inside(
            "probe", "probe", cfg.run.out_dir, run_name(ckpt, name, random_init, cfg), {"--ckpt": ckpt}
        )
    if preview == "config":
        print_config(cfg)
        return None
    if preview == "plan":
        dry_run(cfg, ckpt, random_init, name, resume_ckpt, force).show()
        return None
    if resume_ckpt is None:
        return run(cfg, ckpt, random_init, name, force=force)
    resume_ckpt.require("random_init")
    was_random = bool(resume_ckpt.extra["random_init"])
    if (random_init and not was_random) or (cont and was_random != random_init):  # a resume may leave it out
        raise LdaeError(
            f"{'--continue' if cont else '--resume'}: {resume_ckpt.path.parent} holds a probe "
            f"{'with' if was_random else 'without'} --random-init; "
            + ("pick another --out" if cont else "resume it as it was started")
        )
    if cfg.probe.features == "encoder":
        role = next(
            (p["role"] for p in resume_ckpt.provenance.get("parents", []) if p.get("role") in ("pretrain", "encoder")),
            "pretrain",
        )
        ckpt = verified_parent(resume_ckpt, role, ckpt)
    else:  # the pixel baseline reads no encoder
        same_parent(resume_ckpt, "--ckpt", ckpt, ())
    return run(cfg, ckpt, was_random, name, resume_ckpt)
