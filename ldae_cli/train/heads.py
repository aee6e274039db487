"""Linear-probe heads and what every probe shares (the offline probe of engine_probe.py, the online one of
online_probe.py): features from a frozen encoder, BatchNorm without affine + one linear head per learning rate,
LARS, top-k accuracy and weighted k-NN.

The BN has no parameters and each head's loss depends only on its own weights, so K heads trained together on the
sum of their losses are exactly K separate runs over the same feature batches: the lr sweep costs one pass over
the data instead of K. LARS as MAE uses it (timm's `Lars`): momentum 0.9, the trust-ratio adaptation on weight
matrices only, no weight decay; biases get plain momentum SGD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from ldae_cli.data.pipeline import BadImageCounter, ImageDataset, make_loader
from ldae_cli.model.pretrained import FeatureEncoder
from ldae_cli.runs.distributed import DistContext, all_gather_cat
from ldae_cli.runs.logs import progress_bar
from ldae_cli.seeds import feature_seed


class ProbeHeads(nn.Module):
    def __init__(self, dim: int, num_classes: int, count: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        heads = [nn.Linear(dim, num_classes) for _ in range(count)]
        self.heads = nn.ModuleList(heads)
        for head in heads:
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W) -> logits (K, B, C)."""
        x = self.bn(features)
        return torch.stack([head(x) for head in self.heads])


def lars_for_heads(heads: ProbeHeads, lrs: list[float], momentum: float = 0.9, weight_decay: float = 0.0) -> Lars:
    """One parameter group per (head, weight|bias); each carries its own lr as `lr_scale`.

    Weight matrices get LARS adaptation (always_adapt: the trust ratio applies even at wd 0, as in
    MAE); 1-D parameters neither adaptation nor weight decay.
    """
    groups = []
    for head, lr in zip(heads.heads, lrs):
        groups.append({"params": [head.weight], "lr_scale": lr, "always_adapt": True, "weight_decay": weight_decay})
        groups.append({"params": [head.bias], "lr_scale": lr, "always_adapt": False, "weight_decay": 0.0})
    return Lars(groups, lr=0.0, momentum=momentum)


def head_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each head's mean cross-entropy, (K,); their sum trains every head on its own loss alone."""
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b).mean(1)


def loss_terms(blrs: list[float]) -> tuple[str, ...]:
    """metrics.jsonl names: `loss` is the lowest head's loss (a head at too high an lr may diverge while the
    others are fine), then one `loss_blr<blr>` per head."""
    return ("loss",) + tuple(f"loss_blr{blr:g}" for blr in blrs)


def with_lowest(losses: torch.Tensor) -> torch.Tensor:
    """(K,) head losses -> (1 + K,): the best head's loss first (non-finite only when every head has diverged),
    then the heads, in the order of `loss_terms`."""
    lowest = torch.where(losses.isnan(), math.inf, losses).min()
    return torch.cat([lowest[None], losses])


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """logits (K, N, C) -> {k: per-head accuracy (K,)} in percent; k is capped at the class count."""
    c = logits.shape[-1]
    top = logits.topk(min(max(ks), c), dim=-1).indices  # (K, N, kmax)
    hit = top == labels[None, :, None]
    return {k: 100.0 * hit[..., : min(k, c)].any(-1).float().mean(-1) for k in ks}


def head_step(heads: ProbeHeads, optimizer: Lars, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One LARS step on a feature batch at the optimizer's current lrs; returns each head's loss, (K,), detached."""
    heads.train()
    losses = head_losses(heads(features), labels)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


@torch.no_grad()
def evaluate(
    heads: ProbeHeads, features: torch.Tensor, labels: torch.Tensor, batch: int = 4096
) -> dict[int, torch.Tensor]:
    heads.eval()
    logits = torch.cat([heads(features[i : i + batch]) for i in range(0, len(features), batch)], dim=1)
    return topk_accuracy(logits, labels)


@torch.no_grad()
def knn_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Weighted k-NN on cosine similarity (votes exp(sim / T), as in DINO's evaluation), top-1 percent."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train.float(), dim=1)
    correct = 0
    k = min(k, len(train))
    for i in range(0, len(test), chunk):
        sims = F.normalize(test[i : i + chunk].float(), dim=1) @ train.T
        top_sim, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i : i + chunk]).sum())
    return 100.0 * correct / max(1, len(test))


def steps_for(n: int, batch: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * (n // batch if n >= batch else 1)))


@torch.no_grad()
def extract(
    encoder: FeatureEncoder,
    dataset: ImageDataset,
    ctx: DistContext,
    label: str,
    batch: int = 256,
    seed: int = 0,
    num_workers: int = 0,
    on_bad_image: str = "error",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image (center crops), each rank a contiguous shard, gathered on all ranks."""
    device = ctx.device
    n = len(dataset)
    lo, hi = n * ctx.rank // ctx.world, n * (ctx.rank + 1) // ctx.world
    batches = [list(range(i, min(i + batch, hi))) for i in range(lo, hi, batch)]
    bad = BadImageCounter(on_bad_image)
    feats, labels = [], []
    with progress_bar("img", progress and ctx.is_main) as bar:
        task = bar.add_task(f"features ({label})", total=hi - lo, info="")
        for keys, items in zip(batches, make_loader(dataset, batches, num_workers, pin_memory=device.type == "cuda")):
            items = bad.check(items)
            feats.append(encoder.fn(items.images.to(device, non_blocking=True), feature_seed(seed, keys[0])).cpu())
            labels.append(items.labels)
            bar.update(task, advance=len(keys))
    return all_gather_cat(torch.cat(feats), ctx), all_gather_cat(torch.cat(labels), ctx)
