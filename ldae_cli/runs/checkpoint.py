"""The one checkpoint format every stage reads and writes.

A checkpoint is a single safetensors file (tensors only: loading one from a stranger cannot run
code). Its string metadata carries the format version, the kind of checkpoint, the fully resolved
config, the package version and provenance: the sha256 of the parent checkpoints it was made from.
Files are written atomically (temp file, fsync, rename), so a crash never leaves half a file under
the real name.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldae_cli import __version__
from ldae_cli.config import config_from_dict
from ldae_cli.errors import LdaeError

FORMAT_VERSION = 1
KINDS = ("pca", "tokenizer", "pretrain", "encoder", "probe", "finetune", "detect")
_META_PREFIX = "ldae."
# a probe trains several heads at once and keeps going when one diverges: its checkpoint may hold that head
MAY_HOLD_NON_FINITE = ("probe",)
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class Checkpoint:
    path: Path
    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict
    extra: dict
    provenance: dict
    sha256: str
    format_version: int = FORMAT_VERSION
    package_version: str = ""

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.` with the prefix removed (e.g. 'model' -> a state dict)."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def parent_ref(self, role: str) -> dict:
        return {"role": role, "path": str(self.path), "sha256": self.sha256, "kind": self.kind}

    def require(self, *keys: str) -> None:
        """Metadata this reader needs (dotted for nested keys); a missing one is named, not a KeyError."""
        for key in keys:
            node = self.extra
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise LdaeError(
                        f"{self.path}: a '{self.kind}' checkpoint without '{key}' in its metadata; it is "
                        "damaged or was not written by ldae"
                    )
                node = node[part]


def stored_config(cls: type, ck: Checkpoint, section: str | None = None):
    """The config stored in a checkpoint (or one section of it) as this ldae's dataclass. A key this ldae does
    not know means the file was written by another (newer) version: said so, with the fix."""
    data = ck.config if section is None else ck.config.get(section, {})
    try:
        return config_from_dict(cls, data)
    except LdaeError as exc:
        where = f" (section '{section}')" if section else ""
        raise LdaeError(
            f"{ck.path}: its stored config{where} does not read as this ldae {__version__}'s: {exc}; it "
            f"was written by ldae {ck.package_version or 'of unknown version'} — read it with that "
            "version, or upgrade ldae"
        ) from None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """module.load_state_dict(state), with a mismatch between the checkpoint's tensors and the module its
    metadata describes named in one line instead of torch's dump."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} expected"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = (
            ([f"missing {', '.join(missing[:3])}"] if missing else [])
            + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
            + shapes[:2]
        )
        raise LdaeError(
            f"{where}: its tensors do not match the network its metadata describes ({'; '.join(parts)}); "
            "the file is damaged or was edited"
        )
    module.load_state_dict(state)


@dataclass
class Provenance:
    parents: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "parents": self.parents,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    kind: str,
    tensors: dict[str, torch.Tensor],
    config: dict,
    parents: Sequence[dict] = (),
    extra: dict | None = None,
) -> Path:
    """Write atomically: a crash leaves either the old file or the new one, never a torn one."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        f"{_META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{_META_PREFIX}kind": kind,
        f"{_META_PREFIX}package_version": __version__,
        f"{_META_PREFIX}config": json.dumps(config),
        f"{_META_PREFIX}extra": json.dumps(extra or {}),
        f"{_META_PREFIX}provenance": json.dumps(Provenance(list(parents)).to_dict()),
    }
    # safetensors refuses non-contiguous tensors and tensors sharing storage (tied weights)
    tensors = _unshare({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, metadata.values())) + 65536
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise _no_space(path, needed, free)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path, needed, shutil.disk_usage(path.parent).free) from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise LdaeError(
                f"cannot write {path.name} in {path.parent} ({exc.strerror}); the previous file, if any, "
                "is unchanged; pick a writable --out"
            ) from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _no_space(path: Path, needed: int, free: int) -> LdaeError:
    return LdaeError(
        f"not enough space in {path.parent} to write {path.name}: it needs about {needed / 2**20:,.1f} MB "
        f"and {free / 2**20:,.1f} MB are free; the previous file, if any, is unchanged. Free some space "
        "or pick another --out"
    )


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            v = v.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = v
    return out


def _check_header(path: Path) -> dict:
    """Validate the safetensors framing ourselves so damage gets a one-line explanation."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LdaeError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise LdaeError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    size = st.st_size
    if path.is_dir():
        raise LdaeError(f"{path}: is a directory, expected a .safetensors checkpoint file")
    if not stat.S_ISREG(st.st_mode):  # a named pipe or a device would block the read or never end
        raise LdaeError(
            f"{path}: not a regular file (a pipe, socket or device), expected a .safetensors checkpoint file"
        )
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LdaeError(f"{path}: not an ldae checkpoint (file is {size} bytes, too short for safetensors)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise LdaeError(f"{path}: not an ldae checkpoint (not a safetensors file, or truncated in its header)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LdaeError(f"{path}: not an ldae checkpoint (safetensors header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise LdaeError(f"{path}: not an ldae checkpoint (safetensors header is not a mapping)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LdaeError(
            f"{path}: checkpoint is truncated ({size} bytes on disk, {8 + n + end} expected);"
            " it was damaged after writing; use an earlier checkpoint"
        )
    return header.get("__metadata__") or {}


def read_metadata(path: str | os.PathLike) -> dict:
    """Metadata only (kind, config, ...), without loading tensors."""
    path = Path(path)
    meta = _check_header(path)
    kind = meta.get(f"{_META_PREFIX}kind")
    if kind is None:
        raise LdaeError(f"{path}: a safetensors file without ldae metadata, not an ldae checkpoint")
    version = int(meta.get(f"{_META_PREFIX}format_version", "0"))
    if version > FORMAT_VERSION or version < 1:
        raise LdaeError(
            f"{path}: checkpoint format version {version}; this ldae {__version__} reads version "
            f"{FORMAT_VERSION} (upgrade ldae to read newer files)"
        )
    try:
        return {
            "kind": kind,
            "format_version": version,
            "package_version": meta.get(f"{_META_PREFIX}package_version", ""),
            "config": json.loads(meta.get(f"{_META_PREFIX}config", "{}")),
            "extra": json.loads(meta.get(f"{_META_PREFIX}extra", "{}")),
            "provenance": json.loads(meta.get(f"{_META_PREFIX}provenance", "{}")),
        }
    except json.JSONDecodeError:
        raise LdaeError(f"{path}: checkpoint metadata is damaged (invalid JSON)") from None


def load_checkpoint(
    path: str | os.PathLike, kind: str | tuple[str, ...] | None = None, device: str = "cpu"
) -> Checkpoint:
    path = Path(path)
    meta = read_metadata(path)
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and meta["kind"] not in wanted:
        raise LdaeError(f"{path}: is a '{meta['kind']}' checkpoint, expected {' or '.join(repr(k) for k in wanted)}")
    try:
        tensors = load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LdaeError(f"{path}: checkpoint tensors are damaged ({str(exc).splitlines()[0]})") from None
    if meta["kind"] not in MAY_HOLD_NON_FINITE:
        bad = first_non_finite(tensors)
        if bad is not None:
            raise LdaeError(
                f"{path}: tensor '{bad}' holds NaN or infinite values, and ldae never writes such a "
                "checkpoint (its NaN guard keeps only finite ones): the file is damaged or was edited; "
                "use an earlier checkpoint"
            )
    ck = Checkpoint(
        path=path,
        kind=meta["kind"],
        tensors=tensors,
        config=meta["config"],
        extra=meta["extra"],
        provenance=meta["provenance"],
        sha256=sha256_file(path),
        format_version=meta["format_version"],
        package_version=meta["package_version"],
    )
    check_network(ck)
    return ck


def check_network(ck: Checkpoint) -> None:
    """The metadata that decides the network (sizes, grid, tokenizer, EMA) against the tensors' names and shapes,
    for every reader at once: a resumed run builds its network from the stored config, the other readers from the
    stored description, so an edit of either must not go unseen. What shapes cannot show (the number of heads, d
    behind an image-space network) is compared between config and description. A mismatch names the key and both
    values; the full module comparison (`load_state`) still follows when a network is built."""
    shape = {k: tuple(v.shape) for k, v in ck.tensors.items()}
    for key, stated, source, held in _claims(ck.kind, ck.config, ck.extra, shape):
        if stated is not None and held is not None and stated != held:
            said = f"its metadata says {key} {_value(stated)}, but {source} holds {_value(held)}"
            what = (
                f"its tensors do not match the network its metadata describes: {said}"
                if source.startswith("tensor")
                else f"its metadata disagrees with itself: {said}"
            )
            raise LdaeError(f"{ck.path}: {what}; the metadata is damaged or was edited; use an earlier checkpoint")


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, list)) else str(v)


def _dim(shape: dict, name: str, axis: int = 0) -> tuple[str, int | None]:
    """(tensor `name` and its shape, its size along `axis`); None when there is no such tensor."""
    return (f"tensor {name} {shape[name]}", shape[name][axis]) if name in shape else (name, None)


def _patch(source: tuple[str, int | None]) -> tuple[str, int | None]:
    """The patch p of a dimension of p*p*3 values."""
    return f"{source[0]} (p*p*3 values)", None if source[1] is None else math.isqrt(source[1] // 3)


def _blocks(shape: dict, prefix: str) -> tuple[str, int]:
    found = {k[len(prefix) :].split(".")[0] for k in shape if k.startswith(prefix)}
    return f"tensors {prefix}* ({len(found)} blocks)", len(found)


def _section(config: dict, name: str) -> dict:
    return config[name] if isinstance(config.get(name), dict) else {}


def _depth(spec: dict) -> int | None:
    enc, dec = spec.get("encoder_depth"), spec.get("decoder_depth")
    return enc + dec if isinstance(enc, int) and isinstance(dec, int) else None


def _claims(kind: str, config: dict, extra: dict, shape: dict) -> list[tuple[str, Any, str, Any]]:
    """(metadata key, what it says, what it is compared with, what that holds) for a checkpoint of `kind`."""
    claims = []
    section = partial(_section, config)
    if kind == "pca":
        claims.append(("patch", extra.get("patch"), *_patch(_dim(shape, "pca.basis"))))
    if kind == "tokenizer" and isinstance(extra.get("tokenizer"), dict) and "net.decoder.weight" in shape:
        claims += [
            ("tokenizer.patch", extra["tokenizer"].get("patch"), *_patch(_dim(shape, "net.decoder.weight"))),
            ("tokenizer.dim", extra["tokenizer"].get("dim"), *_dim(shape, "net.decoder.weight", 1)),
        ]
    if kind == "probe" and isinstance(extra.get("blrs"), list):
        claims.append(("blrs (one head each)", len(extra["blrs"]), *_blocks(shape, "heads.heads.")))
    spec = extra.get("timm_kwargs")
    if isinstance(spec, dict):  # an exported encoder or a fine-tuned ViT, under timm's names
        prefix = "model." if kind == "finetune" else ""
        claims += [
            ("timm_kwargs.embed_dim", spec.get("embed_dim"), *_dim(shape, f"{prefix}patch_embed.proj.weight")),
            ("timm_kwargs.patch_size", spec.get("patch_size"), *_dim(shape, f"{prefix}patch_embed.proj.weight", 2)),
            ("timm_kwargs.depth", spec.get("depth"), *_blocks(shape, f"{prefix}blocks.")),
        ]
    if "has_ema" in extra:  # a run that kept an EMA copy of its network stores it as ema.*
        optim = section("optim")
        claims += [
            (
                "has_ema",
                True if extra["has_ema"] else None,
                "tensors ema.* (any there)",
                any(k.startswith("ema.") for k in shape),
            ),
            ("optim.ema (set)", optim["ema"] is not None if "ema" in optim else None, "has_ema", extra["has_ema"]),
        ]
    if kind == "pretrain" and isinstance(extra.get("model_spec"), dict):
        claims += _pretrain_claims(config, extra, shape, section)
    return claims


def _pretrain_claims(config: dict, extra: dict, shape: dict, section) -> list[tuple[str, Any, str, Any]]:
    """A DenoisingViT (models.py) under `model.`, its tokenizer under `tokenizer.`: the width and token sizes are
    its embedding's shape, the depth its number of blocks; the grid is the image size over the patch. A resumed
    run builds its network from the config (`model`, `tokenizer`, `data` sections), the other readers from the
    description (`model_spec`, `tokenizer`, `image_size`): both are compared."""
    spec, tok, model = extra["model_spec"], extra.get("tokenizer") or {}, section("model")
    width, blocks = _dim(shape, "model.embed.weight"), _blocks(shape, "model.blocks.")
    in_dim, out_dim = _dim(shape, "model.embed.weight", 1), _dim(shape, "model.final.linear.weight")
    patch, size = tok.get("patch"), extra.get("image_size")
    grid = [size // patch] * 2 if isinstance(size, int) and isinstance(patch, int) and patch > 0 else None
    claims: list[tuple[str, Any, str, Any]]
    claims = [
        ("model_spec.width", spec.get("width"), *width),
        ("model.width", model.get("width"), *width),
        ("model_spec.in_dim", spec.get("in_dim"), *in_dim),
        ("model_spec.out_dim", spec.get("out_dim"), *out_dim),
        ("model_spec.encoder_depth + decoder_depth", _depth(spec), *blocks),
        ("model.encoder_depth + decoder_depth", _depth(model), *blocks),
    ]
    if tok.get("kind") == "pca":
        claims.append(("tokenizer.patch", patch, *_patch(_dim(shape, "tokenizer.basis"))))
    for space, held in (("input_space", in_dim), ("output_space", out_dim)):
        if section("diffusion").get(space) == "image":
            claims.append(("tokenizer.patch", patch, *_patch(held)))
        elif tok.get("kind") == "pca":
            claims.append(("tokenizer.dim", tok.get("dim"), *held))
    # what no tensor shows: the heads split the width inside attention, the grid sets a buffer that is not stored
    claims += [
        ("model.num_heads", model.get("num_heads"), "model_spec.num_heads", spec.get("num_heads")),
        ("data.image_size", section("data").get("image_size"), "image_size", size),
        ("model_spec.grid", spec.get("grid"), f"image_size {size} over tokenizer.patch", grid),
    ]
    stated = section("tokenizer")
    for key in ("dim", "latent_scale") if stated.get("kind") == tok.get("kind") else ():  # patch: see above
        claims.append((f"tokenizer.{key} (config)", stated.get(key), f"the stored tokenizer's {key}", tok.get(key)))
    return claims


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity; None when all are finite."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors named `state.<param>.<key>`, JSON-able rest) for safetensors."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            name = f"state.{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of `flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(rest.get("scalars", {}).items()):
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}
