"""`ldae finetune`: end-to-end fine-tuning of a pretrained encoder (MAE's protocol, as the paper uses it).

The network is the pretrain checkpoint's encoder folded at fixed t into a plain timm ViT (or an
exported encoder), average-pooled, then a new LayerNorm (MAE's `fc_norm`) and a linear head.
`--from-scratch` builds the same network with timm's random initialisation, the baseline every
result is read against: the architecture of --ckpt when one is given (so nothing but the weights
differs), otherwise `model.arch`. Its position embedding is the fixed 2-D sin-cos table that the
pretrained encoder starts from too (pretraining never learns it), so the two runs differ only in
what pretraining learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ldae_cli.data.discovery import NoData, check_splits
from ldae_cli.data.pipeline import build_dataset
from ldae_cli.errors import LdaeError
from ldae_cli.model.models import build_timm_vit, sincos_2d, timm_vit_kwargs
from ldae_cli.model.pretrained import load_encoder, named, pretraining_data
from ldae_cli.runs import rundir
from ldae_cli.runs.checkpoint import Checkpoint
from ldae_cli.runs.distributed import resolve_device
from ldae_cli.runs.logs import console
from ldae_cli.train import engine_finetune
from ldae_cli.train.dryrun import Plan, outline, print_config, seconds_per_image
from ldae_cli.train.engine_finetune import DESCRIPTION_KEYS, RESUMABLE, BatchAugment, FinetuneConfig, SeededRandAugment
from ldae_cli.train.session import (
    load_run_config,
    refuse_force,
    refuse_inputs_inside,
    same_parent,
    session,
    settle_image_size,
)


def default_config(ckpt: str | None, given: bool) -> tuple[dict, str]:
    """The data the encoder was pretrained on when its record names it and it is still there, so `ldae finetune
    --ckpt X` needs no --data (as `ldae probe`), and why not; the fine-tuning crops, flips and augmentations stay
    the recipe's. `given`: the command line names it."""
    if not ckpt:
        return {}, "no --ckpt records any"
    data, why = pretraining_data(ckpt, given)
    data = {k: v for k, v in data.items() if k not in ("crop", "crop_scale", "hflip")}
    return ({"data": data} if data else {}), why


def settle(cfg: FinetuneConfig) -> None:
    """From scratch, a new run's null data.image_size is the images' own size in model.arch.patch steps (a --ckpt's
    input size is checked against data.image_size in vit_arch)."""
    if not cfg.model.ckpt and cfg.data.image_size is None:
        settle_image_size(cfg.data, cfg.model.arch.patch)


def vit_arch(cfg: FinetuneConfig) -> tuple[dict, nn.Module | None, Checkpoint | None]:
    """(timm kwargs without head, folded encoder or None, source checkpoint or None)."""
    mc = cfg.model
    if mc.ckpt:
        encoder, kwargs, source = load_encoder(mc.ckpt, mc.t, mc.depth, mc.pretrain_ema)
        size = tuple(kwargs["img_size"])
        if size != (cfg.data.image_size, cfg.data.image_size):
            raise LdaeError(
                f"data.image_size {cfg.data.image_size} does not match the input size {size[0]} of "
                f"{mc.ckpt}; set data.image_size={size[0]}"
            )
        return kwargs, encoder, source
    width, depth, heads = mc.arch.resolved()
    if cfg.data.settled_size % mc.arch.patch:
        raise LdaeError(f"data.image_size {cfg.data.image_size} is not a multiple of model.arch.patch {mc.arch.patch}")
    kwargs = timm_vit_kwargs((cfg.data.settled_size,) * 2, mc.arch.patch, width, depth, heads, mc.arch.mlp_ratio)
    return kwargs, None, None


def build_network(
    cfg: FinetuneConfig, num_classes: int, arch: tuple[dict, nn.Module | None, Checkpoint | None]
) -> tuple[VisionTransformer, dict, list[dict], dict]:
    """(ViT with head, its timm kwargs, provenance parents, a description of the initialisation) from `vit_arch`'s
    (kwargs, folded encoder, source)."""
    mc = cfg.model
    kwargs, encoder, source = arch
    # MAE's global-pool classifier: LayerNorm after the average pool (timm's fc_norm), then the head
    kwargs = {**kwargs, "num_classes": num_classes, "final_norm": True, "fc_norm": True, "drop_path_rate": mc.drop_path}
    torch.manual_seed(cfg.run.seed)  # random weights depend on the seed only (loading --ckpt draws numbers too)
    vit = build_timm_vit(kwargs)
    assert isinstance(vit.head, nn.Linear) and vit.pos_embed is not None  # num_classes > 0, a position embedding
    init_desc = {
        "from_scratch": mc.from_scratch,
        "source": mc.ckpt,
        "t": None if mc.from_scratch else mc.t,
        "depth": kwargs["depth"],
    }
    if encoder is not None and not mc.from_scratch:
        missing, unexpected = vit.load_state_dict(encoder.state_dict(), strict=False)
        if set(missing) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} or unexpected:
            raise LdaeError(
                f"{mc.ckpt}: encoder weights do not fit the fine-tuning ViT (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    else:
        grid = (kwargs["img_size"][0] // kwargs["patch_size"], kwargs["img_size"][1] // kwargs["patch_size"])
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_2d(kwargs["embed_dim"], grid)[None])
    nn.init.trunc_normal_(vit.head.weight, std=mc.head_init_std)
    nn.init.zeros_(vit.head.bias)
    parents = [source.parent_ref("architecture" if mc.from_scratch else "init")] if source is not None else []
    return vit, kwargs, parents, init_desc


def describe_init(init_desc: dict) -> str:
    if not init_desc["from_scratch"]:
        return f"encoder of {init_desc['source']} folded at t={init_desc['t']}"
    where = f"the architecture of {init_desc['source']}" if init_desc["source"] else "model.arch"
    return f"random (timm init, fixed sin-cos position embedding), {where}"


def run_name(cfg: FinetuneConfig, config_name: str | None) -> str:
    """runs/finetune/<config>[-<data folder>][-scratch] (rundir.run_name)"""
    return f"{rundir.run_name(config_name or 'default', cfg.data)}{'-scratch' if cfg.model.from_scratch else ''}"


def run(
    cfg: FinetuneConfig, config_name: str | None = None, resume_ckpt: Checkpoint | None = None, force: bool = False
) -> Path:
    if not cfg.model.ckpt and not cfg.model.from_scratch:
        raise LdaeError(
            "finetune needs --ckpt (a pretrain checkpoint or exported encoder) or --from-scratch "
            "(config keys model.ckpt / model.from_scratch)"
        )
    name = run_name(cfg, config_name)
    with session(
        "finetune", "finetune", cfg, name, resume_ckpt, force, config_file=config_name, resumable=RESUMABLE
    ) as s:
        arch = vit_arch(cfg) if resume_ckpt is None else None  # the encoder, read and checked before any data
        check_splits(cfg.data, [cfg.data.split_name("train"), cfg.data.split_name("eval")])
        randaug = SeededRandAugment(cfg.aug.rand_augment, cfg.data.settled_size) if cfg.aug.rand_augment else None
        train_set = build_dataset(cfg.data, "train", augment=True, seed=cfg.run.seed, transform=randaug)
        eval_set = build_dataset(cfg.data, "eval", augment=False, seed=cfg.run.seed)
        num_classes = train_set.num_classes
        if num_classes < 2:
            raise LdaeError(
                f"finetune needs at least 2 classes; the {cfg.data.source} training split has {num_classes}"
            )
        if eval_set.classes != train_set.classes:
            raise LdaeError(
                f"the eval split '{cfg.data.split_name('eval')}' has classes {eval_set.classes[:5]}, "
                f"the train split {train_set.classes[:5]}; both need the same class folders"
            )
        engine_finetune.even_micro_batch(cfg.aug, cfg.optim.accumulation(s.ctx.world)[0])  # this many ranks' share
        description: dict[str, Any]
        if resume_ckpt is None:
            assert arch is not None  # read above for a new run
            model, kwargs, parents, init_desc = build_network(cfg, num_classes, arch)
            description = {
                "timm_kwargs": kwargs,
                "class_names": train_set.classes,
                "num_classes": num_classes,
                "image_size": cfg.data.image_size,
                "init": init_desc,
            }
        else:
            resume_ckpt.require(*DESCRIPTION_KEYS)
            description = {k: resume_ckpt.extra[k] for k in DESCRIPTION_KEYS}
            model = build_timm_vit(description["timm_kwargs"])
            parents = resume_ckpt.provenance.get("parents", [])
        if s.ctx.is_main:
            kw = description["timm_kwargs"]
            n_params = sum(p.numel() for p in model.parameters())
            console.print(
                f"model: ViT depth {kw['depth']}, width {kw['embed_dim']}, {kw['num_heads']} heads, patch "
                f"{kw['patch_size']}, {n_params / 1e6:.2f}M params, {num_classes} classes; init: "
                f"{describe_init(description['init'])}"
            )
        a = cfg.aug
        augment = BatchAugment(
            num_classes,
            a.mixup,
            a.cutmix,
            a.mix_prob,
            a.switch_prob,
            a.mix_mode,
            a.label_smoothing,
            a.erase_prob,
            a.erase_mode,
            a.erase_count,
        )
        engine_finetune.train(s, model, train_set, eval_set, augment, description, parents)
        return s.checkpoint


def dry_run(cfg: FinetuneConfig, config_name: str | None, resume_ckpt: Checkpoint | None, force: bool) -> Plan:
    """--dry-run: the checks and plan of a start and a step of the network timed, with nothing written."""
    name = run_name(cfg, config_name)
    o = outline(
        cfg,
        "finetune",
        "finetune",
        name,
        config_name,
        resume_ckpt,
        force,
        [cfg.data.split_name("train"), cfg.data.split_name("eval")],
    )
    kwargs = (
        resume_ckpt.extra["timm_kwargs"]
        if resume_ckpt is not None
        else {**vit_arch(cfg)[0], "num_classes": len(o.source.classes), "final_norm": True, "fc_norm": True}
    )
    vit = build_timm_vit(kwargs)
    params = sum(p.numel() for p in vit.parameters())
    device = resolve_device(cfg.run.device)
    sample = min(o.micro, 8)
    vit.to(device).train()
    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-6)
    size = cfg.data.settled_size
    batch = torch.randn(sample, 3, size, size, device=device)
    targets = torch.zeros(sample, dtype=torch.long, device=device)

    def step() -> None:
        torch.nn.functional.cross_entropy(vit(batch), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return o.plan(
        "finetune",
        cfg,
        params,
        seconds_per_image(step, sample),
        f"measured on {sample} synthetic images on {device}, without data loading, augmentation or evaluations",
    )


def main(
    config: str | None,
    overrides: list[str],
    flags: dict,
    resume: str | None = None,
    *,
    ckpt: str | None = None,
    from_scratch: bool = False,
    force: bool = False,
    cont: bool = False,
    preview: str | None = None,
) -> Path | None:
    refuse_force(resume, cont, force)
    flags = {**flags, "model.ckpt": ckpt, "model.from_scratch": True if from_scratch else None}
    base, why = default_config(ckpt, named(flags)) if resume is None else (None, "")
    try:
        cfg, resume_ckpt = load_run_config(
            FinetuneConfig, "finetune", config, overrides, flags, resume, RESUMABLE, cont, base, adjust=settle
        )
    except NoData:
        raise LdaeError(f"finetune: nothing names the data to fine-tune on: {why}; give --data DIR") from None
    if resume_ckpt is None:
        refuse_inputs_inside("finetune", "finetune", cfg.run.out_dir, run_name(cfg, config), {"--ckpt": cfg.model.ckpt})
    elif cfg.model.ckpt != resume_ckpt.config.get("model", {}).get("ckpt"):  # recorded, never read: may only relocate
        same_parent(resume_ckpt, "--ckpt", cfg.model.ckpt, ("init", "architecture"))
    if preview == "config":
        print_config(cfg)
        return None
    if preview == "plan":
        dry_run(cfg, config, resume_ckpt, force).show()
        return None
    return run(cfg, config, resume_ckpt, force)
