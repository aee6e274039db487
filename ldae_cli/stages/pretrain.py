"""`ldae pretrain`: build tokenizer, model and objective from a config, then run it on the trainer
(engine_pretrain.train)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from ldae_cli.config import parse_override, to_dict
from ldae_cli.data.discovery import check_splits
from ldae_cli.data.pipeline import build_dataset, identity_of, to_unit_range
from ldae_cli.data.plots import grid_tensor
from ldae_cli.errors import LdaeError
from ldae_cli.model import pca
from ldae_cli.model.diffusion import Denoiser, NoiseSchedule
from ldae_cli.model.models import build_model
from ldae_cli.model.objective_base import Objective
from ldae_cli.model.objectives import build_objective
from ldae_cli.model.pretrained import Pretrained
from ldae_cli.model.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from ldae_cli.runs.checkpoint import Checkpoint, load_checkpoint, load_state, read_metadata, stored_config
from ldae_cli.runs.distributed import amp_dtype, barrier
from ldae_cli.runs.logs import console
from ldae_cli.runs.rundir import run_name
from ldae_cli.settings.optim import plan_steps
from ldae_cli.settings.training import PCA_DIM
from ldae_cli.train import engine_pretrain
from ldae_cli.train.budget import sized_flags
from ldae_cli.train.dryrun import Plan, estimate_images_per_second, outline, print_config
from ldae_cli.train.engine_pretrain import RESUMABLE, PretrainConfig
from ldae_cli.train.online_probe import OnlineProbe, online_plan, online_subsets
from ldae_cli.train.session import RESUMABLE as RUN_RESUMABLE
from ldae_cli.train.session import (
    Session,
    config_differences,
    load_run_config,
    refuse_force,
    refuse_inputs_inside,
    resume_base,
    same_parent,
    same_unsaved_run,
    session,
    settle_image_size,
)


def build(
    cfg: PretrainConfig,
    resume: Checkpoint | None,
    init_from: Checkpoint | None,
    fresh: Callable[[], tuple],
    num_classes: int,
    meta: bool = False,
) -> tuple[Tokenizer, list[dict], Objective]:
    """What a run trains and its --dry-run counts: the tokenizer and the run's parents (`fresh()`, or a resumed or
    --init-from run's own, never refitted or swapped), and the objective (objectives.py) around the denoiser and the
    network, seeded alike on every rank (on the meta device: counted, not allocated)."""
    if cfg.model.class_conditional and num_classes == 0:
        raise LdaeError("model.class_conditional needs labelled data, but the dataset has no classes")
    stored = resume if resume is not None else init_from
    if stored is None:
        tokenizer, parents = fresh()
    else:
        stored.require("tokenizer.kind")
        tokenizer = build_tokenizer(stored.extra["tokenizer"], stored.section("tokenizer"), stored.path)
        parents = resume.provenance.get("parents", []) if resume is not None else [stored.parent_ref("init")]
    denoiser = Denoiser(cfg.diffusion, tokenizer, NoiseSchedule(cfg.diffusion), cfg.data.settled_size)
    torch.manual_seed(cfg.run.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(cfg.model, denoiser.in_dim, denoiser.out_dim, denoiser.grid, num_classes)
        objective = build_objective(cfg, denoiser, model)
    return tokenizer, parents, objective


def configured_tokenizer(cfg: PretrainConfig, s: Session, dataset) -> tuple[Tokenizer, list[dict]]:
    """The configured tokenizer. A PCA without tokenizer.path is `pca_file`'s: found, or fitted on the training data
    first (`dataset` itself when its images are fixed center crops, else the same images without augmentation)."""
    tc = cfg.tokenizer
    if tc.kind != "pca" or tc.path:
        return load_tokenizer(tc)
    path, found, note = pca_file(cfg, dataset.identity(), lambda: s.output("pca.safetensors"))
    if s.ctx.is_main:
        console.print(note)
    if s.ctx.is_main and not found:
        settings = pca.PCAConfig(patch=tc.patch, dim=tc.dim or PCA_DIM, patches=tc.fit_patches, seed=cfg.run.seed)
        plain = (
            dataset
            if dataset.deterministic and not dataset.hflip and not dataset.encoded
            else build_dataset(cfg.data, "train", augment=False, seed=cfg.run.seed)
        )
        if path.parent == s.checkpoint.parent:  # the run's own
            warning = pca.oversampling(len(plain), plain.size, settings)
            if warning:
                console.print(f"[yellow]warning:[/yellow] {warning.replace('--patches', 'tokenizer.fit_patches')}")
            fitted = pca.fit(plain, settings, cfg.data.on_bad_image, cfg.data.num_workers, cfg.run.progress)
            pca.save_fit(
                fitted,
                path,
                settings,
                {"data": s.config["data"], "pca": vars(settings), "out": str(path)},
                cfg.data.settled_size,
                cfg.data.source,
            )
        else:  # where and as `ldae fit-pca` writes it (with its config and filters), for the next run to find
            pca.fit_and_write(pca.FitPCAConfig(cfg.data, settings, str(path)), cfg.run.progress, dataset=plain)
    barrier(s.ctx)
    return load_tokenizer(tc, path)


def pca_file(cfg: PretrainConfig, identity: str, own: Callable[[], Path]) -> tuple[Path, bool, str]:
    """The PCA file a run without tokenizer.path reads: the one `ldae fit-pca` writes for this data, patch, d and
    image size (pca.default_out) when it holds a fit of these images (`identity`); else where the fit goes: that
    same file, so the next run finds it, or the run's own (`own()`) when an --out keeps the run elsewhere or that file
    holds other images. Returns (path, already there, the line saying which)."""
    tc, size = cfg.tokenizer, cfg.data.image_size
    d = tc.dim or PCA_DIM
    shared = pca.default_out(pca.FitPCAConfig(cfg.data, pca.PCAConfig(patch=tc.patch, dim=d)))
    what = f"patch {tc.patch}, d = {d}, image size {size}"
    if shared.is_file():
        if pca_record(shared).get("data_identity") == identity:
            return shared, True, f"tokenizer: {shared}, the PCA `ldae fit-pca` fitted on this data ({what})"
        target = own()
        return (
            target,
            False,
            (
                f"tokenizer: {shared} is a PCA of other images than these: fitting the PCA on the "
                f"training data ({what}) -> {target}"
            ),
        )
    target = own() if cfg.run.out_dir else shared
    mine = [
        (p, r["dim"])
        for p in sorted(shared.parent.glob("*.safetensors"))
        for r in [pca_record(p)]
        if r.get("data_identity") == identity
        and r.get("patch") == tc.patch
        and r.get("image_size") == size
        and r.get("dim") != d
    ]
    other = (
        f"; {mine[0][0]} (`ldae fit-pca` on this data, d = {mine[0][1]}) is not used: this config keeps d = {d}; "
        f"--set tokenizer.path={mine[0][0]} uses it instead"
        if mine
        else ""
    )
    return target, False, f"tokenizer: fitting the PCA on the training data ({what}) -> {target}{other}"


def pca_record(path: Path) -> dict:
    """What a PCA file records of its fit (patch, d, image size, data identity); {} for a file that is not one."""
    try:
        meta = read_metadata(path)
    except LdaeError:
        return {}
    return meta["extra"] if meta["kind"] == "pca" else {}


# what --init-from may not change: the network and the tokenizer it reads (objective, optimizer, data may differ)
INIT_KEPT = (
    "model.",
    "tokenizer.kind",
    "tokenizer.patch",
    "tokenizer.dim",
    "tokenizer.latent_scale",
    "data.image_size",
    "diffusion.input_space",
    "diffusion.output_space",
)


def run(
    cfg: PretrainConfig,
    config_name: str | None = None,
    resume: Checkpoint | None = None,
    force: bool = False,
    init_from: Checkpoint | None = None,
) -> Path:
    with session(
        "pretrain",
        "pretrain",
        cfg,
        run_name(config_name, cfg.data),
        resume,
        force,
        config_file=config_name,
        resumable=RESUMABLE,
    ) as s:
        cfg.optim.accumulation(s.ctx.world)  # a batch the ranks cannot split fails now, not after a PCA fit
        if cfg.data.eval_split is not None:  # an evaluation split named explicitly must be there, from the start
            check_splits(cfg.data, [cfg.data.eval_split])
        dataset = build_dataset(cfg.data, "train", seed=cfg.run.seed, training_stream=True)
        plan_steps(len(dataset), cfg.optim, cfg.run.seed, s.ctx)  # one global batch or more: before the PCA fit
        tokenizer, parents, objective = build(
            cfg, resume, init_from, lambda: configured_tokenizer(cfg, s, dataset), dataset.num_classes
        )
        denoiser, model = objective.denoiser, objective.net
        if init_from is not None:
            start_from(objective, init_from, cfg.objective)
        if s.ctx.is_main:
            (width, enc, dec, heads), n_params = cfg.model.resolved(), trained_parameters(objective)
            what = objective_line(cfg)
            console.print(
                f"model: {enc}+{dec} blocks, width {width}, {heads} heads, {n_params / 1e6:.1f}M params; "
                f"tokenizer {tokenizer.kind} p={tokenizer.patch} d={tokenizer.token_dim}; {what}"
                + (f"; weights from {init_from.path}" if init_from is not None else "")
            )
        tok_tensors, tok_desc = tokenizer.export()
        description = {
            "model_spec": model.spec,
            "tokenizer": tok_desc,
            "image_size": cfg.data.image_size,
            "num_classes": dataset.num_classes,
            "class_names": dataset.classes,
            "has_ema": cfg.optim.ema is not None,
        }

        def describe() -> tuple[dict, dict]:
            return {f"tokenizer.{k}": v for k, v in tok_tensors.items()}, dict(description)

        def view(trainer) -> Pretrained:  # what probes and `ldae denoise` read: the EMA when the run keeps one
            weights = trainer.ema.module if trainer.ema is not None else model
            return Pretrained(None, cfg.data, cfg.diffusion, weights, tokenizer, denoiser, cfg.objective)

        online = online_probe(cfg, view, s)
        engine_pretrain.train(
            s,
            objective,
            dataset,
            describe,
            parents,
            online,
            denoising_panel(cfg, view) if s.ctx.is_main and cfg.objective == "ldae" else None,
        )
        return s.checkpoint


def objective_line(cfg: PretrainConfig) -> str:
    """The objective's settings in brief, for the run's banner."""
    d, mae, moco = cfg.diffusion, cfg.mae, cfg.mocov3
    return {
        "ldae": f"{d.schedule} schedule, target {d.target}, {d.input_space}->{d.output_space}",
        "mae": f"MAE: mask {mae.mask_ratio:g}, decoder {mae.decoder_depth} blocks of width {mae.decoder_width}, "
        f"norm_pix_loss {mae.norm_pix_loss}",
        "mocov3": f"MoCo v3: tau {moco.temperature:g}, momentum {moco.momentum:g}"
        f"{' cosine to 1' if moco.momentum_cosine else ''}, heads {moco.mlp_dim}->{moco.dim}, patch "
        f"projection {'frozen' if moco.freeze_patch_embed else 'trained'}",
    }[cfg.objective]


def trained_parameters(objective: Objective) -> int:
    return sum(p.numel() for p in objective.parameters() if p.requires_grad)


def start_from(objective: Objective, parent: Checkpoint, name: str) -> None:
    """--init-from: the parent's weights (its EMA when it kept one, the weights its evaluations read), and, when it
    was trained with the same objective, that objective's own modules (MAE's decoder; MoCo v3's heads and momentum
    encoder)."""
    model = objective.net
    section = "ema" if parent.extra.get("has_ema") and parent.section("ema") else "model"
    if parent.extra.get("model_spec") != model.spec:
        differ = sorted(
            k
            for k in set(model.spec) | set(parent.extra.get("model_spec") or {})
            if model.spec.get(k) != (parent.extra.get("model_spec") or {}).get(k)
        )
        raise LdaeError(
            f"--init-from {parent.path}: its network differs from this config's ({', '.join(differ)}); "
            "the model, tokenizer and image size must be the parent's"
        )
    load_state(model, parent.section(section), f"{parent.path} ({section})")
    if parent.config.get("objective", "ldae") == name:
        for key, module in objective.saved_modules().items():
            load_state(module, parent.section(key), f"{parent.path} ({key})")
    else:
        objective.net_loaded()


def check_init_from(cfg: PretrainConfig, parent: Checkpoint) -> None:
    """The keys --init-from keeps must equal the parent's, named when they do not."""
    differ = config_differences(parent.config, to_dict(cfg), ())
    kept = [d for d in differ if d.split(":", 1)[0].startswith(INIT_KEPT) and not d.startswith("model.class_dropout")]
    if kept:
        raise LdaeError(
            f"--init-from {parent.path}: a new run from its weights keeps its network and tokenizer, but "
            f"the config changes {', '.join(kept[:4])}; set them as the parent had them (objective, "
            "optimizer, schedule, epochs and data may differ)"
        )


def settle(cfg: PretrainConfig, overrides: list[str], adopt: bool = True) -> None:
    """A new run's settings taken from what it reads, said on one rank: a PCA file's patch size and d (`adopt`: not
    under --init-from, whose parent fixes them) and the image size (data.resolve_image_size at the tokenizer's patch),
    which a PCA file must have been fitted at."""
    meta = adopt_pca_file(cfg, overrides) if adopt else None
    settle_image_size(cfg.data, cfg.tokenizer.patch)
    fitted = (meta or {}).get("extra", {}).get("image_size")
    if fitted is not None and fitted != cfg.data.image_size:
        raise LdaeError(
            f"tokenizer.path {cfg.tokenizer.path} was fitted on {fitted}x{fitted} images but this run's "
            f"image size is {cfg.data.image_size}; set data.image_size={fitted}, or fit a PCA at "
            f"{cfg.data.image_size} (ldae fit-pca --image-size {cfg.data.image_size})"
        )


def adopt_pca_file(cfg: PretrainConfig, overrides: list[str]) -> dict | None:
    """A PCA file given as tokenizer.path supplies its own patch size and d; a different value given on the command
    line is an error, one from the config file gives way (said so). Returns the file's metadata."""
    tc = cfg.tokenizer
    if tc.kind != "pca" or not tc.path:
        return None
    meta = read_metadata(tc.path)
    if meta["kind"] != "pca":
        raise LdaeError(f"tokenizer.path {tc.path}: a '{meta['kind']}' checkpoint, expected a PCA from `ldae fit-pca`")
    given = {".".join(parse_override(o)[0]) for o in overrides}
    for key in ("patch", "dim"):
        value, current = meta["extra"].get(key), getattr(tc, key)
        if value is None or current in (value, None):
            continue
        if f"tokenizer.{key}" in given:
            raise LdaeError(
                f"tokenizer.{key} is {current} but {tc.path} was fitted with {key} {value}; leave "
                f"tokenizer.{key} out (the file supplies it) or fit another PCA"
            )
        console.print(f"tokenizer: {key} {value} from {tc.path} (the config said {current})")
        setattr(tc, key, value)
    cfg.validate()
    return meta


def denoising_panel(
    cfg: PretrainConfig, view: Callable[[object], Pretrained], images: int = 8
) -> Callable[[object], dict[str, torch.Tensor]] | None:
    """clean | noisy | denoised of a few fixed images, for the dashboard at each save: from the evaluation split,
    or from the training images when there is none (the panel's title says which)."""
    plain = replace(cfg.data, limit=images, crop="center", hflip=False, cache="never")
    try:
        if cfg.data.source == "images":
            raise LdaeError("a folder of unlabelled images has no evaluation split")
        check_splits(cfg.data, [cfg.data.split_name("eval")])
        subset, which = build_dataset(plain, "eval", augment=False, seed=cfg.run.seed), "evaluation images"
    except LdaeError:
        subset, which = (
            build_dataset(plain, "train", augment=False, seed=cfg.run.seed),
            "training images: no evaluation split",
        )
    items = [subset[i][0] for i in range(len(subset)) if isinstance(subset[i], tuple)]

    def draw(trainer) -> dict[str, torch.Tensor]:
        pre = view(trainer)
        clean = to_unit_range(torch.stack(items)).to(trainer.device)
        was_training = pre.model.training
        pre.model.eval()
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            noisy, denoised = pre.denoise(clean, pre.timestep(), seed=0)
        pre.model.train(was_training)
        rows = [[x[i].cpu() for x in (clean, noisy, denoised)] for i in range(len(items))]
        return {f"denoising (clean | noisy | denoised), {which}": grid_tensor(rows, max(1, 64 // clean.shape[-1]))}

    return draw if items else None


def online_probe(cfg: PretrainConfig, view: Callable[[object], Pretrained], s: Session) -> OnlineProbe | None:
    """The online probe, when the dataset has labelled train and evaluation splits."""
    if not cfg.online_probe.enabled:
        return None
    try:
        fit, test = online_subsets(cfg, s.ctx)
    except LdaeError as exc:
        if s.ctx.is_main:
            console.print(f"online probe: off: {exc}; set online_probe.enabled=false to silence this")
        return None
    probe = OnlineProbe(
        cfg.online_probe,
        view,
        fit,
        test,
        amp_dtype(cfg.run.precision, s.ctx.device),
        cfg.run.seed,
        cfg.data.num_workers,
    )
    if s.ctx.is_main:
        console.print(probe.title())
    return probe


def dry_run(
    cfg: PretrainConfig, config_name: str | None, resume: Checkpoint | None, force: bool, init_from: Checkpoint | None
) -> Plan:
    """--dry-run: the checks and plan of a start, and a measured step time, with nothing written or trained."""
    o = outline(
        cfg,
        "pretrain",
        "pretrain",
        run_name(config_name, cfg.data),
        config_name,
        resume,
        force,
        [cfg.data.eval_split] if cfg.data.eval_split is not None else [],
        same_unsaved_run(cfg, RUN_RESUMABLE + RESUMABLE),
    )
    notes = []

    def fresh() -> tuple[Tokenizer, list[dict]]:  # the configured tokenizer, or a stand-in for the PCA a start fits
        if cfg.tokenizer.kind != "pca" or cfg.tokenizer.path:
            return load_tokenizer(cfg.tokenizer)
        path, found, note = pca_file(cfg, identity_of(o.source, o.images), lambda: o.out_dir / "pca.safetensors")
        notes.append(note)
        if found:
            return load_tokenizer(cfg.tokenizer, path)
        notes.append(f"the PCA tokenizer is fitted on {cfg.tokenizer.fit_patches:,} training patches first (not timed)")
        warning = pca.oversampling(
            o.images,
            cfg.data.settled_size,
            pca.PCAConfig(
                patch=cfg.tokenizer.patch, dim=cfg.tokenizer.dim or PCA_DIM, patches=cfg.tokenizer.fit_patches
            ),
        )
        if warning:
            notes.append(f"warning: {warning.replace('--patches', 'tokenizer.fit_patches')}")
        return engine_pretrain.stand_in(cfg.tokenizer), []

    params = trained_parameters(build(cfg, resume, init_from, fresh, len(o.source.classes), meta=True)[2])
    notes.append(online_plan(cfg, SimpleNamespace(rank=0, world=o.world)))
    speed, timing = estimate_images_per_second(cfg)
    return o.plan("pretrain", cfg, params, 1 / speed, timing, notes)


def main(
    config: str | None,
    overrides: list[str],
    flags: dict,
    resume: str | None = None,
    force: bool = False,
    cont: bool = False,
    init_from: str | None = None,
    preview: str | None = None,
    budget: str | None = None,
) -> Path | None:
    if budget is not None:  # a run sized to the data and the time (train/budget.py): keys between the config and --set
        config, flags = sized_flags(
            budget,
            config,
            overrides,
            flags,
            preview,
            {"--resume": resume, "--init-from": init_from, "--continue": cont},
        )
    if config is None and resume is None and init_from is None:
        raise LdaeError(
            "pretrain needs --config (e.g. --config final.yaml, or a row such as trajectory/T3.5), "
            "--init-from CKPT (a new run from its weights) or --resume RUN_DIR"
        )
    refuse_force(resume, cont, force)
    parent = None
    if init_from is not None:
        if resume is not None:
            raise LdaeError(
                "--init-from starts a new run from a checkpoint's weights, --resume continues a run; give one of them"
            )
        parent = load_checkpoint(init_from, "pretrain")
        parent.require("model_spec", "tokenizer.kind")
        stored_config(PretrainConfig, parent)
    base = resume_base(parent.config) if parent is not None else None
    cfg, ckpt = load_run_config(
        PretrainConfig,
        "pretrain",
        config,
        overrides,
        flags,
        resume,
        RESUMABLE,
        cont,
        base,
        adjust=lambda c: settle(c, overrides, parent is None),
    )
    if parent is not None:
        check_init_from(cfg, parent)
    name = config or (f"{Path(init_from).resolve().parent.name}-continued" if init_from else None)
    if ckpt is None:
        refuse_inputs_inside(
            "pretrain",
            "pretrain",
            cfg.run.out_dir,
            run_name(name, cfg.data),
            {"--init-from": init_from, "tokenizer.path": cfg.tokenizer.path},
        )
    else:  # --continue: the run in --out continues from its own checkpoint
        same_parent(ckpt, "--init-from", init_from, ("init",))
    if preview == "config":
        print_config(cfg)
        return None
    if preview == "plan":
        dry_run(cfg, name, ckpt, force, parent if ckpt is None else None).show()
        return None
    return run(cfg, name, ckpt, force, parent if ckpt is None else None)
