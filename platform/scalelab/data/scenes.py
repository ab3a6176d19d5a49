"""Detection data: a seeded scene generator (kind ``scenes``) and a COCO-JSON reader (kind ``coco``).

Both produce the canonical prepared form with per-split ``boxes`` (M, 4) xyxy pixels (x2, y2
exclusive, as COCO's x + w), ``box_labels`` and ``box_image_index``; ``y`` holds each image's
object count. Images are square: scenes are drawn at ``data.image_size``; COCO images are
letterboxed to it (scaled by the longer side, padded right/bottom), as serving does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scalelab.config.specs import DataSpec
from scalelab.data.dataset import SPLITS, Dataset, Split
from scalelab.data.sources import conform, read_classification
from scalelab.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_CANVAS = 64
INK_THRESHOLD = 32  # resized object pixels below this are bilinear halo, not object: zeroed


class SceneOptions(BaseModel):
    """``data.scenes`` of a recipe with ``data.kind: scenes``; canvas size is ``data.image_size``."""

    model_config = ConfigDict(extra="forbid")

    objects: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "digits"},
        description="DataSpec fields of the classification dataset whose images are pasted "
        "(digits, fashion-mnist, imagefolder, npz); its train/val/test images fill the same splits.",
    )
    num_scenes: int = Field(3000, ge=3, description="Scenes in all; data.val/test_fraction split them.")
    objects_per_scene: tuple[int, int] = Field((1, 5), description="Objects per scene, [min, max].")
    object_size: tuple[int, int | None] = Field(
        (8, None),
        description="Longer side of a pasted object in px, [min, max]; max None: canvas / 2. "
        "Sizes are drawn log-uniformly, so small objects are as common as large ones per octave.",
    )
    max_iou: float = Field(0.1, ge=0, le=1, description="Largest IoU allowed between two objects.")
    paste: Literal["ink", "rect"] = Field(
        "ink",
        description="'ink': max-composite dark-background objects, box = tight box of the ink; "
        "'rect': paste the whole resized image, box = its rectangle.",
    )
    clutter: int = Field(0, ge=0, description="Unlabelled random strokes per scene (distractors).")
    noise: float = Field(0.0, ge=0, description="Std of Gaussian pixel noise, in grey levels.")
    seed: int | None = Field(None, description="Generator seed (None: data.split_seed).")

    @model_validator(mode="after")
    def _check_ranges(self) -> SceneOptions:
        lo, hi = self.objects_per_scene
        if not 1 <= lo <= hi:
            raise ValueError(f"objects_per_scene must be 1 <= min <= max, got {list(self.objects_per_scene)}")
        smin, smax = self.object_size
        if smin < 2 or (smax is not None and smax < smin):
            raise ValueError(f"object_size must be 2 <= min <= max, got {list(self.object_size)}")
        return self


def scene_options(spec: DataSpec) -> SceneOptions:
    try:
        return SceneOptions.model_validate(spec.scenes)
    except ValidationError as e:
        raise DataError(f"data.scenes is invalid: {e}") from None


def read_scenes(spec: DataSpec) -> Dataset:
    """Scenes of pasted objects with exact boxes; the same spec always gives the same bytes."""
    opts = scene_options(spec)
    canvas = spec.image_size or DEFAULT_CANVAS
    smax = opts.object_size[1] or canvas // 2
    if smax > canvas or opts.object_size[0] > smax:
        raise DataError(f"object_size {list(opts.object_size)} does not fit a {canvas} px canvas")
    src_spec = _object_spec(spec, opts)
    source = read_classification(src_spec)
    channels = spec.channels or source.channels
    seed = spec.split_seed if opts.seed is None else opts.seed
    n_test = max(1, round(spec.test_fraction * opts.num_scenes))
    n_val = max(1, round(spec.val_fraction * opts.num_scenes)) if spec.val_fraction > 0 else 0
    counts = {"train": opts.num_scenes - n_val - n_test, "val": n_val, "test": n_test}
    splits = {}
    for i, name in enumerate(SPLITS):
        objs = source.splits[name] if len(source.splits[name]) else source.splits["train"]
        objs = Split(conform(objs.x, None, channels), objs.y)  # the scene's channel count, once
        rng = np.random.default_rng([seed, i])  # one stream per split: splits are independent
        splits[name] = _generate(counts[name], objs, canvas, channels, (opts.object_size[0], smax), opts, rng)
    return Dataset(
        name=spec.name,
        splits=splits,
        classes=list(source.classes),
        task="detection",
        hflip_ok=source.hflip_ok,
        source_report={"scenes": opts.model_dump(mode="json"), "objects_from": src_spec.kind},
    )


def _object_spec(spec: DataSpec, opts: SceneOptions) -> DataSpec:
    fields = {
        "name": f"{spec.name}-objects",
        "val_fraction": spec.val_fraction,
        "test_fraction": spec.test_fraction,
        "split_seed": spec.split_seed,
        **opts.objects,
    }
    if fields.get("kind") in ("scenes", "coco"):
        raise DataError("data.scenes.objects must be a classification dataset, not scenes or coco")
    try:
        return DataSpec.model_validate(fields)
    except ValidationError as e:
        raise DataError(f"data.scenes.objects is not a valid data spec: {e}") from None


def _generate(
    n: int,
    objs: Split,
    canvas: int,
    channels: int,
    sizes: tuple[int, int],
    opts: SceneOptions,
    rng: np.random.Generator,
) -> Split:
    x = np.zeros((n, canvas, canvas, channels), dtype=np.uint8)
    counts = np.zeros(n, dtype=np.int64)
    boxes, labels, owners = [], [], []
    for i in range(n):
        img = np.zeros((canvas, canvas, channels), dtype=np.float32)
        placed: list[np.ndarray] = []
        for _ in range(rng.integers(opts.objects_per_scene[0], opts.objects_per_scene[1] + 1)):
            k = int(rng.integers(len(objs)))
            pasted = _paste(img, objs.x[k], canvas, channels, sizes, opts, placed, rng)
            if pasted is not None:
                placed.append(pasted)
                boxes.append(pasted)
                labels.append(int(objs.y[k]))
                owners.append(i)
        counts[i] = len(placed)
        for _ in range(opts.clutter):
            _stroke(img, canvas, rng)
        if opts.noise > 0:
            img += rng.normal(0, opts.noise, img.shape)
        x[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return Split(
        x,
        counts,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        box_labels=np.array(labels, dtype=np.int64),
        box_image_index=np.array(owners, dtype=np.int64),
    )


def _paste(img, obj, canvas, channels, sizes, opts, placed, rng, tries: int = 20) -> np.ndarray | None:
    """Resize one object, place it where it overlaps others at most ``max_iou``; return its box."""
    from PIL import Image

    side = float(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1] + 1))))
    h, w = obj.shape[:2]
    scale = side / max(h, w)
    nh, nw = max(2, min(canvas, round(h * scale))), max(2, min(canvas, round(w * scale)))
    pil = Image.fromarray(obj[..., 0] if channels == 1 else obj)
    patch = np.asarray(pil.resize((nw, nh), Image.BILINEAR), dtype=np.float32).reshape(nh, nw, channels)
    if opts.paste == "ink":
        patch[patch.max(-1) < INK_THRESHOLD] = 0
        rows, cols = np.nonzero(patch.max(-1))
        if len(rows) == 0:
            return None  # a blank source image has nothing to box
        patch = patch[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # tight to the ink
        nh, nw = patch.shape[:2]
    for _ in range(tries):
        y0, x0 = int(rng.integers(0, canvas - nh + 1)), int(rng.integers(0, canvas - nw + 1))
        box = np.array([x0, y0, x0 + nw, y0 + nh], dtype=np.float32)
        if placed and _iou(box, np.stack(placed)).max() > opts.max_iou:
            continue
        region = img[y0 : y0 + nh, x0 : x0 + nw]
        region[...] = np.maximum(region, patch) if opts.paste == "ink" else patch
        return box
    return None  # crowded canvas: skip the object rather than overlap it


def _stroke(img: np.ndarray, canvas: int, rng: np.random.Generator) -> None:
    """An unlabelled line segment of moderate brightness: background clutter."""
    from PIL import Image, ImageDraw

    layer = Image.new("L", (canvas, canvas))
    pts = rng.uniform(0, canvas, 4).tolist()
    ImageDraw.Draw(layer).line(pts, fill=int(rng.integers(64, 192)), width=int(rng.integers(1, 3)))
    img[...] = np.maximum(img, np.asarray(layer, dtype=np.float32)[..., None])


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


# ------------------------------------------------------------------------------------------ COCO


def read_coco(spec: DataSpec) -> Dataset:
    """COCO detection JSON (``images``, ``annotations``, ``categories``) -> the canonical form.

    ``data.source`` is the JSON file; image ``file_name``s resolve against its folder (or an
    ``images/`` folder beside it). Categories map to 0..K-1 in id order; crowd annotations are
    dropped. Images are letterboxed to ``data.image_size`` (default: the largest image side) and
    split by a seeded shuffle with data.val_fraction / test_fraction.
    """
    if not spec.source:
        raise DataError("kind 'coco' needs data.source: the path of a COCO annotations JSON file")
    if spec.source.startswith("s3://"):
        raise DataError(
            f"{spec.source}: a COCO dataset on S3 is prepared in the stream format only (in parallel on "
            f"Ray); set data.format=stream or auto"
        )
    path = Path(spec.source)
    if not path.is_file():
        raise DataError(f"COCO annotations file {path} does not exist")
    images, by_image, cat_index, classes = coco_index(path.read_bytes(), str(path))
    size = spec.image_size or max(max(int(im["height"]), int(im["width"])) for im in images)
    channels = spec.channels or 3
    from scalelab.artifacts.preprocess import letterbox, to_channels

    xs, boxes, labels, owners, skipped = [], [], [], [], []
    for im in images:
        try:
            arr = to_channels(_load_image(path.parent, im["file_name"]), channels)
        except DataError as e:
            if spec.on_bad_file == "error":
                raise DataError(f"{e}. Fix or delete it, or set data.on_bad_file=skip to skip it") from None
            log.warning("skipping unreadable image %s (%s)", im["file_name"], e)
            skipped.append(str(im["file_name"]))
            continue
        i = len(xs)
        boxed, scale = letterbox(arr, size)
        xs.append(boxed)
        for a in by_image.get(im["id"], []):
            bx, by, bw, bh = (float(v) for v in a["bbox"])
            if bw <= 0 or bh <= 0:
                continue
            boxes.append([bx * scale, by * scale, (bx + bw) * scale, (by + bh) * scale])
            labels.append(cat_index[a["category_id"]])
            owners.append(i)
    if not xs:
        raise DataError(f"{path}: every image was unreadable")
    x = np.stack(xs)
    boxes_a = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    labels_a, owners_a = np.array(labels, dtype=np.int64), np.array(owners, dtype=np.int64)
    order = np.random.default_rng(spec.split_seed).permutation(len(x))
    n_test = max(1, round(spec.test_fraction * len(x)))
    n_val = round(spec.val_fraction * len(x))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if not len(parts["train"]):
        raise DataError(f"{path}: {len(x)} images leave none for training after the val/test split")
    splits = {name: subset(x, boxes_a, labels_a, owners_a, np.sort(idx)) for name, idx in parts.items()}
    return Dataset(
        name=spec.name,
        splits=splits,
        classes=classes,
        task="detection",
        hflip_ok=True,
        source_report={
            "coco": str(path),
            "image_size": size,
            **({"skipped_count": len(skipped), "skipped": sorted(skipped)} if skipped else {}),
        },
    )


def coco_index(raw: bytes, where: str) -> tuple[list[dict], dict[Any, list[dict]], dict[Any, int], list[str]]:
    """A COCO detection JSON -> (images, non-crowd annotations by image id, category id -> 0..K-1 in
    id order, class names); an annotation of an unknown category is refused."""
    try:
        doc = json.loads(raw)
        images, anns, cats = doc["images"], doc.get("annotations", []), doc["categories"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where} is not COCO detection JSON (needs images, categories): {e}") from None
    if not images or not cats:
        raise DataError(f"{where} lists no images or no categories")
    cats = sorted(cats, key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[Any, list[dict]] = {}
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        if a["category_id"] not in cat_index:
            raise DataError(f"{where}: annotation {a.get('id')} has unknown category {a['category_id']}")
        by_image.setdefault(a["image_id"], []).append(a)
    return images, by_image, cat_index, [str(c["name"]) for c in cats]


def subset(x, boxes, labels, owners, idx: np.ndarray) -> Split:
    """The images ``idx`` (sorted) with their boxes, image indices renumbered."""
    remap = np.full(len(x), -1, dtype=np.int64)
    remap[idx] = np.arange(len(idx))
    keep = remap[owners] >= 0
    new_owner = remap[owners[keep]]
    return Split(
        x[idx],
        np.bincount(new_owner, minlength=len(idx)).astype(np.int64),
        boxes=boxes[keep],
        box_labels=labels[keep],
        box_image_index=new_owner,
    )


def _load_image(root: Path, file_name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    for candidate in (root / file_name, root / "images" / file_name):
        if candidate.is_file():
            try:
                with Image.open(candidate) as im:
                    return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {candidate}: {e}") from None
    raise DataError(f"image {file_name!r} not found under {root} or {root / 'images'}")


def write_coco(split: Split, classes: list[str], out_dir: str | Path) -> Path:
    """Export a detection split as COCO JSON + PNGs (``out_dir/annotations.json``, ``images/``)."""
    from PIL import Image

    if not split.has_boxes:
        raise DataError("write_coco needs a detection split (with boxes)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, img in enumerate(split.x):
        name = f"{i:06d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
    for j, (b, lab, owner) in enumerate(
        zip(split.boxes, split.box_labels, split.box_image_index, strict=True)
    ):
        x1, y1, x2, y2 = (float(v) for v in b)
        anns.append(
            {
                "id": j + 1,
                "image_id": int(owner) + 1,
                "category_id": int(lab) + 1,
                "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
            }
        )
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path
