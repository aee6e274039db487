"""`ldae export`: the encoder folded at fixed t, as a timm ViT state dict (an `encoder` checkpoint) or as a folder
timm loads with `create_model("local-dir:DIR", pretrained=True)` (see pretrained.export_encoder / export_timm).

An export never eats its input, a run or a user's file: --out may not be the checkpoint read, a file of a run, or any
file but an earlier export (outputs.refuse_to_replace); `--format timm --force` replaces only a folder `ldae export`
wrote (its marker lists its files). Both record the data the encoder was pretrained on (settings, absolute path,
identity), which probe and finetune read when no --data is given (pretrained.pretraining_data)."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.errors import LdaeError
from ldae_cli.model.pretrained import TIMM_EXPORT_FILES, export_encoder, export_timm
from ldae_cli.runs import outputs, rundir


def main(
    ckpt: str, out: str, t: int, depth: int | None, ema: bool | None, force: bool = False, form: str = "ldae"
) -> Path:
    target = Path(out)
    if form == "timm":
        return export_folder(ckpt, target, t, depth, ema, force)
    if form != "ldae":
        raise LdaeError(f"--format must be 'ldae' (one .safetensors checkpoint) or 'timm' (a folder), got {form!r}")
    outputs.refuse_to_replace(target, force, "exported encoder", "encoder", inputs=(Path(ckpt),))
    return export_encoder(ckpt, out, t, depth, ema)


def export_folder(ckpt: str, target: Path, t: int, depth: int | None, ema: bool | None, force: bool) -> Path:
    """The timm folder: a new folder, an empty one, or (with --force) one that `ldae export` wrote."""
    if target.exists() and not target.is_dir():
        raise LdaeError(f"{target} is a file; --format timm writes a folder, give a folder name")
    if Path(ckpt).resolve().parent == target.resolve():
        raise LdaeError(f"--out {target} holds the checkpoint being exported; pick another folder")
    target.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(target, "export")
    lock.acquire()
    try:
        manifest = rundir.claim(target, "export", force, replaces=("export",))
        manifest.add(*TIMM_EXPORT_FILES)
        return export_timm(ckpt, target, t, depth, ema)
    finally:
        lock.release()
