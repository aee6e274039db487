"""Single-file outputs (a PCA file and its sidecars, an exported encoder, a panel, a report, an evaluation) prove
in themselves that ldae wrote them: a checkpoint by its `ldae.kind` metadata, a PNG by an `ldae` text chunk right
after its header, a JSON file by its first key `ldae`, a YAML file by its first line `# ldae: <kind>`, each naming
the kind of output. The proof travels with the file (a renamed or copied output stays provable, a sidecar needs no
other file) and costs one read of its head. `--force` replaces a file only when it names the kind being written; a
user's file, a link (it is the user's, wherever it points), a FIFO or device, an input of the command or anything
inside a folder the command reads (its dataset) is never replaced. Outputs are written by atomic rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldae_cli.errors import LdaeError
from ldae_cli.runs.rundir import CHECKPOINT, Manifest, check_own, open_own, write_atomically


def refuse_to_replace(path: Path, force: bool, what: str, kind: str, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to write the single-file output `path` (of `kind`, see `write_output`) over anything but an earlier
    output of that kind, and that only with --force; never over or inside one of the command's `inputs` (files,
    or folders such as a dataset), nor over a link, a FIFO or device, or a run's files."""
    target = path.resolve()
    for given in map(Path, inputs):
        real = given.resolve()
        if real == target:
            raise LdaeError(
                f"{path} is also an input of this command; writing the {what} there would destroy it; "
                "pick another --out"
            )
        if real.is_dir() and target.is_relative_to(real):
            raise LdaeError(
                f"{path} is inside {given}, which this command reads; the {what} is never written into "
                "its own input; pick an --out outside it"
            )
    check_own(path)  # a link (the user's, wherever it points), folder, FIFO or device is named
    if not path.exists():
        return
    manifest = Manifest.read(path.parent)
    if path.name == CHECKPOINT or (manifest is not None and path.name in manifest.files):
        raise LdaeError(
            f"{path} belongs to the run in {path.parent}; pick another --out (--force never replaces a run's files)"
        )
    found = stamp(path)
    if found is None:
        raise LdaeError(
            f"{path} already exists and ldae did not write it (--force replaces only ldae's own {what}); "
            "move it away or pick another --out"
        )
    if found != kind:
        from ldae_cli.runs.checkpoint import KINDS

        raise LdaeError(
            f"{path} is a '{found}' {'checkpoint' if found in KINDS else 'output'} of ldae; --force "
            f"replaces it only with another of its kind, never with the {what}; pick another --out"
        )
    if not force:
        raise LdaeError(f"{path} already exists; pick another --out, or add --force to replace the {what}")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_HEAD = 33  # the signature and the IHDR chunk, which PNG puts first


def write_output(path: Path, data: bytes, kind: str) -> Path:
    """Write a single-file output (PNG, JSON object, or YAML text) stamped as ldae's `kind` (see `stamp`), by atomic
    rename: a link at `path` is replaced, never written through."""
    import zlib

    if data.startswith(PNG_SIGNATURE):
        body = b"tEXtldae\0" + kind.encode()
        chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
        data = data[:PNG_HEAD] + chunk + data[PNG_HEAD:]
    elif data.startswith(b"{"):
        data = (json.dumps({"ldae": kind, **json.loads(data)}, indent=1) + "\n").encode()
    else:
        data = f"# ldae: {kind}\n".encode() + data
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    return path


def stamp(path: Path) -> str | None:
    """The kind of output the regular file `path` says ldae wrote it as (`write_output`'s stamp, or a checkpoint's
    kind); None for any other file."""
    from ldae_cli.runs.checkpoint import read_metadata

    try:
        fd = open_own(path, os.O_RDONLY)  # never blocks on a FIFO put there meanwhile
        with os.fdopen(fd, "rb") as f:
            head = f.read(4096)
        if head.startswith(PNG_SIGNATURE):
            size = int.from_bytes(head[PNG_HEAD : PNG_HEAD + 4], "big")
            chunk = head[PNG_HEAD + 4 : PNG_HEAD + 8 + size]
            return chunk[9:].decode() if chunk.startswith(b"tEXtldae\0") else None
        for prefix, end in ((b"# ldae: ", b"\n"), (b'{\n "ldae": "', b'"')):
            if head.startswith(prefix):
                return head[len(prefix) :].split(end, 1)[0].decode()
        return read_metadata(path)["kind"]
    except (LdaeError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
