"""Every random number ldae draws is keyed by the run's seed (run.seed) and where it is drawn, never by a global
generator's history: so a resumed run, or the same run on more ranks or DataLoader workers, draws exactly the same.
This module is the one place those keys are derived, and holds the one seeded step-order sampler every training
loop reads its images through. The formulas are those ldae has always used (old runs resume bit for bit).

The keys, by what they drive:
- the data: each epoch's image order (`epoch_generator`), each image's crop and flip in an epoch (`sample_seed`,
  `flip`), a seeded subset (`subset_generator`), the detection stream's order and augmentation
  (`stream_generator`, `stream_sample_seed`), the fine-tuning batch augmentation (`batch_seed`);
- the objective: a pretraining step's draw (l-DAE's timesteps and noise, MAE's masks) or a tokenizer step's
  (`step_generator`), a MoCo v3 step's two views (`view_generator`), a detection step's dropout and sampling
  (`detect_step_seed`), the noise `ldae denoise` adds to image i (`image_noise_seed`) and its pixel-noise comparison
  (`pixel_noise_seed`); `seeded_rngs` keys the global generators for a block;
- the probes: the noise of a probe's noisy-input features (`feature_seed`, `step_feature_seed`);
- offsets of the run seed for draws that must differ from the run's own (`derived`: the eval subset, the online
  probe's fit subset, the pixel-noise comparison, a tokenizer's held-out report).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

from ldae_cli.errors import LdaeError


@contextlib.contextmanager
def seeded_rngs(key: int, device: torch.device | None = None):
    """Seed Python's, NumPy's and torch's global RNGs from `key` for the block, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(key)
        np.random.seed(key & 0xFFFFFFFF)
        torch.manual_seed(key)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# what `derived` adds to the run seed for a draw of its own
OFFSETS = {
    "train subset": 0,
    "eval subset": 1,
    "online fit subset": 2,
    "pixel noise": 1,
    "held-out report": 1,
    "probe holdout": 3,
}


def derived(seed: int, purpose: str) -> int:
    """The run seed moved by a fixed offset for a draw that must not repeat the run's own (see OFFSETS)."""
    return seed + OFFSETS[purpose]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's image order."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A seeded permutation of n items for this epoch."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One integer per (run seed, epoch, image) that drives that image's random crop and flip."""
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA6B + index * 0xC2B2AE35) & 0x7FFFFFFF


def flip(aug_seed: int) -> bool:
    """Whether the image of `aug_seed` is flipped (a draw apart from its crop's)."""
    return random.Random(aug_seed ^ 0x5BD1E995).random() < 0.5


def subset_generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived(seed, purpose))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one pretraining step's objective draw for the whole global batch (l-DAE: timesteps, noise,
    label drops; MAE: the masking noise), and of a tokenizer step's."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def view_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one MoCo v3 step's view parameters (crops, jitter, blur, ...) for the whole global batch;
    on the CPU so that every device and rank count draws the same views."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA6B + 0x27D4EB2F) & 0x7FFFFFFFFFFF)


def batch_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The fine-tuning augmentation (mixup, cutmix, erasing) of one micro-batch of one rank."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA6B + rank * 0xC2B2AE35 + micro * 0x27D4EB2F) & 0x7FFFFFFFFFFF


def detect_step_seed(seed: int, step: int, rank: int, world: int) -> int:
    """The torch seed of one detection step on one rank (drop path, proposal sampling)."""
    return seed * 1_000_003 + step * world + rank


def stream_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of the detection stream's image order in an epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def stream_sample_seed(seed: int, position: int) -> int:
    """The numpy seed of the augmentation of the detection stream's sample at `position`."""
    return (seed * 1_000_003 + position) % 2**32


def image_noise_seed(seed: int, index: int) -> int:
    """The latent noise `ldae denoise` adds to image `index` of a call (the same whatever the batch)."""
    return seed * 100_003 + index


def pixel_noise_seed(seed: int, first: int = 0) -> int:
    """The pixel noise of `ldae denoise --compare-pixel-noise` for the batch starting at image `first`."""
    return derived(seed, "pixel noise") + first


def feature_seed(seed: int, first: int) -> int:
    """The noise of a probe's features for the batch starting at image `first` (noisy-input probes)."""
    return seed * 7919 + first


def step_feature_seed(seed: int, step: int, piece: int) -> int:
    """The same for piece `piece` of a full-mode probe step."""
    return seed * 7919 + step * 131 + piece


class SeededSteps(torch.utils.data.Sampler):
    """The one seeded step-order sampler: for each optimizer step from `start_step`, this rank's share of the step's
    global batch, cut into pieces.

    Two layouts of the global batches, each keyed by (seed, step) only, so the order is the same whatever the ranks,
    accumulation and resumes:
    - "epochs" (image datasets): step s of epoch e takes positions [s*B, (s+1)*B) of that epoch's seeded
      permutation (the last, incomplete batch of an epoch is dropped); items are (index, sample_seed) keys;
    - "stream" (detection): step s takes positions [s*B, (s+1)*B) of an endless stream that the dataset maps to
      images epoch by epoch (`stream_generator`); items are positions.
    Rank r of W takes the r-th of W equal slices; `pieces` cuts it into that many micro-batches (accumulation), or
    `piece` into pieces of at most that many items (a probe's encoder batches), or neither: the items one by one.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        pieces: int = 1,
        start_step: int = 0,
        total_steps: int | None = None,
        key: str = "optim.batch_size",
        layout: str = "epochs",
        piece: int | None = None,
    ):
        if global_batch % (world * pieces):
            raise LdaeError(
                f"global batch {global_batch} is not divisible by ranks ({world}) x accumulation steps ({pieces})"
            )
        if layout == "epochs" and n < global_batch:
            raise LdaeError(
                f"the training data has {n:,} images, fewer than one global batch of {global_batch:,}; "
                f"lower {key} (e.g. --set {key}={largest_batch(n, world * pieces)}) or add images"
            )
        self.n, self.batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.accum, self.layout, self.piece = pieces, layout, piece
        self.per_rank = global_batch // world
        self.steps_per_epoch = n // global_batch if layout == "epochs" else n / global_batch
        self.start_step, self.total_steps = start_step, total_steps

    def rank_share(self, step: int) -> list:
        """This rank's items of the step's global batch."""
        lo = self.rank * self.per_rank
        if self.layout == "stream":
            base = step * self.batch + lo
            return list(range(base, base + self.per_rank))
        assert isinstance(self.steps_per_epoch, int)  # n // global_batch in the epochs layout
        epoch, within = divmod(step, self.steps_per_epoch)
        idx = epoch_order(self.n, self.seed, epoch)[within * self.batch + lo : within * self.batch + lo + self.per_rank]
        return [(i, sample_seed(self.seed, epoch, i)) for i in idx.tolist()]

    def micro_batches(self, step: int) -> list[list]:
        keys = self.rank_share(step)
        size = self.piece or self.per_rank // self.accum
        return [keys[i : i + size] for i in range(0, len(keys), size)]

    def __iter__(self) -> Iterator:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            if self.layout == "stream" and self.piece is None and self.accum == 1:
                yield from self.rank_share(step)
            else:
                yield from self.micro_batches(step)
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("unbounded")
        return (self.total_steps - self.start_step) * (
            len(self.micro_batches(self.start_step)) if self.piece else self.accum
        )


def largest_batch(n: int, multiple: int) -> int:
    """The largest power-of-two multiple of `multiple` that `n` images fill, for error messages."""
    batch = multiple
    while batch * 2 <= n:
        batch *= 2
    return batch
