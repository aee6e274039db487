"""Where images come from: Fashion-MNIST IDX files, ImageFolder trees (ImageNet layout, also as a
.tar/.tar.gz such as the CIFAR-10 JPEG archive), plain folders of unlabeled images, and datasets prepared
by `ldae prepare-data` (whatever data.source says, a folder holding prepared.json is read as one), each as
an indexable `ImageSource` of images, labels and class names. The pipeline (pipeline.py) crops, resizes and
batches them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Callable, Optional, Protocol, TypeGuard

import numpy as np
from PIL import Image

from ldae_cli.errors import LdaeError, short
from ldae_cli.runs.logs import console


class SourceConfig(Protocol):
    """What a source needs of the data config (data.DataConfig): which dataset, where, which split."""

    @property
    def source(self) -> str: ...  # read-only, so DataConfig's Literal field matches

    path: Optional[str]
    verify: bool

    def split_name(self, split: str) -> str: ...


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_HOME = Path(os.environ.get("LDAE_CACHE", Path.home() / ".cache" / "ldae"))
FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def decode(fp, target: int | None = None) -> Image.Image:
    """Open and decode an image file. With `target` (the side a center crop is resized to), a large JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (JPEG's own DCT scaling) while its short side stays >= 2 x target, so a
    very large photo costs megabytes, not its full size; the resize that follows sees twice the pixels it keeps."""
    img = Image.open(fp)
    if target and img.format == "JPEG":
        w, h = img.size
        short = min(w, h)
        if short >= 4 * target:
            img.draft(None, (max(1, w * 2 * target // short), max(1, h * 2 * target // short)))
    img.load()
    return img


class ImageSource:
    """Indexable raw images with labels; `open(i)` returns a PIL image or raises."""

    names: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int, target: int | None = None) -> Image.Image:
        """Image i; `target` allows decoding a large JPEG at reduced scale (see `decode`)."""
        raise NotImplementedError

    def encoded(self, i: int) -> bytes:
        """Image i's file as stored (for decoding on the GPU, data.decode=gpu)."""
        raise LdaeError(
            f"data.decode=gpu decodes image files; {type(self).__name__} holds decoded arrays (use data.decode=pil)"
        )

    def identity(self) -> str:
        """A sha256 that is the same for the same images wherever they are (no absolute path enters it): what a
        resumed run checks so that it never continues on other data."""
        raise NotImplementedError


def digest_lines(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], origin: str):
        self.images, self.labels, self.classes = images, [int(x) for x in labels], classes
        self.names = [f"{origin}[{i}]" for i in range(len(images))]

    def open(self, i: int, target: int | None = None) -> Image.Image:
        return Image.fromarray(self.images[i])

    def identity(
        self,
    ) -> str:  # the decoded arrays themselves (IDX files: tens of MB, hashed in a fraction of a second)
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


class FileSource(ImageSource):
    def __init__(self, paths: list[Path], labels: list[int], classes: list[str], root: Path | None = None):
        self.paths, self.labels, self.classes, self.root = paths, labels, classes, root
        self.names = [str(p) for p in paths]

    def identity(self) -> str:  # each file's path below the dataset root, its size and label
        root = self.root if self.root is not None and self.root.is_dir() else None
        return digest_lines(
            f"{p.relative_to(root) if root else p.name}\t{p.stat().st_size}\t{label}"
            for p, label in zip(self.paths, self.labels)
        )

    def open(self, i: int, target: int | None = None) -> Image.Image:
        return decode(self.paths[i], target)

    def encoded(self, i: int) -> bytes:
        return self.paths[i].read_bytes()


class BytesSource(ImageSource):
    """Images held in memory as encoded bytes (members of a tar archive)."""

    def __init__(self, blobs: list[bytes], names: list[str], labels: list[int], classes: list[str], archive: str):
        self.blobs, self.names, self.labels, self.classes, self.archive = blobs, names, labels, classes, archive

    def identity(self) -> str:  # each member's name inside the archive (names are "<archive>:<member>"), size, label
        return digest_lines(
            f"{name[len(self.archive) + 1 :]}\t{len(blob)}\t{label}"
            for name, blob, label in zip(self.names, self.blobs, self.labels)
        )

    def open(self, i: int, target: int | None = None) -> Image.Image:
        return decode(io.BytesIO(self.blobs[i]), target)

    def encoded(self, i: int) -> bytes:
        return self.blobs[i]


FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {data.size}")
        return data.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise LdaeError(f"{path}: not a readable IDX file ({short(exc)})") from None


def default_locations(source: str) -> list[Path]:
    env = [Path(os.environ["LDAE_DATA"])] if os.environ.get("LDAE_DATA") else []
    if source == "fashion-mnist":
        return [
            *(e / "fashion-mnist" for e in env),
            FMNIST_DEBIAN,
            CACHE_HOME / "fashion-mnist",
            CACHE_HOME / "FashionMNIST" / "raw",
        ]
    if source == "cifar10":
        names = ("cifar10-jpg.tar.gz", "cifar10")
        return [
            *(e / n for e in env for n in names),
            *(REPO_ROOT.parent / "shared" / "data" / n for n in names),
            *(CACHE_HOME / n for n in names),
        ]
    return []


DATA_CHOICES = (
    "a folder of images, a <split>/<class>/<image> tree (ImageNet layout), a .tar/.tar.gz of either, "
    "a folder of Fashion-MNIST IDX files, or a folder written by `ldae prepare-data`"
)
EVAL_SPLITS = ("val", "validation", "test")  # a class tree's evaluation split: the first of these it has
_HOW_TO_GET = {
    "fashion-mnist": "install it with `sudo apt-get install dataset-fashion-mnist` (or run `make data`, which "
    "falls back to torchvision's download), or point data.path at a folder of IDX files",
    "cifar10": "point data.path at the CIFAR-10 JPEG tree or its .tar.gz (cifar10/{train,test}/<class>/*.jpg)",
    "imagefolder": "give --data DIR (data.path): a folder (or .tar/.tar.gz) laid out as <split>/<class>/<image>",
    "images": "give --data DIR (data.path): a folder of images",
    "auto": f"give --data PATH: {DATA_CHOICES}",
}


def resolve_path(cfg: SourceConfig) -> Path:
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise LdaeError(f"dataset not found: data.path '{cfg.path}' does not exist; {_HOW_TO_GET[cfg.source]}")
        return path
    places = default_locations(cfg.source)
    if not places:
        raise LdaeError(f"data.source '{cfg.source}' needs data.path; {_HOW_TO_GET[cfg.source]}")
    for place in places:
        if place.exists():
            return place
    looked = ", ".join(str(p) for p in places)
    raise LdaeError(f"{cfg.source} dataset not found (looked in {looked}); {_HOW_TO_GET[cfg.source]}")


def _fmnist(root: Path, split: str) -> ImageSource:
    if split not in FMNIST_FILES:
        raise LdaeError(f"fashion-mnist has splits 'train' and 'test', not '{split}'")
    found = []
    for stem in FMNIST_FILES[split]:
        hits = [root / (stem + ext) for ext in (".gz", "") if (root / (stem + ext)).is_file()]
        if not hits:
            raise LdaeError(
                f"{root}: missing {stem}.gz; expected Fashion-MNIST IDX files there ({_HOW_TO_GET['fashion-mnist']})"
            )
        found.append(hits[0])
    images, labels = _read_idx(found[0]), _read_idx(found[1])
    if len(images) != len(labels):
        raise LdaeError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return ArraySource(images, labels, FMNIST_CLASSES, f"{found[0].name}")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _find_split_dir(root: Path, split: str) -> Path | None:
    for cand in [root / split, *sorted(d / split for d in root.iterdir() if d.is_dir())]:
        if cand.is_dir():
            return cand
    return None


def escapes(path: Path, root: Path) -> bool:
    """Whether `path` leads, through a link, outside the dataset folder `root` (--data)."""
    return not path.resolve().is_relative_to(root.resolve())


def images_under(folder: Path, root: Path) -> tuple[list[Path], int]:
    """The image files below `folder` in name order but the links among them leading outside `root`, which are
    never read, and how many of those there were (linked folders below `folder` are not followed)."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p.name))
    kept = [p for p in found if not (p.is_symlink() and escapes(p, root))]
    return kept, len(found) - len(kept)


def note_escaping(count: int, where: Path, root: Path) -> str:
    """What the user is told of the links skipped by `images_under`."""
    if not count:
        return ""
    text = f"{count} link(s) in {where} lead outside {root} and were skipped (never read)"
    console.print(f"data: {text}")
    return f"; {text}"


def _imagefolder(root: Path, split: str) -> ImageSource:
    if root.is_file():
        return _imagefolder_tar(root, split)
    split_dir = _find_split_dir(root, split)
    if split_dir is None:
        present = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())[:6]) or "none"
        raise LdaeError(
            f"{root}: no '{split}' folder (looked for {root / split} and {root}/*/{split}; folders there: "
            f"{present}); expected the layout <split>/<class>/<image>; name the split with --eval-split "
            "(data.eval_split) or data.train_split"
        )
    folders = [d for d in sorted(split_dir.iterdir()) if d.is_dir()]
    classes = [d.name for d in folders if not escapes(d, root)]
    paths, labels, skipped = [], [], len(folders) - len(classes)
    for label, cls in enumerate(classes):
        found, outside = images_under(split_dir / cls, root)
        paths += found
        labels += [label] * len(found)
        skipped += outside
    told = note_escaping(skipped, split_dir, root)
    if not paths:
        raise LdaeError(
            f"{split_dir}: no images found in class folders (extensions {', '.join(IMAGE_EXTENSIONS)})" + told
        )
    return FileSource(paths, labels, classes, root)


def _imagefolder_tar(archive: Path, split: str) -> ImageSource:
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise LdaeError(f"{archive}: cannot open archive ({short(exc)})") from None
    blobs, names, class_of = [], [], []
    try:
        with tar:
            for member in tar:
                if not member.isfile() or not is_image(member.name):
                    continue
                parts = member.name.strip("/").split("/")
                if len(parts) < 3 or parts[-3] != split:
                    continue
                blobs.append(tar.extractfile(member).read())  # type: ignore[union-attr]  # a file: never None
                names.append(f"{archive}:{member.name}")
                class_of.append(parts[-2])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LdaeError(f"{archive}: archive is damaged ({short(exc)})") from None
    if not blobs:
        raise LdaeError(
            f"{archive}: no images under a '{split}/<class>/' folder in this archive; name the split "
            "with --eval-split (data.eval_split) or data.train_split"
        )
    classes = sorted(set(class_of))
    index = {c: i for i, c in enumerate(classes)}
    # the same order as the extracted folder: by class name, then by file name within the class
    order = sorted(range(len(names)), key=lambda i: (class_of[i], names[i].rsplit("/", 1)[-1], names[i]))
    return BytesSource(
        [blobs[i] for i in order], [names[i] for i in order], [index[class_of[i]] for i in order], classes, str(archive)
    )


def _images_tar(archive: Path) -> ImageSource:
    """Every image in an archive, unlabelled, in name order."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = sorted((m for m in tar if m.isfile() and is_image(m.name)), key=lambda m: m.name)
            blobs = [tar.extractfile(m).read() for m in members]  # type: ignore[union-attr]  # files: never None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LdaeError(f"{archive}: cannot read archive ({short(exc)})") from None
    if not blobs:
        raise LdaeError(f"{archive}: no images in this archive (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return BytesSource(blobs, [f"{archive}:{m.name}" for m in members], [-1] * len(blobs), [], str(archive))


def _plain_images(root: Path, split: str) -> ImageSource:  # no splits: every image is a training image
    if root.is_file() and tarfile.is_tarfile(root):
        return _images_tar(root)
    paths, told = [root], ""
    if root.is_dir():
        paths, skipped = images_under(root, root)
        told = note_escaping(skipped, root, root)
    if not paths:
        raise LdaeError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}){told}")
    return FileSource(paths, [-1] * len(paths), [], root)


PREPARED = "prepared.json"  # marks a dataset written by `ldae prepare-data`


class PreparedSource(ImageSource):
    """A split of a prepared dataset: uint8 images (N, S, S, 3) in .npy shards read through memory maps, so a
    worker or a DDP rank reads the images it indexes and no others. `stored_size` is S. Before any image is read,
    its index is checked against its files (`check_split`) and, with `verify`, every shard, label array and file
    list against the sha256 recorded when it was written."""

    def __init__(self, root: Path, split: str, verify: bool = True):
        meta = read_prepared(root)
        if split not in meta["splits"]:
            raise LdaeError(
                f"{root}: a prepared dataset without a '{split}' split (it has "
                f"{', '.join(meta['splits'])}); prepare it with that split"
            )
        info = meta["splits"][split]
        if not info.get("complete"):
            raise LdaeError(
                f"{root}: the preparation of its '{split}' split was interrupted; run the same "
                "`ldae prepare-data` command again to finish it"
            )
        self.labels, self.names = check_split(root, split, meta, verify)
        self.root, self.split, self.stored_size = root, split, meta["stored_size"]
        self.shards, self.starts = info["shards"], np.cumsum([0] + info["counts"])[:-1]
        self.classes = meta["classes"]
        self.content = info["content_sha256"]
        self._maps: list | None = None

    def array(self, i: int) -> np.ndarray:
        if self._maps is None:  # opened in the process that reads (each DataLoader worker maps its own)
            self._maps = [np.load(self.root / self.split / name, mmap_mode="r") for name in self.shards]
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._maps[shard][i - self.starts[shard]]

    def open(self, i: int, target: int | None = None) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.array(i)))

    def identity(self) -> str:  # the content hash recorded when it was prepared
        return self.content

    def __getstate__(self):  # a worker re-maps the shards instead of receiving copies of them
        return {**self.__dict__, "_maps": None}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split_files(shards: int) -> list[str]:
    """The files of a prepared split of `shards` shards that a run reads: each has its sha256 in prepared.json."""
    return (
        [f"images-{k:05d}.npy" for k in range(shards)]
        + [f"{kind}-{k:05d}.{ext}" for k in range(shards) for kind, ext in (("labels", "npy"), ("files", "txt"))]
        + ["labels.npy", "files.txt"]
    )


def index_sha256(meta: dict) -> str:
    """The sha256 of prepared.json's content but this hash itself, as canonical JSON (sorted keys, no spaces)."""
    body = json.dumps({k: v for k, v in meta.items() if k != "index_sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _again(root: Path) -> str:
    return f"prepare it again (`ldae prepare-data ... --out {root} --force`)"


def read_prepared(root: Path) -> dict:
    """prepared.json, checked against its own index_sha256 (one written before the index had a hash is read, and
    `check_split` still checks it against its files), with splits named by folders inside `root`."""
    path = root / PREPARED
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LdaeError(
            f"{path}: not a readable prepared-dataset description ({short(exc)}); prepare the dataset again"
        ) from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("splits"), dict)
        or not all(
            isinstance(info, dict) and name == Path(name).name and name not in ("", ".", "..")
            for name, info in meta["splits"].items()
        )
    ):
        raise LdaeError(f"{path}: 'splits' must map split folder names to their descriptions; {_again(root)}")
    if meta.get("index_sha256", index_sha256(meta)) != index_sha256(meta):
        raise LdaeError(
            f"{path}: its content differs from its index_sha256 (the file was edited or damaged after "
            f"it was written); {_again(root)}"
        )
    return meta


def check_split(root: Path, split: str, meta: dict, verify: bool) -> tuple[list[int], list[str]]:
    """The labels and file names of a complete prepared split, once its entry in prepared.json agrees with its
    files (image counts and size, classes and labels: seconds, always) and, with `verify`, every file with its
    recorded sha256: an edited or damaged dataset is one line naming the file and key before any image is read."""
    index, folder, info = root / PREPARED, root / split, meta["splits"][split]
    stored, classes, shards, counts, hashes = (
        meta.get("stored_size"),
        meta.get("classes"),
        info.get("shards"),
        info.get("counts"),
        info.get("file_sha256"),
    )

    def need(ok, key: str, what: str) -> None:
        if not ok:
            raise LdaeError(f"{index}: {key} {what}; {_again(root)}")

    def natural(x) -> TypeGuard[int]:
        return type(x) is int and x >= 0  # a bool is no count

    need(natural(stored) and stored > 0, "stored_size", f"must be an image side in pixels, not {stored!r}")
    need(
        isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes),
        "classes",
        "must be a list of distinct class names",
    )
    assert isinstance(classes, list)  # need() refused anything else
    need(
        isinstance(shards, list) and shards and shards == split_files(len(shards))[: len(shards)],
        f"splits.{split}.shards",
        "must list images-00000.npy, images-00001.npy, ... in order",
    )
    need(
        isinstance(counts, list) and len(counts) == len(shards) and all(map(natural, counts)),
        f"splits.{split}.counts",
        f"must hold {len(shards)} image counts, one per shard, not {counts!r}",
    )
    need(
        info.get("images") == sum(counts) and natural(info["images"]),
        f"splits.{split}.images",
        f"is {info.get('images')!r}, but its counts add up to {sum(counts)}",
    )
    # a missing or empty hash list is an error, never a pass that checked nothing
    need(
        isinstance(hashes, dict)
        and sorted(hashes) == sorted(split_files(len(shards)))
        and all(isinstance(h, str) and len(h) == 64 for h in hashes.values()),
        f"splits.{split}.file_sha256",
        f"must hold the sha256 of each of the split's {len(split_files(len(shards)))} files (it is missing, empty "
        "or lists others)",
    )
    if verify:
        fix = (
            f"{_again(root)}; `ldae prepare-data --verify {root}` checks every file, and data.verify=false skips "
            "this check"
        )
        for name, recorded in hashes.items():
            if not (folder / name).is_file():
                raise LdaeError(f"{folder / name}: missing from the prepared dataset; {fix}")
            if file_sha256(folder / name) != recorded:
                raise LdaeError(
                    f"{folder / name}: its sha256 differs from the one recorded when it was prepared (the "
                    f"file was changed or damaged); {fix}"
                )

    def read(name: str):
        try:
            return (
                np.load(folder / name, mmap_mode="r")
                if name.endswith(".npy")
                else (folder / name).read_text().splitlines()
            )
        except (OSError, ValueError) as exc:
            raise LdaeError(f"{folder / name}: missing or unreadable ({short(exc)}); {_again(root)}") from None

    for name, count in zip(shards, counts):
        array = read(name)
        need(
            array.shape == (count, stored, stored, 3) and array.dtype == np.uint8,
            f"splits.{split}.counts and stored_size",
            f"say {count} images of {stored}x{stored}, but {folder / name} holds {array.dtype} {array.shape}",
        )
    labels, names = read("labels.npy"), read("files.txt")
    need(
        labels.shape == (len(names),) == (info["images"],) and labels.dtype == np.int64,
        f"splits.{split}.images",
        f"is {info['images']}, but {folder / 'labels.npy'} holds {labels.dtype} {labels.shape} and "
        f"{folder / 'files.txt'} {len(names)} names",
    )
    low, high = (int(labels.min()), int(labels.max())) if len(labels) else (-1, -1)
    need(
        not len(labels) or (0 <= low and high < len(classes) if classes else low == high == -1),
        "classes",
        f"holds {len(classes)} class(es), but {folder / 'labels.npy'} holds labels {low} to {high}",
    )
    return labels.tolist(), names


# data.source -> the reader of a dataset of that kind at data.path (a prepared dataset is read as one whatever its kind)
SOURCES: dict[str, Callable[[Path, str], ImageSource]] = {
    "fashion-mnist": _fmnist,
    "cifar10": _imagefolder,
    "imagefolder": _imagefolder,
    "images": _plain_images,
}


def open_source(cfg: SourceConfig, split: str) -> ImageSource:
    """The raw images of `split` ('train' or 'eval') for the configured dataset."""
    root = resolve_path(cfg)
    name = cfg.split_name(split)
    if root.is_dir() and (root / PREPARED).is_file():
        return PreparedSource(root, name, getattr(cfg, "verify", True))
    if cfg.source not in SOURCES:
        raise LdaeError(f"data.source {cfg.source!r}: not a kind of dataset this ldae reads ({', '.join(SOURCES)})")
    return SOURCES[cfg.source](root, name)


def download_fashion_mnist() -> Path:
    """Fallback for machines without the Debian package: torchvision's download into the ldae cache."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(CACHE_HOME), train=True, download=True)
    FashionMNIST(str(CACHE_HOME), train=False, download=True)
    return CACHE_HOME / "FashionMNIST" / "raw"
