"""`ldae detect`: COCO detection and instance segmentation with detectron2's ViTDet Mask R-CNN (the paper's COCO
protocol).

The backbone is detectron2's plain `ViT` initialised from our encoder folded at fixed t, under a
`SimpleFeaturePyramid`; training uses large-scale jitter, layer-wise lr decay, AdamW and ViTDet's
warm-up + step schedule; evaluation is COCO box and mask AP. Our YAML config is the user-facing
recipe; detectron2's LazyConfig is built from it (ldae_cli/model/detection.py). The detector is saved in the
shared safetensors format (kind `detect`) with its optimizer state, so runs resume exactly.

Several GPUs or nodes: `torchrun --nproc-per-node N -m ldae_cli detect ...` (optim.batch_size stays the
global batch; optim.micro_batch splits each rank's share when it does not fit in memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldae_cli.config import load_config
from ldae_cli.errors import LdaeError
from ldae_cli.model import detection
from ldae_cli.model.pretrained import load_encoder
from ldae_cli.runs import rundir
from ldae_cli.runs.checkpoint import Checkpoint, load_checkpoint, load_state, read_metadata
from ldae_cli.runs.distributed import init, shutdown
from ldae_cli.runs.logs import console
from ldae_cli.runs.outputs import refuse_to_replace, write_output
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.train import engine_detect
from ldae_cli.train.dryrun import Plan, print_config, start_of, state_bytes, world_size
from ldae_cli.train.engine_detect import RESUMABLE, DetectConfig, ap_table, quiet_detectron2, run_evaluation
from ldae_cli.train.session import (
    CHECKPOINT,
    kept_config,
    load_run_config,
    refuse_force,
    refuse_inputs_inside,
    same_parent,
    session,
)


def dry_run(cfg: DetectConfig, config_name: str | None, stored: Checkpoint | None, force: bool, init: Init) -> Plan:
    """--dry-run: the checks and plan of a start (COCO splits, backbone, detector size); the step time is not
    estimated (Mask R-CNN's cost depends on the images' instances)."""
    world = world_size()
    micro, accum = cfg.optim.accumulation(world)
    out_dir = rundir.resolve("detect", "detect", cfg.run.out_dir, config_name, stored.path if stored else None)
    start = start_of(
        out_dir, "detect", "detect", force, stored.extra["step"] if stored else None, kept_config(config_name, out_dir)
    )
    train_split, _ = register_splits(cfg)
    spec = detection.BackboneSpec(**stored.extra["backbone"]) if stored is not None else resolve_backbone(cfg, init)[0]
    model = detection.build_detector(spec, settings(cfg, len(train_split.class_names)))
    params = sum(p.numel() for p in model.parameters())
    images = len(train_split.dicts)
    return Plan(
        "detect",
        out_dir,
        start,
        images,
        cfg.optim.batch_size,
        world,
        accum,
        micro,
        cfg.optim.iterations,
        images / cfg.optim.batch_size,
        cfg.optim.lr,
        params,
        state_bytes(params),
        None,
        "not estimated for detect: time a few iterations with --set run.stop_after_steps=20",
    )


def main(
    config: str | None,
    overrides: list[str],
    flags: dict,
    resume: str | None = None,
    *,
    ckpt: str | None = None,
    from_scratch: bool = False,
    eval_only: bool = False,
    force: bool = False,
    cont: bool = False,
    preview: str | None = None,
) -> Path | None:
    with quiet_detectron2():
        detection.require_detectron2()
        if eval_only:
            return _eval_only(config, overrides, flags, resume, ckpt, from_scratch, force)
        refuse_force(resume, cont, force)
        cfg, stored = load_run_config(DetectConfig, "detect", config, overrides, flags, resume, RESUMABLE, cont)
        if stored is None:
            refuse_inputs_inside("detect", "detect", cfg.run.out_dir, config, {"--ckpt": ckpt})
        if preview == "config":
            print_config(cfg)
            return None
        if preview == "plan":
            dry_run(cfg, config, stored, force, Init(ckpt, from_scratch)).show()
            return None
        if stored is not None:
            _check_resume_init(stored, ckpt, from_scratch)
            return run(cfg, config, None, stored)
        if not ckpt and not from_scratch:
            raise LdaeError(
                "detect needs --ckpt PRETRAIN (a pretrain checkpoint or an exported encoder), or "
                "--from-scratch for the randomly initialised baseline"
            )
        if ckpt and read_metadata(ckpt)["kind"] == "detect":
            raise LdaeError(
                f"{ckpt}: is a 'detect' checkpoint; evaluate it with --eval-only or continue its run "
                "with --resume RUN_DIR; training starts from a 'pretrain' or 'encoder' checkpoint"
            )
        return run(cfg, config, Init(ckpt, from_scratch), force=force)


def _eval_only(
    config: str | None,
    overrides: list[str],
    flags: dict,
    resume: str | None,
    ckpt: str | None,
    from_scratch: bool,
    force: bool,
) -> Path:
    if resume or from_scratch:
        raise LdaeError(
            "--eval-only evaluates --ckpt (a trained detect checkpoint); it takes neither --resume nor --from-scratch"
        )
    if not ckpt:
        raise LdaeError(f"--eval-only needs --ckpt, a `detect` checkpoint (e.g. runs/detect/<name>/{CHECKPOINT})")
    trained = load_checkpoint(ckpt, "detect")
    # results go next to the checkpoint (wherever it is now) unless --out says otherwise
    base = {**trained.config, "run": {**trained.config["run"], "out_dir": None}}
    cfg = load_config(DetectConfig, config, overrides, flags, base=base)
    return evaluate_checkpoint(cfg, trained, force)


@dataclass
class Init:
    ckpt: str | None  # pretrain / encoder checkpoint (with from_scratch: only its architecture is used)
    from_scratch: bool


def _check_resume_init(stored: Checkpoint, ckpt: str | None, from_scratch: bool) -> None:
    """--ckpt / --from-scratch on a resume may repeat the original command, but not change it."""
    stored.require(
        "init",
        "backbone.width",
        "backbone.depth",
        "backbone.num_heads",
        "backbone.patch_size",
        "backbone.pretrain_image_size",
    )
    was_scratch = stored.extra["init"] == "scratch"
    if from_scratch != was_scratch and (from_scratch or ckpt):
        raise LdaeError(
            f"--resume: {stored.path} was started {'--from-scratch' if was_scratch else 'from --ckpt'}; "
            "resume without changing that (or leave out --ckpt/--from-scratch)"
        )
    if not was_scratch:
        same_parent(stored, "--ckpt", ckpt, ("pretrain", "encoder"))


# ---------------------------------------------------------------------------------------------
# Building the detector
# ---------------------------------------------------------------------------------------------


def settings(cfg: DetectConfig, num_classes: int) -> detection.DetectorSpec:
    return detection.DetectorSpec(
        image_size=cfg.data.image_size,
        num_classes=num_classes,
        drop_path=cfg.backbone.drop_path,
        window_size=cfg.backbone.window_size,
        pyramid_channels=cfg.model.pyramid_channels,
        box_fc_dim=cfg.model.box_fc_dim,
        roi_batch_per_image=cfg.model.roi_batch_per_image,
    )


def resolve_backbone(
    cfg: DetectConfig, init: Init
) -> tuple[detection.BackboneSpec, dict[str, torch.Tensor] | None, list[dict]]:
    """(ViT shape, folded encoder weights or None for a random start, provenance parents)."""
    b = cfg.backbone
    if init.ckpt is None:
        shape = b.shape()
        if shape is None:
            raise LdaeError(
                "--from-scratch without --ckpt builds the ViT from the config, but backbone.size is "
                "null; set backbone.size (T, S, B, half-L, L, or custom with width/depth/num_heads)"
            )
        width, depth, heads = shape
        return detection.BackboneSpec(width, depth, heads, b.patch_size, b.pretrain_image_size), None, []
    vit, kwargs, source = load_encoder(init.ckpt, t=b.t, ema=b.ema)
    spec = detection.BackboneSpec.from_timm_kwargs(kwargs, init.ckpt)
    wanted = b.shape()
    if wanted is not None and wanted != (spec.width, spec.depth, spec.num_heads):
        raise LdaeError(
            f"{init.ckpt}: holds an encoder of width {spec.width}, {spec.depth} blocks, {spec.num_heads} "
            f"heads, but this config is for backbone.size {b.size} ({wanted[0]}, {wanted[1]} blocks, "
            f"{wanted[2]} heads); pick the matching configs/detect file or --set backbone.size=null"
        )
    if init.from_scratch:
        return spec, None, []
    role = "pretrain" if source.kind == "pretrain" else "encoder"
    return spec, vit.state_dict(), [source.parent_ref(role)]


def register_splits(cfg: DetectConfig) -> tuple[detection.CocoSplit, detection.CocoSplit]:
    if not cfg.data.path:
        raise LdaeError(
            "data.path is not set; give --data COCO_ROOT (annotations/instances_<split>.json and "
            "one image folder per split)"
        )
    train_split = detection.register_coco_split(cfg.data.path, cfg.data.train_split)
    eval_split = detection.register_coco_split(cfg.data.path, cfg.data.eval_split)
    if train_split.class_names != eval_split.class_names:
        raise LdaeError(
            f"{eval_split.json_file}: its categories differ from {train_split.json_file}'s; both "
            "splits must share one category list"
        )
    return train_split, eval_split


def run(
    cfg: DetectConfig,
    config_name: str | None,
    init_spec: Init | None,
    resume_ckpt: Checkpoint | None = None,
    force: bool = False,
) -> Path:
    if resume_ckpt is not None:
        spec = detection.BackboneSpec(**resume_ckpt.extra["backbone"])
        encoder_state, parents = None, resume_ckpt.provenance.get("parents", [])
        start_kind, report = resume_ckpt.extra["init"], resume_ckpt.extra.get("load_report")
    else:
        assert init_spec is not None  # a new run is given one
        spec, encoder_state, parents = resolve_backbone(cfg, init_spec)
        start_kind, report = ("scratch" if encoder_state is None else "pretrain"), None
    train_split, eval_split = register_splits(cfg)
    with session(
        "detect", "detect", cfg, config_name, resume_ckpt, force, config_file=config_name, resumable=RESUMABLE
    ) as s:
        cfg.optim.accumulation(s.ctx.world)  # a batch the ranks cannot split fails before the detector is built
        torch.manual_seed(cfg.run.seed)  # detector init: identical on every rank
        model = detection.build_detector(spec, settings(cfg, len(train_split.class_names)))
        if encoder_state is not None:
            assert init_spec is not None and init_spec.ckpt is not None  # the weights come from a --ckpt
            loaded = detection.load_encoder_into(model, encoder_state, init_spec.ckpt)
            report = loaded.to_dict()
            if s.ctx.is_main:
                console.print(loaded.summary())
                write_atomically(s.output("load_report.json"), (json.dumps(report, indent=1) + "\n").encode())
        model.to(s.ctx.device)
        description = {
            "backbone": spec.to_dict(),
            "num_classes": len(train_split.class_names),
            "class_names": train_split.class_names,
            "image_size": cfg.data.image_size,
            "init": start_kind,
            "load_report": report,
        }
        engine_detect.train(s, model, spec.depth, train_split, eval_split, description, parents)
        return s.checkpoint


# ---------------------------------------------------------------------------------------------
# Evaluation only
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(cfg: DetectConfig, trained: Checkpoint, force: bool = False) -> Path:
    """COCO AP of a trained detector on data.eval_split: eval-only-<split>.json (and pycocotools' tables) next to
    it, or in run.out_dir; files of that name are replaced only with --force."""
    out_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else trained.path.parent
    result = out_dir / f"eval-only-{cfg.data.eval_split}.json"
    text = out_dir / f"coco_eval-only-{cfg.data.eval_split}.txt"
    refuse_to_replace(
        result,
        force,
        "evaluation",
        "evaluation",
        inputs=(trained.path, *([Path(cfg.data.path)] if cfg.data.path else [])),
    )
    trained.require(
        "backbone.width",
        "backbone.depth",
        "backbone.num_heads",
        "backbone.patch_size",
        "backbone.pretrain_image_size",
        "num_classes",
        "class_names",
        "step",
    )
    if not cfg.data.path:
        raise LdaeError("data.path is not set; give --data COCO_ROOT")
    split = detection.register_coco_split(cfg.data.path, cfg.data.eval_split)
    if split.class_names != trained.extra["class_names"]:
        raise LdaeError(
            f"{split.json_file}: its {len(split.class_names)} categories differ from the "
            f"{trained.extra['num_classes']} the detector {trained.path} was trained on"
        )
    ctx = init(cfg.run.device)
    try:
        spec = detection.BackboneSpec(**trained.extra["backbone"])
        model = detection.build_detector(spec, settings(cfg, trained.extra["num_classes"]))
        load_state(model, trained.section("model"), str(trained.path))
        model.to(ctx.device)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        results = run_evaluation(model, split, cfg, text, ctx)
        if ctx.is_main:
            console.print(ap_table(results, f"COCO {cfg.data.eval_split}: {trained.path}"))
            record = {
                "checkpoint": str(trained.path),
                "sha256": trained.sha256,
                "step": trained.extra["step"],
                **results,
            }
            write_output(result, json.dumps(record).encode(), "evaluation")
        return result
    finally:
        shutdown(ctx)
