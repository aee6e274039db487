"""The data layer: every dataset the stages read, one image pipeline, and seeded batch order.

Images come from the sources of sources.py (Fashion-MNIST, ImageFolder trees and archives, plain
folders). Every image goes through the same pipeline: decoded to RGB whatever its mode, cropped (center, or
random-resized), resized to `image_size` and kept as uint8 until the training loop turns it into floats in [-1, 1].

Randomness is keyed by (seed, epoch, index), never by a global RNG, so batch order and crops are
identical across resumes, numbers of DataLoader workers and numbers of DDP ranks.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldae_cli.data.sources import ImageSource, PreparedSource, decode, open_source
from ldae_cli.errors import LdaeError, short
from ldae_cli.runs.logs import console
from ldae_cli.seeds import flip, subset_generator
from ldae_cli.settings.training import DataConfig

# what a broken, truncated, foreign or oversized (decompression-bomb) image file raises while decoding
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------
# Decoding: any PIL mode -> RGB uint8
# ---------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the file held: grayscale, palette, alpha (composited on white), CMYK, 16-bit."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def center_square(w: int, h: int) -> tuple[int, int, int, int]:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def random_resized_box(
    w: int, h: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Inception-style crop box (area fraction in `scale`, aspect in `ratio`), from a seeded rng."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    return center_square(w, h)


def prepare(
    img: Image.Image, size: int, crop: str = "center", crop_scale=(0.2, 1.0), hflip: bool = False, aug_seed: int = 0
) -> torch.Tensor:
    """PIL image -> uint8 tensor (3, size, size) after the configured crop."""
    img = to_rgb(img)
    w, h = img.size
    if crop == "random-resized":
        box = random_resized_box(w, h, tuple(crop_scale), random.Random(aug_seed))
    else:
        box = center_square(w, h)
    if box != (0, 0, w, h) or (w, h) != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if hflip and flip(aug_seed):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in [-1, 1], the range every model and the PCA see."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_image_file(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One user image (any size or mode) -> uint8 (3, size, size), with a one-line error if unreadable."""
    try:
        with decode(path, size) as img:
            return prepare(img, size)
    except FileNotFoundError:
        raise LdaeError(f"{path}: image not found") from None
    except UNREADABLE as exc:
        raise LdaeError(f"{path}: cannot read image ({short(exc)})") from None


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------


@dataclass
class BadImage:
    name: str
    reason: str


@dataclass
class Encoded:
    """An image file's bytes, to be decoded with its batch on the training device (data.decode=gpu)."""

    data: torch.Tensor  # uint8 (n,)
    flip: bool


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W); empty while `encoded` holds the batch's files
    labels: torch.Tensor  # int64 (B,), -1 where unlabeled
    bad: list[BadImage]
    encoded: list[Encoded] | None = None

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.bad, self.encoded)


class ImageDataset(torch.utils.data.Dataset):
    """Items are uint8 image tensors; keys are an index or (index, aug_seed).

    `transform(image, aug_seed)`, if given, runs on each item after crop and flip (also on cached
    images), so per-sample augmentations such as RandAugment stay keyed by the sample's aug_seed.
    """

    def __init__(
        self,
        source: ImageSource,
        size: int,
        crop: str = "center",
        crop_scale=(0.2, 1.0),
        hflip: bool = False,
        subset: list[int] | None = None,
        transform: Callable[[Image.Image, int], Image.Image] | None = None,
        encoded: bool = False,
    ):
        self.source, self.size, self.crop, self.crop_scale, self.hflip = source, size, crop, crop_scale, hflip
        self.subset, self.transform, self.encoded = subset, transform, encoded
        self.cached: torch.Tensor | None = None
        self.skipped = 0  # unreadable images dropped by materialize(on_bad_image='skip')

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    @property
    def deterministic(self) -> bool:
        return self.crop == "center"

    def _raw(self, i: int) -> int:
        return self.subset[i] if self.subset is not None else i

    def __len__(self) -> int:
        return len(self.subset) if self.subset is not None else len(self.source)

    def label(self, i: int) -> int:
        return self.source.labels[self._raw(i)]

    def labels_tensor(self) -> torch.Tensor:
        return torch.tensor([self.label(i) for i in range(len(self))], dtype=torch.long)

    def name(self, i: int) -> str:
        return self.source.names[self._raw(i)]

    def identity(self) -> str:
        return identity_of(self.source, len(self))

    def __getitem__(self, key):
        i, aug_seed = key if isinstance(key, tuple) else (key, 0)
        if self.encoded:
            try:
                data = torch.frombuffer(bytearray(self.source.encoded(self._raw(i))), dtype=torch.uint8)
            except OSError as exc:
                return BadImage(self.name(i), short(exc))
            return Encoded(data, self.hflip and flip(aug_seed)), self.label(i)
        if self.cached is not None:
            img = self.cached[i]
            if self.hflip and flip(aug_seed):
                img = img.flip(-1)
        elif self.crop == "center" and isinstance(self.source, PreparedSource) and self.source.stored_size == self.size:
            # a prepared dataset at this size holds exactly what the crop and resize below would give
            img = torch.from_numpy(np.array(self.source.array(self._raw(i)))).permute(2, 0, 1).contiguous()
            if self.hflip and flip(aug_seed):
                img = img.flip(-1)
        else:
            try:
                pil = self.source.open(self._raw(i), self.size if self.crop == "center" else None)
                img = prepare(pil, self.size, self.crop, self.crop_scale, self.hflip, aug_seed)
            except UNREADABLE as exc:
                return BadImage(self.name(i), short(exc))
        if self.transform is not None:  # outside the try: a failing transform is a bug, not a bad file
            pil = self.transform(Image.fromarray(img.permute(1, 2, 0).numpy()), aug_seed)
            img = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return img, self.label(i)

    def materialize(self, num_workers: int = 0, on_bad_image: str = "error") -> None:
        """Decode every image once and keep the uint8 tensors (only valid for fixed crops).

        With `on_bad_image="skip"`, unreadable images are warned about, counted in `skipped` and
        dropped from the dataset (the subset shrinks so indices, labels and cache stay aligned).
        """
        if not self.deterministic:
            raise ValueError("only center-cropped datasets can be cached")
        chunks_keys = [list(range(s, min(s + 512, len(self)))) for s in range(0, len(self), 512)]
        counter = BadImageCounter(on_bad_image)
        chunks: list[torch.Tensor] = []
        kept: list[int] = []
        # the cache holds unflipped, untransformed images: flips and transforms are drawn per sample on reading
        (transform, hflip), (self.transform, self.hflip) = (self.transform, self.hflip), (None, False)
        try:
            for keys, batch in zip(chunks_keys, make_loader(self, chunks_keys, num_workers)):
                counter.check(batch)
                bad_names = {b.name for b in batch.bad}
                kept.extend(self._raw(i) for i in keys if self.name(i) not in bad_names)
                chunks.append(batch.images)
        finally:
            self.transform, self.hflip = transform, hflip
        if counter.skipped:
            if not kept:
                raise LdaeError(f"none of the {len(self)} images could be read (all {counter.skipped} skipped)")
            self.subset = kept
        self.skipped = counter.skipped
        chunks = [c for c in chunks if c.shape[0]]
        self.cached = torch.cat(chunks) if chunks else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)


def identity_of(source: ImageSource, images: int) -> str:
    """What a dataset of `images` of the source's images reads: the source's identity (sources.py), and how many when
    data.limit took a subset (what a PCA file records of the data it was fitted on)."""
    whole = source.identity()
    return whole if images == len(source) else f"{whole}, {images} of them"


def raise_bad(bad: list[BadImage]) -> None:
    first = bad[0]
    more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
    raise LdaeError(
        f"{first.name}: cannot read image ({first.reason}){more}; set data.on_bad_image=skip to skip unreadable files"
    )


def collate(items: list) -> Batch:
    bad = [x for x in items if isinstance(x, BadImage)]
    good = [x for x in items if not isinstance(x, BadImage)]
    if good and isinstance(good[0][0], Encoded):
        return Batch(
            torch.empty(0, 3, 0, 0, dtype=torch.uint8),
            torch.tensor([lab for _, lab in good]),
            bad,
            [enc for enc, _ in good],
        )
    if good:
        images = torch.stack([img for img, _ in good])
        labels = torch.tensor([lab for _, lab in good], dtype=torch.long)
    else:
        images, labels = torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return Batch(images, labels, bad)


def decode_batch(batch: Batch, size: int, device: torch.device) -> Batch:
    """The batch's files decoded on `device` (nvjpeg on CUDA; JPEGs, other formats through the CPU), each center-
    cropped to a square and resized to `size` (bicubic, antialiased) there: the uint8 batch the model reads."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if batch.encoded is None:  # every file unreadable and skipped: an empty batch, as PIL decoding gives
        return batch
    jpeg = [i for i, e in enumerate(batch.encoded) if e.data[:2].tolist() == [0xFF, 0xD8]]
    decoded: list = [None] * len(batch.encoded)
    if jpeg:
        for i, img in zip(
            jpeg, decode_jpeg([batch.encoded[i].data for i in jpeg], mode=ImageReadMode.RGB, device=device)
        ):
            decoded[i] = img
    for i, e in enumerate(batch.encoded):
        if decoded[i] is None:
            decoded[i] = decode_image(e.data, mode=ImageReadMode.RGB).to(device)
    images = []
    for img, e in zip(decoded, batch.encoded):
        _, h, w = img.shape
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = img[:, top : top + side, left : left + side].float()[None]
        if side != size:
            square = torch.nn.functional.interpolate(
                square, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
        out = square[0].round_().clamp_(0, 255).to(torch.uint8)
        images.append(out.flip(-1) if e.flip else out)
    return Batch(torch.stack(images), batch.labels.to(device, non_blocking=True), batch.bad)


def make_loader(
    dataset: ImageDataset, batches, num_workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over explicit lists of keys; cached datasets are indexed in the main process."""
    workers = 0 if dataset.cached is not None else num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


class BadImageCounter:
    """Applies `data.on_bad_image` to each batch: raise, or count and warn once per file."""

    def __init__(self, policy: str):
        self.policy, self.skipped = policy, 0

    def check(self, batch: Batch) -> Batch:
        if batch.bad:
            if self.policy == "error":
                raise_bad(batch.bad)
            for b in batch.bad:
                warnings.warn(f"skipped unreadable image {b.name}: {b.reason}", stacklevel=2)
            self.skipped += len(batch.bad)
        return batch


_warned_upsampling: set = set()


def upsampling(cfg: DataConfig, source: ImageSource, size: int) -> str | None:
    """The warning (said once per dataset and size) when `size` is above the images' own resolution: every image is
    then upsampled, and its patches carry fewer dimensions than p*p*3."""
    key = (cfg.source, str(cfg.path), size)
    if key in _warned_upsampling:
        return None
    _warned_upsampling.add(key)
    native = median_short_side(source)
    if native is None or size <= native:
        return None
    return (
        f"[yellow]warning:[/yellow] data.image_size {size} is above the images' own resolution (median short side "
        f"{native} over a sample of {min(64, len(source))}): every image is upsampled {size / native:.3g}x; set "
        f"data.image_size=null to train at native resolution"
    )


def native_image_size(data: DataConfig, patch: int) -> tuple[int, str]:
    """The data's native image size for images cut in `patch`-pixel patches: the median short side of a seeded sample
    of the training split, rounded down to a multiple of the patch; and the line saying so."""
    source = open_source(data, "train")
    side = median_short_side(source)
    if side is None:
        raise LdaeError(
            f"data.image_size: none of the sampled images of {data.path or data.source} could be read to "
            "measure their size; set data.image_size"
        )
    size = side // patch * patch
    if size == 0:
        raise LdaeError(
            f"data.image_size: the images' median short side {side} is below the patch {patch}; use a "
            f"patch of at most {side}, or set data.image_size (upsampling them)"
        )
    how = "a multiple of" if size == side else "rounded down to a multiple of"
    return size, (
        f"data: image size {size} (native: median short side {side} of {min(64, len(source))} sampled "
        f"images; {how} patch {patch})"
    )


def resolve_image_size(data: DataConfig, patch: int) -> list[str]:
    """Settle the image size a new run reads its images at, the one place every stage decides it: data.image_size
    null becomes the native size; a size set above native is warned about (in --dry-run too). Returns what to say."""
    if data.image_size is None:
        data.image_size, note = native_image_size(data, patch)
        return [note]
    try:
        warning = upsampling(data, open_source(data, "train"), data.image_size)
    except LdaeError:  # a missing dataset is reported, with its fix, where it is opened
        warning = None
    return [f"data: image size {data.image_size} (data.image_size)"] + ([warning] if warning else [])


def build_dataset(
    cfg: DataConfig,
    split: str = "train",
    augment: bool | None = None,
    seed: int = 0,
    size: int | None = None,
    transform: Callable[[Image.Image, int], Image.Image] | None = None,
    training_stream: bool = False,
) -> ImageDataset:
    """The configured dataset for 'train' or 'eval'; eval (or augment=False) always center-crops.
    `transform`: a per-sample transform after crop and flip (see ImageDataset), applied as given.
    `training_stream`: the dataset a Trainer streams, whose files data.decode=gpu decodes on the device."""
    source = open_source(cfg, split)
    augment = (split == "train") if augment is None else augment
    crop = cfg.crop if augment else "center"
    subset = None
    if cfg.limit is not None and cfg.limit < len(source):
        g = subset_generator(seed, "train subset" if split == "train" else "eval subset")
        subset = sorted(torch.randperm(len(source), generator=g)[: cfg.limit].tolist())
    encoded = training_stream and cfg.decode == "gpu" and crop == "center" and transform is None
    if size is None:  # null data.image_size: a config no stage settled, the images' own size, unrounded
        size = cfg.image_size if cfg.image_size is not None else native_image_size(cfg, 1)[0]
    ds = ImageDataset(source, size, crop, tuple(cfg.crop_scale), cfg.hflip and augment, subset, transform, encoded)
    stored = getattr(source, "stored_size", None)
    if stored is not None and stored < ds.size:
        raise LdaeError(
            f"{cfg.path}: prepared at {stored}x{stored}, smaller than data.image_size {ds.size}; prepare "
            f"it again with --image-size {ds.size}"
        )
    warning = upsampling(cfg, source, ds.size) if split == "train" and stored is None else None
    if warning:
        console.print(warning)
    if ds.deterministic and cfg.cache != "never" and stored is None and not encoded:  # prepared: its own cache
        nbytes = len(ds) * 3 * ds.size * ds.size
        if cfg.cache == "always" or nbytes <= 2 * 1024**3:
            ds.materialize(cfg.num_workers, cfg.on_bad_image)
    return ds


# ---------------------------------------------------------------------------------------------
# Seeded global batches, split across ranks and micro-batches
# ---------------------------------------------------------------------------------------------


def median_short_side(source: ImageSource, count: int = 64, seed: int = 0) -> int | None:
    """The median short side of a seeded sample of `count` images (their native resolution: training above it
    upsamples); None when none of them can be read."""
    picks = random.Random(seed).sample(range(len(source)), min(count, len(source)))
    sides = []
    for i in picks:
        stored = getattr(source, "stored_size", None)
        if stored is not None:
            return int(stored)
        try:
            with source.open(i) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # unreadable images are skipped or named where the data is read
    return int(np.median(sides)) if sides else None
