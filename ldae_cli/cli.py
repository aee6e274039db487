"""The `ldae` command line: parse options, call the stage, print. Nothing else lives here."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from ldae_cli import __version__
from ldae_cli.config import load_config
from rich.markup import escape

from ldae_cli.errors import LdaeError
from ldae_cli.reporting import err_console

app = typer.Typer(
    name="ldae",
    help="Latent denoising autoencoders (l-DAE): fit a PCA tokenizer, pretrain, and evaluate by linear probing, "
         "fine-tuning and COCO detection. Every stage reads YAML configs and shares one checkpoint format.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config: a path, or a name in the bundled configs/.")
SetOpt = typer.Option(None, "--set", help="Override any config key, e.g. --set optim.epochs=10 (repeatable).")
DataOpt = typer.Option(None, "--data", help="Dataset location (sets data.path).")
SourceOpt = typer.Option(None, "--source", help="Dataset kind: fashion-mnist, cifar10, imagefolder or images.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldae {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    _state["debug"] = debug


@app.command("fit-pca")
def fit_pca(
    patch: Optional[int] = typer.Option(None, "--patch", help="Patch size p (D = p*p*3). [default: 16]"),
    dim: Optional[int] = typer.Option(None, "--dim", help="Kept components d. [default: 16]"),
    patches: Optional[int] = typer.Option(None, "--patches", help="Random patches to sample. [default: 1000000]"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Images are center-cropped and resized to this."),
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint file to write."),
    data: Optional[str] = DataOpt, source: Optional[str] = SourceOpt,
    config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Fit the patch-wise PCA tokenizer (mean patch, full basis, eigenvalues, latent scales) and draw its filters."""
    from ldae_cli.stages import fit_pca as stage

    cfg = load_config(stage.FitPCAConfig, config, overrides or [], {
        "pca.patch": patch, "pca.dim": dim, "pca.patches": patches, "data.image_size": image_size,
        "data.path": data, "data.source": source, "out": out})
    stage.run(cfg)


def _not_built(stage: str, issue: int) -> None:
    raise LdaeError(f"`ldae {stage}` is not built yet (planned in issue {issue}); nothing was run")


@app.command("train-tokenizer")
def train_tokenizer(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Train a conv VAE / VQGAN-style / patch VAE / patch AE tokenizer for the trajectory rows that need one."""
    _not_built("train-tokenizer", 6)


@app.command("pretrain")
def pretrain(
    config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
    data: Optional[str] = DataOpt, source: Optional[str] = SourceOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (sets run.out_dir)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory (or checkpoint) "
                                         "exactly where it stopped."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (sets run.device)."),
) -> None:
    """Pretrain a DiT-style denoising model: any row of the deconstruction trajectory, l-DAE by default.

    Launch on several GPUs or nodes with `torchrun --nproc-per-node N -m ldae_cli pretrain ...`.
    """
    from ldae_cli.stages import pretrain as stage

    if config is None and resume is None:
        raise LdaeError("pretrain needs --config (e.g. --config final.yaml, or a row such as trajectory/T3.5) "
                        "or --resume RUN_DIR")
    cfg, ckpt = stage.load_pretrain_config(config, overrides or [], {
        "data.path": data, "data.source": source, "run.out_dir": out, "run.device": device}, resume)
    stage.run(cfg, config, ckpt)


@app.command("export")
def export(
    ckpt: str = typer.Option(..., "--ckpt", help="A pretrain checkpoint."),
    out: str = typer.Option(..., "--out", help="Where to write the encoder (.safetensors)."),
    t: int = typer.Option(10, "--t", help="The fixed timestep the adaLN blocks are folded at."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Encoder blocks to keep [default: the encoder]."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Use the EMA weights [default: if present]."),
) -> None:
    """Fold the encoder at fixed t into a plain ViT and save it as a timm `VisionTransformer` state dict.

    Load it with `timm.models.vision_transformer.VisionTransformer(**kwargs)` (class_token=False,
    global_pool='avg', act_layer='gelu_tanh'; the kwargs are in the file's metadata) and
    `safetensors.torch.load_file`.
    """
    from ldae_cli.pretrained import export_encoder

    path = export_encoder(ckpt, out, t, depth, ema)
    typer.echo(f"wrote {path}")


@app.command("probe")
def probe(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Linear-probe a pretrained encoder (MAE protocol: BN without affine + linear head, LARS)."""
    _not_built("probe", 5)


@app.command("finetune")
def finetune(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Fine-tune a pretrained encoder end to end (MAE recipe: mixup, cutmix, RandAug, layer decay, EMA)."""
    _not_built("finetune", 7)


@app.command("detect")
def detect(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Train and evaluate ViTDet Mask R-CNN on COCO from a pretrained encoder (detectron2)."""
    _not_built("detect", 8)


@app.command("denoise")
def denoise(images: Optional[List[str]] = typer.Argument(None, help="Images or folders.")) -> None:
    """Denoise images with a pretrained model and write clean | noisy | denoised panels."""
    _not_built("denoise", 4)


def main() -> None:
    try:
        app()
    except LdaeError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted (checkpoints already written are kept; training stages resume with --resume)")
        sys.exit(130)
    except Exception as exc:  # an ldae bug or an unexpected library failure: still one line unless --debug
        if _state["debug"]:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(f"[bold red]error:[/bold red] {type(exc).__name__}: {escape(first)} (rerun with --debug for the "
                          "full traceback)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
