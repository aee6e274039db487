"""The `ldae` command line: parse options, call the stage, print. Nothing else lives here.

Each command imports its stage inside its function (so `ldae --help` and shell completion load no torch) and calls
the stage's `main` with keyword arguments. Defaults are written in one style, "(default: ...)", whether the value
lives in a config dataclass or on the command line.
"""

from __future__ import annotations

import errno
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
import typer.core
from rich.markup import escape

from ldae_cli import __version__
from ldae_cli.errors import Finished, Interrupted, LdaeError, Terminated
from ldae_cli.runs.logs import console, err_console, kept

app = typer.Typer(
    name="ldae",
    help="Latent denoising autoencoders (l-DAE): fit a PCA tokenizer, pretrain, and evaluate by linear probing, "
    "fine-tuning and COCO detection. Every stage reads YAML configs and shares one checkpoint format.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}
_typed = typer.core.TyperOption.display_type_rich


def _untyped_flags(option, ctx):
    """typer labels an on/off flag `<bool>` in help although it takes no value; a flag shows no type."""
    return None if option.is_flag else _typed(option, ctx)


typer.core.TyperOption.display_type_rich = _untyped_flags  # type: ignore[method-assign]  # intended typer patch


def opt(default, *names: str, help: str, **kwargs):
    """An option with a literal default, shown as "(default: X)" like the config-backed ones."""
    return typer.Option(default, *names, help=f"{help} (default: {default})", show_default=False, **kwargs)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config: a path, or a name in the bundled configs/.")
SetOpt = typer.Option(None, "--set", help="Override any config key, e.g. --set optim.epochs=10 (repeatable).")
DataOpt = typer.Option(
    None,
    "--data",
    help="Dataset: a folder of images, a <split>/<class>/<image> tree, a .tar/.tar.gz "
    "of either, Fashion-MNIST IDX files or a prepared dataset; its kind is detected (sets data.path).",
)
SourceOpt = typer.Option(
    None, "--source", help="Dataset kind instead of detecting it: fashion-mnist, cifar10, imagefolder or images."
)
EvalSplitOpt = typer.Option(
    None,
    "--eval-split",
    help="Evaluation split of a class tree (sets data.eval_split; default: the first of val, validation, test).",
)
OutOpt = typer.Option(None, "--out", help="Run directory (sets run.out_dir).")
ResumeOpt = typer.Option(
    None, "--resume", help="Continue the run in this directory (or checkpoint) exactly where it stopped."
)
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda (sets run.device).")
CkptOpt = typer.Option(
    None, "--ckpt", help="A pretrain checkpoint, or an encoder from `ldae export` (a file or a --format timm folder)."
)
ForceOpt = typer.Option(
    False,
    "--force",
    help="Replace what ldae wrote at the output location (an earlier run of "
    "ldae's, a file it wrote); never files ldae did not write. Without it nothing is overwritten.",
)
ContinueOpt = typer.Option(
    False,
    "--continue",
    help="Start the run in --out, or continue it when --out already "
    "holds this same run (a finished one: nothing to do); another run there is refused.",
)
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the resolved config (YAML) and exit.")
DryRunOpt = typer.Option(
    False,
    "--dry-run",
    help="Check everything a start checks and print the plan (steps, "
    "epochs, batch split, memory, an estimated time), then exit; nothing is written.",
)


def data_flags(data: str | None, source: str | None, eval_split: str | None = None) -> dict:
    """--data alone detects what the folder holds (data.source auto), whatever kind the config names."""
    return {"data.path": data, "data.source": source or ("auto" if data else None), "data.eval_split": eval_split}


def preview(print_config: bool, dry_run: bool) -> str | None:
    if print_config:
        console.quiet = True  # stdout is the YAML alone, ready for --config
    return "config" if print_config else "plan" if dry_run else None


def check_config(name: str, config: str | None, overrides: list[str] | None, flags: dict) -> None:
    """A new run's config read as its stage will read it, before the stage loads torch: a config or --set error
    comes in a second. Only where the stage reads exactly this, or this over the data section a --ckpt records
    (probe, finetune: checked against the defaults instead, it refuses nothing the start accepts); never for
    --resume, whose base is the run's stored config."""
    from ldae_cli.config import load_config
    from ldae_cli.settings import evaluation as eval_settings
    from ldae_cli.settings import training as settings

    load_config(getattr(settings, name, None) or getattr(eval_settings, name), config, overrides or [], flags)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldae {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug


class _Interruption(Exception):
    """Carries a KeyboardInterrupt (Ctrl-C, SIGTERM) out of a command: Typer would swallow the interrupt itself."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


def call(main: Callable, **kwargs):
    """Run a stage's `main`, an interrupt carried past Typer."""
    try:
        return main(**kwargs)
    except KeyboardInterrupt as exc:
        raise _Interruption(exc) from None


@app.command("fit-pca")
def fit_pca(
    patch: Optional[int] = typer.Option(None, "--patch", help="Patch size p (D = p*p*3). (default: 16)"),
    dim: Optional[int] = typer.Option(None, "--dim", help="Kept components d. (default: 16)"),
    patches: Optional[int] = typer.Option(None, "--patches", help="Random patches to sample. (default: 1000000)"),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Images are center-cropped and resized to this."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint file to write."),
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Fit the patch-wise PCA tokenizer (mean patch, full basis, eigenvalues, latent scales) and draw its filters."""
    flags = {
        "pca.patch": patch,
        "pca.dim": dim,
        "pca.patches": patches,
        "data.image_size": image_size,
        **data_flags(data, source),
        "out": out,
    }
    check_config("FitPCAConfig", config, overrides, flags)
    from ldae_cli.stages import fit_pca as stage

    call(stage.main, config=config, overrides=overrides or [], force=force, flags=flags)


@app.command("prepare-data")
def prepare_data(
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Side the images are center-cropped and resized to (sets data.image_size)."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Folder of the prepared dataset."),
    margin: Optional[float] = typer.Option(
        None,
        "--margin",
        help="Store image-size x margin (e.g. 1.15) for random-resized crops at load time. (default: 1)",
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding processes (sets data.num_workers)."),
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    eval_split: Optional[str] = EvalSplitOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
    verify: Optional[str] = typer.Option(
        None,
        "--verify",
        help="Check every file of the prepared dataset in this folder against its recorded sha256, then exit.",
    ),
) -> None:
    """Decode a dataset once into memory-mappable uint8 shards; `--data DIR` of the result works in every stage."""
    from ldae_cli.stages import prepare_data as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        force=force,
        verify=verify,
        flags={
            "data.image_size": image_size,
            "out": out,
            "margin": margin,
            "data.num_workers": workers,
            **data_flags(data, source, eval_split),
        },
    )


@app.command("train-tokenizer")
def train_tokenizer(
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    eval_split: Optional[str] = EvalSplitOpt,
    out: Optional[str] = OutOpt,
    resume: Optional[str] = ResumeOpt,
    device: Optional[str] = DeviceOpt,
    force: bool = ForceOpt,
    cont: bool = ContinueOpt,
    print_config: bool = PrintConfigOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Train a conv VAE / VQGAN-style / patch VAE / patch AE tokenizer for the trajectory rows that need one."""
    flags = {**data_flags(data, source, eval_split), "run.out_dir": out, "run.device": device}
    if config is not None and resume is None:
        check_config("TrainTokenizerConfig", config, overrides, flags)
    from ldae_cli.stages import train_tokenizer as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        resume=resume,
        force=force,
        cont=cont,
        preview=preview(print_config, dry_run),
        flags=flags,
    )


@app.command("pretrain")
def pretrain(
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    eval_split: Optional[str] = EvalSplitOpt,
    out: Optional[str] = OutOpt,
    resume: Optional[str] = ResumeOpt,
    device: Optional[str] = DeviceOpt,
    force: bool = ForceOpt,
    cont: bool = ContinueOpt,
    init_from: Optional[str] = typer.Option(
        None,
        "--init-from",
        help="Start a new run from this pretrain "
        "checkpoint's weights (its config is the base; network and tokenizer "
        "stay, optimizer, schedule, epochs, data and objective may change).",
    ),
    budget: Optional[str] = typer.Option(
        None,
        "--budget",
        help="Size a new run to --data and this time: 30m, 2h, "
        "1d at this machine's measured speed, or 8xH100:12h for N GPUs (image "
        "size, patch, d, model, batch, epochs, online probe; sizes --config when "
        "given, else final.yaml; --print-config shows it).",
    ),
    print_config: bool = PrintConfigOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Pretrain a DiT-style denoising model: any row of the deconstruction trajectory, l-DAE by default.

    Launch on several GPUs or nodes with `torchrun --nproc-per-node N -m ldae_cli pretrain ...`.
    """
    flags = {**data_flags(data, source, eval_split), "run.out_dir": out, "run.device": device}
    if config is not None and resume is None and init_from is None and budget is None:
        check_config("PretrainConfig", config, overrides, flags)
    from ldae_cli.stages import pretrain as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        resume=resume,
        force=force,
        cont=cont,
        init_from=init_from,
        budget=budget,
        preview=preview(print_config, dry_run),
        flags=flags,
    )


@app.command("probe")
def probe(
    ckpt: Optional[str] = CkptOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    eval_split: Optional[str] = EvalSplitOpt,
    out: Optional[str] = OutOpt,
    resume: Optional[str] = ResumeOpt,
    device: Optional[str] = DeviceOpt,
    t: Optional[int] = typer.Option(None, "--t", help="Fixed timestep the encoder is folded at. (default: 10)"),
    depth: Optional[int] = typer.Option(
        None, "--depth", help="Encoder blocks used (default: the encoder/decoder split)."
    ),
    noisy: Optional[bool] = typer.Option(
        None, "--noisy/--clean", help="Add the level-t latent noise to the input (default: clean)."
    ),
    fast: Optional[bool] = typer.Option(
        None,
        "--fast/--full",
        help="Fast: features extracted once, no augmentation "
        "(+ k-NN). Full: the MAE protocol with crops and flips every epoch "
        "(default: the config's probe.fast).",
    ),
    random_init: bool = typer.Option(False, "--random-init", help="Probe the same architecture untrained (baseline)."),
    force: bool = ForceOpt,
    cont: bool = ContinueOpt,
    print_config: bool = PrintConfigOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Linear-probe a pretrained encoder (MAE protocol: BN without affine + linear head, LARS), several lrs at once."""
    flags = {
        **data_flags(data, source, eval_split),
        "run.out_dir": out,
        "run.device": device,
        "probe.t": t,
        "probe.depth": depth,
        "probe.noisy_input": noisy,
        "probe.fast": fast,
    }
    if config is not None and resume is None:  # without --config the data's size picks one: not known here
        check_config("ProbeConfig", config, overrides, flags)
    from ldae_cli.stages import probe as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        resume=resume,
        ckpt=ckpt,
        random_init=random_init,
        force=force,
        cont=cont,
        preview=preview(print_config, dry_run),
        flags=flags,
    )


@app.command("finetune")
def finetune(
    ckpt: Optional[str] = CkptOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    eval_split: Optional[str] = EvalSplitOpt,
    out: Optional[str] = OutOpt,
    resume: Optional[str] = ResumeOpt,
    device: Optional[str] = DeviceOpt,
    from_scratch: bool = typer.Option(
        False,
        "--from-scratch",
        help="Same network, randomly initialised (the baseline every fine-tuning result is read against).",
    ),
    force: bool = ForceOpt,
    cont: bool = ContinueOpt,
    print_config: bool = PrintConfigOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Fine-tune a pretrained encoder end to end (MAE recipe: mixup, cutmix, RandAug, layer decay, EMA)."""
    flags = {**data_flags(data, source, eval_split), "run.out_dir": out, "run.device": device}
    if (config is not None or overrides) and resume is None:
        check_config("FinetuneConfig", config, overrides, flags)
    from ldae_cli.stages import finetune as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        resume=resume,
        ckpt=ckpt,
        from_scratch=from_scratch,
        force=force,
        cont=cont,
        preview=preview(print_config, dry_run),
        flags=flags,
    )


@app.command("detect")
def detect(
    ckpt: Optional[str] = CkptOpt,
    config: Optional[str] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = typer.Option(None, "--data", help="COCO root: image folders + annotations/instances_*.json."),
    out: Optional[str] = OutOpt,
    resume: Optional[str] = ResumeOpt,
    device: Optional[str] = DeviceOpt,
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Randomly initialised backbone (baseline)."),
    eval_only: bool = typer.Option(False, "--eval-only", help="Only evaluate --ckpt, a trained `detect` checkpoint."),
    force: bool = ForceOpt,
    cont: bool = ContinueOpt,
    print_config: bool = PrintConfigOpt,
    dry_run: bool = DryRunOpt,
) -> None:
    """Train and evaluate ViTDet Mask R-CNN on COCO from a pretrained encoder (detectron2): box AP and mask AP."""
    flags = {"data.path": data, "run.out_dir": out, "run.device": device}
    if (config is not None or overrides) and resume is None and not eval_only:  # --eval-only: the checkpoint's config
        check_config("DetectConfig", config, overrides, flags)
    from ldae_cli.stages import detect as stage

    call(
        stage.main,
        config=config,
        overrides=overrides or [],
        resume=resume,
        ckpt=ckpt,
        from_scratch=from_scratch,
        eval_only=eval_only,
        force=force,
        cont=cont,
        preview=preview(print_config, dry_run),
        flags=flags,
    )


@app.command("denoise")
def denoise(
    images: Optional[List[str]] = typer.Argument(None, help="Images and/or folders of images."),
    samples: Optional[int] = typer.Option(
        None,
        "--samples",
        help="Also denoise N images of the checkpoint's own evaluation split: mean PSNR and one panel of the first 8.",
    ),
    ckpt: Optional[str] = typer.Option(
        None, "--ckpt", help="Pretrain checkpoint (default: the newest pretrain checkpoint anywhere under runs/)."
    ),
    t: Optional[int] = typer.Option(None, "--t", help="Timestep of the noise added. (default: T/4)"),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Noise level instead of --t (latent units)."),
    seed: int = opt(0, "--seed", help="Seed of the noise."),
    out: Optional[str] = typer.Option(
        None, "--out", help="Output PNG (one image) or folder (default: runs/denoise/<run>/)."
    ),
    compare_pixel_noise: bool = typer.Option(
        False, "--compare-pixel-noise", help="Add the paper's Fig. 6: the same sigma in pixels vs in the latent."
    ),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Use the EMA weights (default: if present)."),
    device: str = opt("auto", "--device", help="auto, cpu or cuda."),
    force: bool = ForceOpt,
    eval_split: Optional[str] = typer.Option(
        None,
        "--eval-split",
        help="The split --samples takes its images from (default: the checkpoint's evaluation split).",
    ),
) -> None:
    """Denoise images with a pretrained model: writes clean | noisy | denoised panels (the paper's Fig. 7)."""
    from ldae_cli.stages import denoise as stage

    call(
        stage.main,
        inputs=images,
        ckpt=ckpt,
        t=t,
        sigma=sigma,
        seed=seed,
        out=out,
        ema=ema,
        device=device,
        compare_pixel_noise=compare_pixel_noise,
        samples=samples,
        force=force,
        eval_split=eval_split,
    )


@app.command("study")
def study(
    name: str = typer.Argument(
        ...,
        help="A study: a name in configs/study/ (pixel-vs-latent, pixel-dim, latent-dim, "
        "trajectory, trajectory-start, noise, depth) or a YAML file.",
    ),
    budget: str = opt(
        "cpu", "--budget", help="cpu, cpu-long, cpu-64, gpu, gpu-64 or paper (configs/study/budget/), or a YAML file."
    ),
    seeds: int = opt(1, "--seeds", help="Seeds per variant; variants of one seed share it (paired differences)."),
    out: Optional[str] = typer.Option(None, "--out", help="Study directory (default: runs/study/NAME/BUDGET)."),
    data: Optional[str] = DataOpt,
    source: Optional[str] = SourceOpt,
    overrides: Optional[List[str]] = SetOpt,
    nproc: int = opt(1, "--nproc", help="GPUs per run (each run is launched with torchrun when > 1)."),
    jobs: int = opt(
        1,
        "--jobs",
        help="Runs at once on this machine, each with its own --nproc GPUs (CUDA_VISIBLE_DEVICES) or, on a CPU, "
        "its share of the cores; a probe starts as soon as its pretrain has finished.",
    ),
    launch: Optional[str] = typer.Option(
        None,
        "--launch",
        help="slurm: submit every run as a SLURM job through submitit (a probe held until its pretrain succeeds); "
        "local: the same through submitit's local executor. Default: child processes of this command.",
    ),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition (with --launch slurm)."),
    time_min: int = opt(
        60 * 24, "--time", help="Time limit of one job, minutes (with --launch); a job is requeued at its limit."
    ),
    cpus_per_task: int = opt(10, "--cpus-per-task", help="CPU cores per task of a job (with --launch)."),
    slurm: Optional[List[str]] = typer.Option(
        None, "--slurm", help="Extra sbatch setting KEY=VALUE for every job (repeatable), e.g. --slurm account=proj."
    ),
    pretrains: Optional[str] = typer.Option(
        None,
        "--pretrains",
        help="Folder of the pretrain runs (default: OUT/"
        "pretrain), each named by its settings beyond the budget's: studies "
        "given the same folder share the runs they both ask for.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="List the study's runs (each pretrain and probe, its "
        "settings and seed, which are done) and the time the rest takes, timed on this "
        "machine in seconds, then exit; nothing is written or trained.",
    ),
) -> None:
    """Run one of the paper's comparisons: every variant pretrained and probed (linear + k-NN) under one budget,
    with baselines; writes results.json, results.md and results.png. Finished runs are skipped on a re-run."""
    from ldae_cli.stages import study as stage

    call(
        stage.main,
        name=name,
        budget=budget,
        seeds=seeds,
        out=out,
        data=data,
        source=source,
        overrides=overrides or [],
        nproc=nproc,
        pretrains=pretrains,
        dry_run=dry_run,
        jobs=jobs,
        launch=launch,
        partition=partition,
        time_min=time_min,
        cpus_per_task=cpus_per_task,
        sbatch=slurm or [],
        runner_fn=run_in_process,
    )


@app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    local: bool = typer.Option(
        False,
        "--local",
        help="Run the job on this machine (submitit's local executor) "
        "instead of SLURM: the same requeue and resume, for testing.",
    ),
    nodes: int = opt(1, "--nodes", help="SLURM nodes."),
    gpus_per_node: int = opt(1, "--gpus-per-node", help="GPUs per node: one task (rank) each."),
    cpus_per_task: int = opt(10, "--cpus-per-task", help="CPU cores per task (data loading)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM partition."),
    time_min: int = opt(
        60 * 24, "--time", help="Time limit of one job, minutes; the run is requeued and continues when it is reached."
    ),
    folder: str = opt("runs/launch/%j", "--folder", help="submitit's folder: job scripts and logs."),
    slurm: Optional[List[str]] = typer.Option(
        None,
        "--slurm",
        help="Extra sbatch setting KEY=VALUE (repeatable), e.g. --slurm account=proj --slurm constraint=h100.",
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to finish and print where its run is."),
) -> None:
    """Run a training command as a SLURM job (submitit): `ldae launch --nodes 2 --gpus-per-node 8 -- pretrain
    --config final.yaml --out runs/pretrain/final`. Preempted or timed out, it is requeued and resumes its run."""
    from ldae_cli.stages import launch as stage

    call(
        stage.main,
        argv=list(ctx.args),
        runner=run_in_process,
        local=local,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        partition=partition,
        time_min=time_min,
        folder=folder,
        sbatch=slurm or [],
        wait=wait,
    )


@app.command("export")
def export(
    ckpt: str = typer.Option(..., "--ckpt", help="A pretrain checkpoint."),
    out: str = typer.Option(
        ..., "--out", help="Where to write the encoder (.safetensors, or a folder for --format timm)."
    ),
    t: int = opt(10, "--t", help="The fixed timestep the adaLN blocks are folded at."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Encoder blocks to keep (default: the encoder)."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Use the EMA weights (default: if present)."),
    form: str = opt(
        "ldae",
        "--format",
        help="ldae: one .safetensors checkpoint (timm state dict + kwargs in its "
        "metadata); timm: a folder for timm.create_model('local-dir:OUT', pretrained=True).",
    ),
    force: bool = ForceOpt,
) -> None:
    """Fold the encoder at fixed t into a plain ViT and save it as a timm `VisionTransformer` state dict.

    Load it with `timm.models.vision_transformer.VisionTransformer(**kwargs)` (class_token=False,
    global_pool='avg', act_layer='gelu_tanh'; the kwargs are in the file's metadata) and
    `safetensors.torch.load_file`.
    """
    from ldae_cli.stages import export as stage

    typer.echo(f"wrote {call(stage.main, ckpt=ckpt, out=out, t=t, depth=depth, ema=ema, force=force, form=form)}")


@app.command("info")
def info(
    path: str = typer.Argument(
        ...,
        metavar="CKPT",
        help="A checkpoint (.safetensors), a run directory, or a folder written by `ldae export --format timm`.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON, for scripts."),
) -> None:
    """Describe a checkpoint: kind, versions, training progress, the config in brief, provenance (each parent
    verified by its sha256), size, parameters and the run's last metrics."""
    from ldae_cli.stages import info as stage

    call(stage.main, path=path, as_json=as_json)


@app.command("report")
def report(
    paths: List[str] = typer.Argument(..., help="Run directories (metrics.jsonl) and/or checkpoints."),
    force: bool = ForceOpt,
) -> None:
    """Draw the pictures a run's files hold: curves from metrics.jsonl (report.png), filters of a PCA checkpoint."""
    from ldae_cli.stages import report as stage

    for written in call(stage.main, paths=paths, force=force):
        typer.echo(f"wrote {written}")


def _terminate(signum, frame):
    raise Terminated()


def run_in_process(argv: list[str]) -> None:
    """Run `ldae ARGV` in this process (what a submitit job of `ldae launch` calls, by reference), its errors and
    interrupts raised as they are; a run that had finished already is not an error."""
    try:
        app(args=argv, standalone_mode=False)
    except _Interruption as wrapped:
        raise wrapped.interrupt from None
    except Finished as done:
        console.print(escape(str(done)))


def _interrupted(exc: KeyboardInterrupt) -> str:
    if isinstance(exc, Interrupted):  # a training loop stopped cleanly and says what it kept
        return str(exc)
    how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    saved = kept()
    if saved:
        return f"{how}; kept: {saved}"
    return f"{how} before anything of this run was saved; nothing to resume"


def _os_error(exc: OSError) -> str:
    """A file-system failure outside the writers that already explain themselves, named with its file."""
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = Path(where).parent if exc.filename else Path.cwd()
        free = shutil.disk_usage(folder).free / 2**20 if folder.exists() else 0.0
        return f"no space left writing {where} ({free:,.1f} MB free in {folder}); free some space or pick another --out"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({exc.strerror}); pick a writable --out"
    return f"{where}: {exc.strerror or exc}"


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.quiet = False


def _run() -> None:
    try:
        # standalone_mode=False: usage errors reach us, to be printed as one line like every other error
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        err_console.print(escape(_interrupted(KeyboardInterrupt())))
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors (Typer vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `ldae`: the help was printed
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.format_message())}{where}")
        sys.exit(getattr(exc, "exit_code", 2))
    except Finished as exc:
        console.print(escape(str(exc)))
        sys.exit(0)
    except (LdaeError, OSError) as exc:
        if _state["debug"]:
            raise
        message = str(exc) if isinstance(exc, LdaeError) else _os_error(exc)
        err_console.print(f"[bold red]error:[/bold red] {escape(message)}")
        sys.exit(1)
    except (KeyboardInterrupt, _Interruption) as exc:
        interrupt = exc.interrupt if isinstance(exc, _Interruption) else exc
        err_console.print(escape(_interrupted(interrupt)))
        sys.exit(
            interrupt.code if isinstance(interrupt, Interrupted) else 143 if isinstance(interrupt, Terminated) else 130
        )
    except Exception as exc:  # an ldae bug or an unexpected library failure: still one line unless --debug
        if _state["debug"]:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"[bold red]error:[/bold red] {type(exc).__name__}: {escape(first)} (rerun with --debug for the "
            "full traceback)"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
