"""The image files a list of paths names: files as given, folders searched recursively, each file once."""

from __future__ import annotations

import os
from pathlib import Path

from ldae_cli.errors import LdaeError
from ldae_cli.sources import IMAGE_EXTENSIONS


def collect_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """The image files named or found in folders (sorted within each folder), in the order given, each once."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise LdaeError(f"{path}: no images in this folder")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise LdaeError(f"{path}: no such image or folder")
    unique = {f.resolve(): f for f in files}
    return list(unique.values())
