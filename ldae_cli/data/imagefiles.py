"""The image files a list of paths names: files as given, folders searched recursively (but for links leading out
of them), each file once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ldae_cli.data.sources import images_under, note_escaping
from ldae_cli.errors import LdaeError


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named or found in folders (sorted within each folder), in the order given, each once."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # a link in it that leads outside it is skipped, with a count printed
            found, outside = images_under(path, path)
            told = note_escaping(outside, path, path)
            if not found:
                raise LdaeError(f"{path}: no images in this folder{told}")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise LdaeError(f"{path}: no such image or folder")
    unique = {f.resolve(): f for f in files}
    return list(unique.values())
