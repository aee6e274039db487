"""Reading pretrain checkpoints back: the denoising model with its tokenizer and objective, one-step
denoising, the encoder folded at fixed t into a plain timm ViT (what probe, fine-tune and detection
start from), and frozen feature extractors for probing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from ldae_cli import __version__
from ldae_cli.data.pipeline import DataConfig, to_unit_range
from ldae_cli.data.sources import open_source
from ldae_cli.errors import LdaeError, short
from ldae_cli.model.diffusion import Denoiser, DiffusionConfig, NoiseSchedule
from ldae_cli.model.models import DenoisingViT, build_timm_vit, fold_to_vit
from ldae_cli.model.tokenizers import Tokenizer, build_tokenizer
from ldae_cli.runs.checkpoint import (
    Checkpoint,
    first_non_finite,
    load_checkpoint,
    load_state,
    read_metadata,
    save_checkpoint,
    sha256_file,
    stored_config,
)
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.seeds import image_noise_seed
from ldae_cli.settings.training import DEFAULT_T

DEFAULT_SIGMA = math.sqrt(1 / 3)  # the noise level of the paper's Figs. 6 and 7
TIMM_WEIGHTS = "model.safetensors"  # the weights file of a `--format timm` export folder
TIMM_EXPORT_FILES = ("config.json", TIMM_WEIGHTS, "README.md")  # what `export --format timm` writes


@dataclass
class Pretrained:
    ckpt: Checkpoint | None  # None for a network still in training (the online probe)
    data: DataConfig  # what the run trained on
    diffusion: DiffusionConfig
    model: DenoisingViT
    tokenizer: Tokenizer
    denoiser: Denoiser
    objective: str = "ldae"  # what trained it (PretrainConfig.objective; a checkpoint from before it: ldae)

    @property
    def image_size(self) -> int:
        return self.denoiser.image_size

    def timestep(self, t: int | None = None, sigma: float | None = None) -> int:
        """The t to add noise at: `t` itself, or the t whose noise level is closest to `sigma` (default
        DEFAULT_SIGMA); a model trained at one noise level (the constant schedule) always uses it."""
        if self.objective != "ldae":
            where = self.ckpt.path if self.ckpt is not None else "this network"
            raise LdaeError(
                f"{where}: an '{self.objective}' checkpoint has no denoiser (its objective is not "
                "denoising); `ldae denoise` reads l-DAE checkpoints (objective ldae)"
            )
        schedule = self.denoiser.schedule
        check_sigma(sigma)
        if t is not None and sigma is not None:
            raise LdaeError("give either --t or --sigma, not both")
        if schedule.kind == "constant":
            return schedule.constant_t
        if t is not None:
            if not (isinstance(t, int) and 1 <= t <= schedule.T):
                raise LdaeError(f"--t must lie in 1..{schedule.T}, got {t}")
            return t
        return schedule.sigma_to_t(DEFAULT_SIGMA if sigma is None else sigma)

    @torch.no_grad()
    def denoise(
        self, images: torch.Tensor, t: int, seed: int, first_index: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, denoised) images in [-1, 1]; image i's noise depends only on (seed, first_index + i)."""
        den = self.denoiser
        z_shape = (den.grid[0] * den.grid[1], self.tokenizer.token_dim)
        eps = torch.stack(
            [
                torch.randn(z_shape, generator=torch.Generator().manual_seed(image_noise_seed(seed, first_index + i)))
                for i in range(len(images))
            ]
        ).to(images.device)
        tt = torch.full((len(images),), t, dtype=torch.long, device=images.device)
        return den.denoise(self.model, images, tt, eps)


def check_sigma(sigma: float | None) -> None:
    """--sigma (and the API's sigma): a noise level, finite and above 0; None is the default."""
    if sigma is not None and not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise LdaeError(f"--sigma is a noise level, a finite number above 0 (e.g. 0.577), got {sigma}")


def load_pretrained(path: str | os.PathLike, ema: bool | None = None) -> Pretrained:
    """ema: None = the EMA weights when the run kept them, else the raw weights."""
    ckpt = load_checkpoint(path, "pretrain")
    ckpt.require(
        "model_spec.grid", "model_spec.width", "model_spec.in_dim", "model_spec.out_dim", "tokenizer.kind", "image_size"
    )
    diffusion = stored_config(DiffusionConfig, ckpt, "diffusion")
    data = stored_config(DataConfig, ckpt, "data")
    has_ema = ckpt.extra.get("has_ema", False)
    if ema and not has_ema:
        raise LdaeError(f"{path}: this run kept no EMA weights (optim.ema was null)")
    use_ema = has_ema if ema is None else ema
    try:
        model = DenoisingViT.from_spec(ckpt.extra["model_spec"])
    except (TypeError, ValueError, LdaeError) as exc:
        raise LdaeError(
            f"{path}: its model_spec does not describe a network ({short(exc)}); the file is damaged "
            "or was not written by ldae"
        ) from None
    load_state(model, ckpt.section("ema" if use_ema else "model"), f"{path} ({'ema' if use_ema else 'model'})")
    model.eval()
    tokenizer = build_tokenizer(ckpt.extra["tokenizer"], ckpt.section("tokenizer"), ckpt.path)
    denoiser = Denoiser(diffusion, tokenizer, NoiseSchedule(diffusion), ckpt.extra["image_size"])
    if tuple(denoiser.grid) != tuple(model.spec["grid"]):
        raise LdaeError(
            f"{path}: image_size {ckpt.extra['image_size']} with {tokenizer.patch}-pixel tokens is a "
            f"{denoiser.grid} grid, but its network was built for {tuple(model.spec['grid'])}; the "
            "metadata is damaged or was edited"
        )
    return Pretrained(ckpt, data, diffusion, model, tokenizer, denoiser, ckpt.config.get("objective", "ldae"))


def pixel_affine(pre: Pretrained) -> tuple[torch.Tensor, torch.Tensor]:
    """Map from an image patch to the network's input token (folded into the ViT patch embedding)."""
    if pre.diffusion.input_space == "image":
        d = pre.tokenizer.image_token_dim
        return torch.eye(d), torch.zeros(d)
    if not pre.tokenizer.is_linear:
        where = pre.ckpt.path if pre.ckpt else "the network in training"
        raise LdaeError(
            f"{where}: the network reads latents of a non-linear '{pre.tokenizer.kind}' "
            "tokenizer, which cannot be folded into a ViT patch embedding"
        )
    return pre.tokenizer.affine()


def foldable(pre: Pretrained) -> bool:
    """Whether the encoder is a plain ViT on images (false behind a non-linear tokenizer such as a conv VAE)."""
    return pre.diffusion.input_space == "image" or pre.tokenizer.is_linear


def fold_encoder(pre: Pretrained, t: int = DEFAULT_T, depth: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    if pre.objective != "ldae" and t != DEFAULT_T:  # conditioned on DEFAULT_T alone, any other t is untrained
        raise LdaeError(
            f"{pre.ckpt.path if pre.ckpt else 'the encoder'}: an '{pre.objective}' encoder has no "
            f"timestep (it was trained at the constant t = {DEFAULT_T}, the default); leave t at "
            f"{DEFAULT_T}, got {t}"
        )
    if not 0 <= t <= pre.denoiser.schedule.T:
        raise LdaeError(f"t must lie in 0..{pre.denoiser.schedule.T}, got {t}")
    return fold_to_vit(pre.model, t, pre.tokenizer.patch, pixel_affine(pre), depth)


def export_encoder(
    path: str | Path, out: str | Path, t: int = DEFAULT_T, depth: int | None = None, ema: bool | None = None
) -> Path:
    """Write the folded encoder as an `encoder` checkpoint whose tensors are a timm state dict."""
    pre = load_pretrained(path, ema)
    assert pre.ckpt is not None  # loaded from one
    state, kwargs = fold_encoder(pre, t, depth)
    extra = {
        "timm_kwargs": kwargs,
        "t": t,
        "depth": kwargs["depth"],
        "image_size": pre.image_size,
        "class_names": pre.ckpt.extra.get("class_names", []),
        "data_identity": pre.ckpt.extra.get("data_identity"),
    }
    config = {**pre.ckpt.config, "data": exported_data(pre.ckpt.config)}
    return save_checkpoint(out, "encoder", state, config, [pre.ckpt.parent_ref("pretrain")], extra)


def exported_data(config: dict) -> dict:
    """The data settings an export records (its pretraining's, which probe and finetune read when no --data is
    given): the path made absolute where it is found from here, so the export names it from any folder."""
    data = dict(config.get("data") or {})
    if data.get("path") and Path(data["path"]).expanduser().exists():
        data["path"] = str(Path(data["path"]).expanduser().absolute())
    return data


DATASET_KEYS = ("source", "path", "train_split", "eval_split")  # which data; the other data keys say how it is read


def named(flags: dict) -> bool:
    """Whether the command line names the data (--data, or --source for a kind's default location)."""
    return bool(flags.get("data.path") or flags.get("data.source"))


def pretraining_data(path: str | Path, given: bool) -> tuple[dict, str]:
    """The data settings of what the encoder at `path` (a pretrain checkpoint or an export) was pretrained on, for a
    stage that reads it: (settings, '') where its record names data that is still there, the same files (its
    identity); else the settings without the dataset (DATASET_KEYS) and why, for the stage's "give --data" line.
    `given`: the command line names the data (`named`), so the record's dataset is not looked at."""
    folder = timm_export(path)
    if folder is not None:
        about = read_timm_config(folder).get("ldae") or {}
        data = dict(about.get("data") or {"image_size": about.get("image_size")})
        identity = about.get("data_identity")
    else:
        meta = read_metadata(path)
        data, identity = dict(meta["config"].get("data") or {}), meta["extra"].get("data_identity")
    how = {k: v for k, v in data.items() if k not in DATASET_KEYS and v is not None}
    if given:
        return how, ""
    if not data.get("source"):
        return how, f"{path} records none"
    cfg = DataConfig(**{k: data[k] for k in DATASET_KEYS if k in data}, verify=False)  # the index, not the hashes
    where = cfg.path or f"{cfg.source}, wherever installed"
    try:
        found = open_source(cfg, "train").identity()
    except LdaeError:
        return how, f"{path} records the data it was pretrained on ({where}), which is not there any more"
    if identity is not None and found != identity:
        return how, (
            f"{path} records the data it was pretrained on ({where}), which holds other images now (its "
            "files, sizes or labels differ)"
        )
    return data, ""


def export_timm(
    path: str | Path, out: str | Path, t: int = DEFAULT_T, depth: int | None = None, ema: bool | None = None
) -> Path:
    """The folded encoder as a folder timm loads by itself, `timm.create_model("local-dir:OUT", pretrained=True)`,
    and that can be pushed to a model hub unchanged: config.json (a registered ViT architecture whose
    `model_args` set every dimension; `pretrained_cfg` with the input size, crop and mean/std: our encoder reads
    [-1, 1] images, i.e. mean = std = 0.5 on [0, 1] pixels), model.safetensors, and a README model card."""
    pre = load_pretrained(path, ema)
    assert pre.ckpt is not None  # loaded from one
    state, kwargs = fold_encoder(pre, t, depth)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = list(kwargs["img_size"])
    config = {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "num_features": kwargs["embed_dim"],
        "global_pool": "avg",
        "model_args": {**kwargs, "img_size": size},
        "pretrained_cfg": {
            "input_size": [3, *size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        # ignored by timm; what `ldae info` and load_encoder report about the folder
        "ldae": {
            "package_version": __version__,
            "objective": pre.objective,
            "t": t,
            "depth": kwargs["depth"],
            "image_size": pre.image_size,
            "class_names": pre.ckpt.extra.get("class_names", []),
            "source": pre.ckpt.parent_ref("pretrain"),
            "data": exported_data(pre.ckpt.config),
            "data_identity": pre.ckpt.extra.get("data_identity"),
        },
    }
    # atomic renames: a kill leaves no torn file, and nothing is written through a link
    write_atomically(out / TIMM_WEIGHTS, save(state))
    write_atomically(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    tag, name, how = MODEL_CARD[pre.objective]
    write_atomically(
        out / "README.md",
        (
            f"---\ntags: [image-feature-extraction, timm, {tag}]\nlibrary_name: timm\n---\n# {name} encoder\n\n"
            f"A ViT ({kwargs['depth']} blocks, width {kwargs['embed_dim']}, {kwargs['num_heads']} heads, "
            f"{kwargs['patch_size']}x{kwargs['patch_size']} patches, {size[0]}x{size[1]} input, no class token, "
            f"average pool) pretrained as {how} with ldae, folded at t = {t}.\n\n"
            "```python\nimport timm\n"
            f"model = timm.create_model('local-dir:{out.name}', pretrained=True)  # features\n```"
            f"\n\nSource checkpoint sha256: {pre.ckpt.sha256}\n"
        ).encode(),
    )
    return out


# the model card's tag, title and what the encoder was pretrained as, by objective
MODEL_CARD = {
    "ldae": ("l-dae", "l-DAE", "a latent denoising autoencoder (l-DAE)"),
    "mae": ("mae", "MAE", "a masked autoencoder (MAE; no timestep: its blocks were trained at this t)"),
    "mocov3": (
        "moco-v3",
        "MoCo v3",
        "MoCo v3's base encoder (contrastive, features before its projection "
        "head; no timestep: its blocks were trained at this t)",
    ),
}


def timm_export(path: str | os.PathLike) -> Path | None:
    """The `ldae export --format timm` folder `path` names (the folder itself, or its model.safetensors: the file
    provenance records); None for a file that is not in such a folder."""
    path = Path(path)
    if path.is_dir():
        missing = [name for name in ("config.json", TIMM_WEIGHTS) if not (path / name).is_file()]
        if missing:
            raise LdaeError(
                f"{path}: a folder without {' and '.join(missing)}; give a checkpoint file or a folder "
                "written by `ldae export --format timm`"
            )
        return path
    if path.name == TIMM_WEIGHTS and (path.parent / "config.json").is_file():
        return path.parent
    return None


def read_timm_config(folder: Path) -> dict:
    """config.json of a timm export folder, checked for the `model_args` an encoder is built from."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LdaeError(f"{folder / 'config.json'}: not valid JSON ({short(exc)}); export the encoder again") from None
    args = config.get("model_args") if isinstance(config, dict) else None
    if not isinstance(args, dict) or not {"depth", "embed_dim", "patch_size", "img_size"} <= args.keys():
        raise LdaeError(
            f"{folder / 'config.json'}: no model_args with depth, embed_dim, patch_size and img_size; "
            "not a folder written by `ldae export --format timm`"
        )
    return config


def timm_provenance(config: dict) -> dict:
    """The provenance of a timm export folder from its config.json: the pretrain checkpoint it was folded from
    (none for a folder exported before ldae recorded it)."""
    source = (config.get("ldae") or {}).get("source")
    return {"parents": [source] if source else []}


def load_timm_export(folder: Path) -> Checkpoint:
    """A timm export folder as an `encoder` checkpoint: its weights, model_args as timm_kwargs, and (when the
    export recorded them) t, depth and the pretrain checkpoint it was folded from. Its path and sha256 are
    those of model.safetensors, the file that holds the weights."""
    config = read_timm_config(folder)
    weights = folder / TIMM_WEIGHTS
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LdaeError(
            f"{weights}: cannot read the weights ({short(exc)}); the file is damaged, export again"
        ) from None
    bad = first_non_finite(state)
    if bad is not None:
        raise LdaeError(
            f"{weights}: tensor '{bad}' holds NaN or infinite values; the file is damaged or was "
            "edited, export the encoder again"
        )
    about = config.get("ldae") or {}
    extra = {
        "timm_kwargs": config["model_args"],
        **{k: about[k] for k in ("t", "depth", "image_size", "class_names") if k in about},
    }
    return Checkpoint(
        path=weights,
        kind="encoder",
        tensors=state,
        config={},
        extra=extra,
        provenance=timm_provenance(config),
        sha256=sha256_file(weights),
        package_version=about.get("package_version", ""),
    )


def load_encoder(
    path: str | os.PathLike, t: int = DEFAULT_T, depth: int | None = None, ema: bool | None = None, **timm_overrides
) -> tuple[VisionTransformer, dict, Checkpoint]:
    """A timm ViT from a pretrain checkpoint (folded now at t), an exported `encoder` checkpoint or a
    `--format timm` export folder (both folded already).

    Returns (vit, timm kwargs, source checkpoint) so callers can record provenance.
    """
    folder = timm_export(path)
    if folder is not None:
        ckpt = load_timm_export(folder)
        state, kwargs = ckpt.tensors, ckpt.extra["timm_kwargs"]
    elif (kind := read_metadata(path)["kind"]) == "pretrain":
        pre = load_pretrained(path, ema)
        state, kwargs = fold_encoder(pre, t, depth)
        assert pre.ckpt is not None  # loaded from one
        ckpt = pre.ckpt
    elif kind == "encoder":
        ckpt = load_checkpoint(path, "encoder")
        ckpt.require("timm_kwargs.depth", "timm_kwargs.embed_dim", "timm_kwargs.patch_size", "timm_kwargs.img_size")
        state, kwargs = ckpt.tensors, ckpt.extra["timm_kwargs"]
    else:
        raise LdaeError(
            f"{path}: is a '{kind}' checkpoint, expected 'pretrain' or 'encoder' (or a folder from "
            "`ldae export --format timm`)"
        )
    if ckpt.kind == "encoder" and depth is not None and depth != kwargs["depth"]:
        raise LdaeError(f"{path}: exported with depth {kwargs['depth']}; export again with --depth {depth}")
    try:
        vit = build_timm_vit(kwargs, **timm_overrides)
    except (TypeError, ValueError, AssertionError) as exc:
        raise LdaeError(
            f"{path}: its timm_kwargs do not build a ViT ({short(exc)}); the file is damaged or was edited"
        ) from None
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ from what its kwargs build
        raise LdaeError(
            f"{path}: its tensors do not fit the ViT its metadata describes "
            f"({str(exc).splitlines()[-1].strip()[:200]}); the file is damaged or was edited"
        ) from None
    allowed_missing = {k for k in missing if k.startswith("head")}
    if set(missing) - allowed_missing or unexpected:
        raise LdaeError(
            f"{path}: encoder weights do not fit the ViT (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return vit, kwargs, ckpt


@dataclass
class FeatureEncoder:
    """A frozen feature extractor: (uint8 images on the device, noise seed) -> (B, dim) features."""

    fn: Callable[[torch.Tensor, int], torch.Tensor]
    dim: int
    description: str
    parents: list[dict]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """timm's ViT initialisation (trunc-normal 0.02 weights, zero biases) for every linear layer, gates included.

    The adaLN-Zero init of a fresh DenoisingViT would make every block the identity, a baseline
    weaker than any random network; this keeps the architecture and makes it a real random one.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen).clamp_(-2, 2) * 0.02)
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.zero_()


def vit_features(
    vit: VisionTransformer,
    kwargs: dict,
    source: Checkpoint,
    device: torch.device,
    amp: torch.dtype | None,
    random_init_seed: int | None = None,
) -> FeatureEncoder:
    """An exported encoder (a plain timm ViT, its t folded in) as a frozen, average-pooled feature extractor;
    `random_init_seed`: the same ViT freshly initialised by timm (the untrained baseline)."""
    if random_init_seed is not None:
        torch.manual_seed(random_init_seed)
        vit = build_timm_vit(kwargs)
    net = vit.to(device).eval().requires_grad_(False)
    description = (
        "random-init ViT (same architecture, untrained)"
        if random_init_seed is not None
        else f"exported encoder {source.path}"
    ) + f", {kwargs['depth']} blocks"
    role = "pretrain" if source.kind == "pretrain" else "encoder"

    @torch.no_grad()
    def features(images: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return net(to_unit_range(images)).float()

    return FeatureEncoder(features, kwargs["embed_dim"], description, [source.parent_ref(role)])


def pixel_features(image_size: int) -> FeatureEncoder:
    """The raw-image baseline: every pixel in [-1, 1] is a feature."""
    return FeatureEncoder(lambda images, seed: to_unit_range(images).flatten(1), 3 * image_size**2, "raw pixels", [])


def encoder_features(
    pre: Pretrained,
    t: int,
    depth: int | None,
    noisy_input: bool,
    device: torch.device,
    amp: torch.dtype | None,
    random_init_seed: int | None = None,
) -> FeatureEncoder:
    """The average-pooled encoder of `pre` at fixed t after `depth` blocks (default: the encoder/decoder split),
    on clean images or with the level-t latent noise added; `random_init_seed` re-initialises the same
    network at random (the untrained baseline). `pre.model` may be a network in training (the online probe):
    a fold copies its weights, and without one it is switched to eval mode only while features are drawn."""
    if random_init_seed is not None:
        randomize(pre.model, random_init_seed)
    depth = depth or pre.model.encoder_depth
    description = (
        "random-init network (same architecture, untrained)"
        if random_init_seed is not None
        else f"l-DAE encoder at t={t}"
        if pre.objective == "ldae"
        else f"{pre.objective} encoder"
    ) + f", {depth} blocks"
    denoiser = pre.denoiser.to(device)
    net: torch.nn.Module
    if foldable(pre):  # the plain ViT that fine-tuning and detection start from
        state, kwargs = fold_encoder(pre, t, depth)
        vit = build_timm_vit(kwargs)
        vit.load_state_dict(state, strict=True)
        net, dim = vit.to(device).eval().requires_grad_(False), kwargs["embed_dim"]
        encode = net
    else:  # a conv tokenizer in front: read its latents with the adaLN network itself
        net, dim = pre.model.to(device), pre.model.spec["width"]
        encode = None
        description += f" on {pre.tokenizer.kind} latents"

    @torch.no_grad()
    def features(images: torch.Tensor, seed: int) -> torch.Tensor:
        was_training = net.training
        net.eval()
        try:
            return pooled(images, seed)
        finally:
            net.train(was_training)

    def pooled(images: torch.Tensor, seed: int) -> torch.Tensor:
        x = to_unit_range(images)
        if noisy_input:
            z0 = denoiser.tokenizer.encode(x)
            gen = torch.Generator(device=device).manual_seed(seed)
            eps = torch.randn(z0.shape, generator=gen, device=device)
            zt, _ = denoiser.noisy_input(z0, torch.full((len(x),), t, device=device), eps)
            x = denoiser.tokenizer.decode(zt, denoiser.grid)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if encode is not None:
                return encode(x).float()
            tokens = denoiser.tokenizer.encode(x)
            return pre.model.features(tokens, torch.full((len(x),), t, device=device), depth).mean(1).float()

    if noisy_input:
        description += ", noisy input"
    return FeatureEncoder(features, dim, description, [pre.ckpt.parent_ref("pretrain")] if pre.ckpt else [])
