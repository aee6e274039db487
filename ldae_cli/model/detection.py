"""detectron2 pieces behind `ldae detect`: the ViTDet Mask R-CNN built from the model zoo's LazyConfig,
the encoder-to-backbone loading report, COCO-layout datasets, the seeded LSJ training stream and COCO
evaluation.

detectron2 is imported lazily (inside functions) so that the rest of the toolkit, and `ldae --help`,
work where it is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ldae_cli.errors import LdaeError
from ldae_cli.runs.rundir import write_atomically
from ldae_cli.seeds import SeededSteps, stream_generator, stream_sample_seed

NET_PREFIX = "backbone.net."  # where detectron2's SimpleFeaturePyramid keeps the plain ViT
REL_POS = ("attn.rel_pos_h", "attn.rel_pos_w")
# the folded encoder reads images in [-1, 1] (data.to_unit_range); Mask R-CNN normalises (x - mean) / std
PIXEL_MEAN = PIXEL_STD = [127.5, 127.5, 127.5]


def require_detectron2() -> None:
    try:
        with warnings.catch_warnings():  # detectron2 (2024) still calls torch.jit.script at import: not ours to fix
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            from detectron2.modeling import SimpleFeaturePyramid, ViT  # noqa: F401
    except ImportError as exc:
        raise LdaeError(
            f"`ldae detect` needs detectron2 ({exc}); run `make env`, which installs it "
            "(see requirements/detectron2.txt)"
        ) from None


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def global_block_indexes(depth: int) -> list[int]:
    """Blocks with global attention: the last block of each quarter of the depth.

    ViTDet's rule (2, 5, 8, 11 of 12 blocks; 5, 11, 17, 23 of 24); the others use window attention.
    With fewer than 4 blocks every block is global.
    """
    return sorted({(q + 1) * depth // 4 - 1 for q in range(4)} - {-1})


@dataclass
class BackboneSpec:
    """The plain ViT's shape: enough to rebuild the detector without the pretrain checkpoint."""

    width: int
    depth: int
    num_heads: int
    patch_size: int
    pretrain_image_size: int
    mlp_ratio: float = 4.0

    @classmethod
    def from_timm_kwargs(cls, kw: dict, where: str) -> "BackboneSpec":
        img = kw["img_size"]
        h, w = (img, img) if isinstance(img, int) else img
        if h != w:
            raise LdaeError(
                f"{where}: pretrained on {h}x{w} images; detectron2's ViT interpolates only square "
                "position-embedding grids"
            )
        return cls(kw["embed_dim"], kw["depth"], kw["num_heads"], kw["patch_size"], h, kw.get("mlp_ratio", 4.0))

    def to_dict(self) -> dict:
        return dict(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            patch_size=self.patch_size,
            pretrain_image_size=self.pretrain_image_size,
            mlp_ratio=self.mlp_ratio,
        )


@dataclass
class DetectorSpec:
    """The parts of the recipe the model is built from (the stage maps its config onto these)."""

    image_size: int
    num_classes: int
    drop_path: float
    window_size: int
    pyramid_channels: int = 256
    box_fc_dim: int = 1024
    roi_batch_per_image: int = 512


def pyramid_strides(patch: int) -> list[int]:
    """Strides of the simple feature pyramid (scales 4, 2, 1, 0.5 of the ViT's stride) and its top block."""
    if patch % 4:
        raise LdaeError(
            f"the simple feature pyramid upsamples the ViT's stride {patch} by 4; it needs a patch "
            "size divisible by 4 (the pretrain tokenizer.patch)"
        )
    return [patch // 4, patch // 2, patch, patch * 2, patch * 4]


def model_zoo_config(name: str) -> Path:
    # detectron2.model_zoo.get_config_file imports pkg_resources, which setuptools 81+ removed
    spec = importlib.util.find_spec("detectron2.model_zoo")
    if spec is None or not spec.submodule_search_locations:
        raise LdaeError("detectron2 has no model_zoo package; reinstall detectron2 with `make env`")
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / name
    if not path.is_file():
        raise LdaeError(
            f"detectron2's model zoo config {name} is missing from {path.parent}; reinstall detectron2 with `make env`"
        )
    return path


def detector_config(spec: BackboneSpec, s: DetectorSpec):
    """detectron2's LazyConfig for ViTDet Mask R-CNN (common/models/mask_rcnn_vitdet.py), adjusted.

    Changed from the zoo file: our encoder's shape, tanh-GELU (the DiT blocks use it), no class token,
    the pretraining size (the absolute position embedding is interpolated from it), window size with
    global blocks at each quarter, and pyramid level names, anchor sizes and pooler scales derived from
    the patch size, so a patch-16 encoder gives exactly ViTDet's levels p2-p6 with anchors 32-512.
    """
    from detectron2.config import LazyConfig
    from detectron2.layers import ShapeSpec

    model = LazyConfig.load(str(model_zoo_config("common/models/mask_rcnn_vitdet.py"))).model
    net = model.backbone.net
    net.img_size = s.image_size
    net.patch_size = spec.patch_size
    net.embed_dim = spec.width
    net.depth = spec.depth
    net.num_heads = spec.num_heads
    net.mlp_ratio = spec.mlp_ratio
    net.drop_path_rate = s.drop_path
    net.act_layer = partial(nn.GELU, approximate="tanh")
    net.window_size = s.window_size
    glob = set(global_block_indexes(spec.depth))
    net.window_block_indexes = [i for i in range(spec.depth) if i not in glob]
    net.use_rel_pos = True
    net.rel_pos_zero_init = True
    net.pretrain_img_size = spec.pretrain_image_size
    net.pretrain_use_cls_token = False

    strides = pyramid_strides(spec.patch_size)
    names = [f"p{int(math.log2(st))}" for st in strides]
    c = s.pyramid_channels
    model.backbone.out_channels = c
    model.backbone.square_pad = s.image_size
    rpn = model.proposal_generator
    rpn.in_features = names
    rpn.head.in_channels = c
    rpn.anchor_generator.strides = strides
    rpn.anchor_generator.sizes = [[8 * st] for st in strides]
    roi = model.roi_heads
    roi.num_classes = s.num_classes
    roi.batch_size_per_image = s.roi_batch_per_image
    roi.box_in_features = roi.mask_in_features = names[:4]
    roi.box_pooler.scales = roi.mask_pooler.scales = tuple(1.0 / st for st in strides[:4])
    roi.box_head.input_shape = ShapeSpec(channels=c, height=7, width=7)
    roi.box_head.conv_dims = [c] * 4
    roi.box_head.fc_dims = [s.box_fc_dim]
    roi.box_predictor.input_shape = ShapeSpec(channels=s.box_fc_dim)
    roi.mask_head.input_shape = ShapeSpec(channels=c, width=14, height=14)
    roi.mask_head.conv_dims = [c] * 5
    model.pixel_mean, model.pixel_std, model.input_format = PIXEL_MEAN, PIXEL_STD, "RGB"
    return model


def build_detector(spec: BackboneSpec, settings: DetectorSpec) -> nn.Module:
    from detectron2.config import instantiate

    if settings.image_size % (spec.patch_size * 4):
        raise LdaeError(
            f"data.image_size {settings.image_size} must be a multiple of {spec.patch_size * 4} "
            f"(4 x the patch size {spec.patch_size}: the coarsest pyramid level)"
        )
    model = instantiate(detector_config(spec, settings))
    # LastLevelMaxPool hard-codes its input level as "p5" (stride 32, right for patch 16 only)
    model.backbone.top_block.in_feature = f"p{int(math.log2(pyramid_strides(spec.patch_size)[3]))}"
    return model


# ---------------------------------------------------------------------------------------------
# Loading the folded encoder into backbone.net
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """Where each encoder weight went. Only relative positions and pyramid/heads may start fresh."""

    loaded: list[str] = field(default_factory=list)  # detector names filled from the encoder
    fresh_rel_pos: list[str] = field(default_factory=list)
    fresh_new: list[str] = field(default_factory=list)  # pyramid, RPN, ROI heads
    missing: list[str] = field(default_factory=list)  # backbone.net weights the encoder lacks
    unexpected: list[str] = field(default_factory=list)  # encoder weights with no place in the ViT
    mismatched: list[str] = field(default_factory=list)  # "name: encoder shape vs ViT shape"
    loaded_params: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def check(self, source: str) -> None:
        if self.ok:
            return
        parts = [
            f"{label} {items[:3]}"
            for label, items in (
                ("missing from the encoder", self.missing),
                ("unexpected in the encoder", self.unexpected),
                ("shape mismatch", self.mismatched),
            )
            if items
        ]
        raise LdaeError(f"{source}: the encoder does not fit detectron2's ViT: {'; '.join(parts)}")

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} encoder tensors ({self.loaded_params / 1e6:.2f}M values) into "
            f"{NET_PREFIX.rstrip('.')}; fresh: {len(self.fresh_rel_pos)} relative-position tensors (zero), "
            f"{len(self.fresh_new)} pyramid/RPN/ROI-head tensors"
        )

    def to_dict(self) -> dict:
        return {
            "loaded": len(self.loaded),
            "loaded_params": self.loaded_params,
            "fresh_rel_pos": self.fresh_rel_pos,
            "fresh_new": len(self.fresh_new),
            "ok": self.ok,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
        }


def loading_report(detector_shapes: dict[str, tuple], encoder_shapes: dict[str, tuple]) -> LoadReport:
    """Match a timm-named encoder state (patch_embed.*, pos_embed, blocks.i.*) against backbone.net.*.

    Works on names and shapes only, so it can be checked for every model size without the weights.
    """
    report = LoadReport()
    for name, shape in encoder_shapes.items():
        target = NET_PREFIX + name
        if target not in detector_shapes:
            report.unexpected.append(name)
        elif tuple(detector_shapes[target]) != tuple(shape):
            report.mismatched.append(f"{name}: {tuple(shape)} vs {tuple(detector_shapes[target])}")
        else:
            report.loaded.append(target)
            report.loaded_params += math.prod(shape)
    provided = {NET_PREFIX + name for name in encoder_shapes}  # a mismatch is reported once, not also as missing
    for name in detector_shapes:
        if name in provided:
            continue
        if not name.startswith(NET_PREFIX):
            report.fresh_new.append(name)
        elif name.endswith(REL_POS):
            report.fresh_rel_pos.append(name)
        else:
            report.missing.append(name[len(NET_PREFIX) :])
    return report


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_encoder_into(detector: nn.Module, encoder_state: dict[str, torch.Tensor], source: str) -> LoadReport:
    report = loading_report(shapes(detector.state_dict()), shapes(encoder_state))
    report.check(source)
    params = detector.state_dict()
    with torch.no_grad():
        for name, value in encoder_state.items():
            params[NET_PREFIX + name].copy_(value)
    return report


# ---------------------------------------------------------------------------------------------
# COCO-layout data
# ---------------------------------------------------------------------------------------------


@dataclass
class CocoSplit:
    name: str  # the DatasetCatalog / MetadataCatalog name
    json_file: Path
    image_root: Path
    dicts: list[dict]
    class_names: list[str]


def coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / "annotations" / f"instances_{split}.json", root / split


def register_coco_split(root: str | Path, split: str) -> CocoSplit:
    """Load root/annotations/instances_<split>.json with images in root/<split>/ and register it."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = Path(root)
    if not root.is_dir():
        raise LdaeError(
            f"data.path {root}: not a folder; give a COCO root holding annotations/instances_<split>.json "
            "and one image folder per split"
        )
    json_file, image_root = coco_paths(root, split)
    if not json_file.is_file():
        present = (
            sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
            if (root / "annotations").is_dir()
            else []
        )
        hint = f"; found {', '.join(present)} (set data.train_split / data.eval_split)" if present else ""
        raise LdaeError(
            f"{json_file}: COCO annotations not found (expected annotations/instances_{split}.json "
            f"under data.path){hint}"
        )
    if not image_root.is_dir():
        raise LdaeError(
            f"{image_root}: image folder for split '{split}' not found (COCO layout: data.path/{split}/ "
            f"next to annotations/)"
        )
    name = f"ldae_{split}@{root.resolve()}"
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():  # a re-run in the same process (tests) may see changed files
            catalog.remove(name)
    try:
        dicts = load_coco_json(str(json_file), str(image_root), dataset_name=name)
    except json.JSONDecodeError as exc:
        raise LdaeError(f"{json_file}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except (KeyError, TypeError, AssertionError, AttributeError) as exc:
        raise LdaeError(
            f"{json_file}: not a COCO instances file ({type(exc).__name__}: {exc}); expected a mapping "
            "with 'images', 'annotations' and 'categories' lists"
        ) from None
    meta = MetadataCatalog.get(name)
    class_names = list(getattr(meta, "thing_classes", []))
    if not class_names:
        raise LdaeError(f"{json_file}: 'categories' is empty; detection needs at least one category")
    missing = [d["file_name"] for d in dicts if not Path(d["file_name"]).is_file()]
    if missing:
        raise LdaeError(
            f"{json_file}: {len(missing)} of {len(dicts)} images are missing from {image_root} "
            f"(first: {Path(missing[0]).name})"
        )
    DatasetCatalog.register(name, lambda: dicts)
    meta.set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco")
    return CocoSplit(name, json_file, image_root, dicts, class_names)


def train_dicts(split: CocoSplit) -> list[dict]:
    """Images with at least one usable (non-crowd) instance, as detectron2 trains on COCO."""
    from detectron2.data.build import filter_images_with_only_crowd_annotations

    dicts = filter_images_with_only_crowd_annotations(split.dicts)
    if not dicts:
        raise LdaeError(f"{split.json_file}: no image has a non-crowd annotation to train on")
    return dicts


def polygons_to_rle(record: dict) -> dict:
    """Polygon masks -> RLE, so the LSJ crop works on rasters.

    detectron2 crops polygons with shapely, which is not a dependency; cropping the raster mask gives
    the same target.
    """
    from pycocotools import mask as mask_util

    anns = []
    for ann in record.get("annotations", []):
        segm = ann.get("segmentation")
        if isinstance(segm, list):
            ann = {
                **ann,
                "segmentation": mask_util.merge(mask_util.frPyObjects(segm, record["height"], record["width"])),
            }
        anns.append(ann)
    return {**record, "annotations": anns}


def lsj_mapper(image_size: int, scale_range: tuple[float, float], train: bool):
    """ViTDet's large-scale jitter for training (flip, ResizeScale, FixedSizeCrop without padding: the
    model pads to a square) and a resize of the long side to image_size for testing."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper

    if not train:
        return DatasetMapper(
            is_train=False, augmentations=[T.ResizeShortestEdge(image_size, max_size=image_size)], image_format="RGB"
        )
    augs = [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(
            min_scale=scale_range[0], max_scale=scale_range[1], target_height=image_size, target_width=image_size
        ),
        T.FixedSizeCrop(crop_size=(image_size, image_size), pad=False),
    ]
    return DatasetMapper(
        is_train=True,
        augmentations=augs,
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        recompute_boxes=True,
    )


class SeededStream(torch.utils.data.Dataset):
    """Sample k of the endless training stream: image order and augmentation depend only on (seed, k).

    Epoch e = k // N visits the images in a seeded permutation; the augmentation's numpy draws are
    seeded by k. A resumed run therefore sees exactly the samples the uninterrupted run would have.
    """

    def __init__(self, dicts: list[dict], mapper, seed: int):
        self.dicts, self.mapper, self.seed = dicts, mapper, seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.dicts)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:  # only the current epoch's order is kept
            self._orders = {
                epoch: torch.randperm(len(self.dicts), generator=stream_generator(self.seed, epoch)).tolist()
            }
        return self._orders[epoch]

    def __getitem__(self, k: int) -> dict:
        epoch, pos = divmod(k, len(self.dicts))
        record = polygons_to_rle(self.dicts[self._order(epoch)[pos]])
        state = np.random.get_state()
        np.random.seed(stream_sample_seed(self.seed, k))
        try:
            return self.mapper(record)
        finally:
            np.random.set_state(state)


def train_loader(
    dicts: list[dict],
    image_size: int,
    scale_range: tuple[float, float],
    seed: int,
    global_batch: int,
    micro_batch: int,
    rank: int,
    world: int,
    start_step: int,
    num_workers: int,
) -> Iterable[list[dict]]:
    """detectron2's train loader over the seeded stream; each item is one micro-batch of this rank.

    Aspect-ratio grouping is off: it reorders samples across steps (so a resume could not be exact),
    and every image is padded to the same square anyway.
    """
    from detectron2.data import build_detection_train_loader

    dataset = SeededStream(dicts, lsj_mapper(image_size, scale_range, train=True), seed)
    return build_detection_train_loader(
        dataset,
        mapper=None,
        sampler=SeededSteps(len(dicts), global_batch, seed, rank, world, start_step=start_step, layout="stream"),
        total_batch_size=micro_batch * world,
        aspect_ratio_grouping=False,
        num_workers=num_workers,
    )


class _Counted:
    """Wraps the test loader so inference advances a progress bar (inference_on_dataset needs len())."""

    def __init__(self, loader, advance):
        self.loader, self.advance = loader, advance

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.advance(len(batch))


def evaluate(
    model: nn.Module,
    split: CocoSplit,
    image_size: int,
    text: Path,
    distributed: bool,
    num_workers: int,
    advance=lambda n: None,
) -> dict[str, dict[str, float | None]]:
    """COCO box and mask AP (pycocotools' official COCOeval) of `model` on `split`.

    Returns {"bbox": {"AP": .., "AP50": .., ...}, "segm": {...}} in percent (None where COCOeval has no
    value, e.g. nothing was detected; {} on ranks other than the main one). pycocotools' printed
    tables go to the file `text` instead of the terminal. The evaluator gets no output_dir: it
    would write its raw predictions there in torch's code-running format, which no file of ours uses.
    """
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    loader = build_detection_test_loader(
        dataset=split.dicts, mapper=lsj_mapper(image_size, (1.0, 1.0), train=False), num_workers=num_workers
    )
    evaluator = COCOEvaluator(
        split.name, tasks=("bbox", "segm"), distributed=distributed, output_dir=None, use_fast_impl=False
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = inference_on_dataset(model, _Counted(loader, advance), evaluator)
    if printed.getvalue():
        write_atomically(text, printed.getvalue().encode())
    if not results:
        return {}
    return {
        task: {
            k: float(v) if math.isfinite(v) else None
            for k, v in results.get(task, {}).items()
            if not k.startswith("AP-")
        }
        for task in ("bbox", "segm")
    }
