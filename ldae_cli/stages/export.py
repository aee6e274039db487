"""`ldae export`: the encoder folded at fixed t, as a plain timm ViT state dict (see pretrained.export_encoder)."""

from __future__ import annotations

from pathlib import Path

from ldae_cli.pretrained import export_encoder
from ldae_cli.rundir import refuse_to_replace


def main(ckpt: str, out: str, t: int, depth: int | None, ema: bool | None, force: bool = False) -> Path:
    refuse_to_replace(Path(out), force, "exported encoder")
    return export_encoder(ckpt, out, t, depth, ema)
