"""`ldae export`: the encoder folded at fixed t, as a timm ViT state dict (an `encoder` checkpoint) or as a folder
timm loads with `create_model("local-dir:DIR", pretrained=True)` (see pretrained.export_encoder / export_timm)."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.errors import LdaeError
from ldae_cli.pretrained import export_encoder, export_timm
from ldae_cli.rundir import refuse_to_replace


def main(ckpt: str, out: str, t: int, depth: int | None, ema: bool | None, force: bool = False,
         form: str = "ldae") -> Path:
    if form == "timm":
        target = Path(out)
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
            raise LdaeError(f"{target} already exists; pick another --out, or add --force to replace the export")
        return export_timm(ckpt, out, t, depth, ema)
    if form != "ldae":
        raise LdaeError(f"--format must be 'ldae' (one .safetensors checkpoint) or 'timm' (a folder), got {form!r}")
    refuse_to_replace(Path(out), force, "exported encoder")
    return export_encoder(ckpt, out, t, depth, ema)
