"""Images to the exact tensor a model was trained on: one implementation for every caller.

uint8 (N, H, W, C) images become float (N, C, H, W) as ``(x - mean*255) / (std*255)`` per channel,
with the bundle's (or, while training, the dataset's) mean and std: the training loader
(``data/loader.py``), evaluation of a bundle, the promotion gate, Serve and batch prediction all
normalise here. Client input of any size or colour mode is first converted to the model's
``image_size`` x ``image_size`` x ``channels`` (detection: letterboxed). Every failure to decode is a
:class:`BadInput` with an HTTP status and a message — bad input never becomes a server error.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALLOWED_FORMATS = {"PNG", "JPEG", "BMP"}
MAGIC = (b"\x89PNG", b"\xff\xd8", b"BM")


class BadInput(Exception):
    """A client error: ``status`` is the HTTP code (4xx), ``message`` says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, read from the bundle's ``model.json``."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    keep_size: bool = False  # detection: boxes come back in the input's own pixels

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> InputSpec:
        d = meta["dataset"]
        task = ((meta.get("recipe") or {}).get("model") or {}).get("task", "classification")
        return cls(
            int(d["image_size"]),
            int(d["channels"]),
            tuple(d["mean"]),
            tuple(d["std"]),
            tuple(d["classes"]),
            keep_size=task == "detection",
        )


def decode_image_bytes(raw: bytes, spec: InputSpec, max_pixels: int, where: str = "image") -> np.ndarray:
    """PNG/JPEG/BMP bytes -> uint8 (H, W, C) in the model's size and channels."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise BadInput(422, f"{where}: empty file")
    try:
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        if raw.startswith(MAGIC):  # the right signature but no decodable header: cut short
            raise BadInput(422, f"{where}: truncated or corrupt image file") from None
        raise BadInput(415, f"{where}: not a PNG, JPEG or BMP image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the client's file
        raise BadInput(422, f"{where}: unreadable image ({type(exc).__name__})") from None
    if img.format not in ALLOWED_FORMATS:
        raise BadInput(415, f"{where}: format {img.format} is not accepted; send PNG, JPEG or BMP")
    w, h = img.size
    if w < 1 or h < 1:
        raise BadInput(422, f"{where}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:  # checked on the header, before decoding: decompression bombs stop here
        raise BadInput(413, f"{where}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    try:
        img.load()
        return to_model_array(img, spec)
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data
        raise BadInput(422, f"{where}: truncated or corrupt image data ({type(exc).__name__})") from None


def to_model_array(img, spec: InputSpec) -> np.ndarray:
    """A PIL image of any mode and size -> uint8 (S, S, C) as the model was trained on (detection
    keeps the image's own size: the detector letterboxes it and maps boxes back)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # composite on black: the datasets' background (digits, Fashion-MNIST) is dark
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if not spec.keep_size and img.size != (spec.image_size, spec.image_size):
        img = img.resize((spec.image_size, spec.image_size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
    return arr[..., None] if arr.ndim == 2 else arr


def decode_base64(text: str, spec: InputSpec, max_pixels: int, where: str = "image") -> np.ndarray:
    if not isinstance(text, str) or not text.strip():
        raise BadInput(422, f"{where}: empty base64 string")
    if text.startswith("data:"):  # a data URL from a browser: data:image/png;base64,....
        _, _, text = text.partition(",")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(422, f"{where}: invalid base64") from None
    return decode_image_bytes(raw, spec, max_pixels, where)


def _shape_of(value: Any, depth: int = 0) -> list[int]:
    if isinstance(value, list):
        if depth > 3:
            raise BadInput(422, "arrays may have at most 3 dimensions (H, W[, C])")
        if not value:
            raise BadInput(422, "empty array")
        first = _shape_of(value[0], depth + 1)
        for item in value[1:]:
            if _shape_of(item, depth + 1) != first:
                raise BadInput(422, "ragged array: every row must have the same length")
        return [len(value), *first]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(422, f"array values must be numbers, got {type(value).__name__}")
    return []


def decode_array(value: Any, spec: InputSpec, max_pixels: int, where: str = "image") -> np.ndarray:
    """Nested lists (H, W) or (H, W, C) of pixel values in [0, 255] -> uint8 (S, S, C)."""
    from PIL import Image

    if not isinstance(value, list):
        raise BadInput(422, f"{where}: expected a nested list of numbers")
    count = _count_leaves(value, max_pixels * 4)
    if count > max_pixels * 4:
        raise BadInput(413, f"{where}: array has more than {max_pixels * 4:,} values")
    try:
        shape = _shape_of(value)
    except BadInput as exc:
        raise BadInput(exc.status, f"{where}: {exc.message}") from None
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise BadInput(422, f"{where}: array shape {shape} is not (H, W) or (H, W, C) with C in 1, 3, 4")
    if shape[0] * shape[1] > max_pixels:
        raise BadInput(413, f"{where}: {shape[0]}x{shape[1]} pixels exceeds the limit of {max_pixels:,}")
    arr = np.asarray(value, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise BadInput(422, f"{where}: array holds NaN or infinite values")
    if arr.min() < 0 or arr.max() > 255:
        raise BadInput(422, f"{where}: pixel values must be in [0, 255], got [{arr.min():g}, {arr.max():g}]")
    arr = np.rint(arr).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    mode = {2: "L"}.get(arr.ndim) or ("RGB" if arr.shape[2] == 3 else "RGBA")
    return to_model_array(Image.fromarray(arr, mode=mode), spec)


def _count_leaves(value: Any, cap: int) -> int:
    """Count scalars without recursing forever; stops once past ``cap``."""
    count, stack = 0, [value]
    while stack and count <= cap:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def pixel_scale(
    mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of [0, 1] pixels, scaled to uint8 units: two (1, C, 1, 1) tensors."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    return m, s


def normalise_tensor(x: torch.Tensor, mean_px: torch.Tensor, std_px: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [0, 255] -> normalised, with ``pixel_scale``'s tensors."""
    return (x - mean_px) / std_px


def normalise_images(batch: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
    return normalise_tensor(x, *pixel_scale(mean, std))


def normalise(batch: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) with the bundle's statistics."""
    return normalise_images(batch, spec.mean, spec.std)


# ------------------------------------------------------------------ detection: any size in


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Scale the longer side to ``size`` (aspect kept), pad right/bottom with 0. Returns (image, scale)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    if (nh, nw) != (h, w):  # area-average when shrinking (no aliasing), bilinear when enlarging
        pil = pil.resize((nw, nh), Image.BOX if scale < 1 else Image.BILINEAR)
    arr = np.asarray(pil)
    arr = arr[..., None] if arr.ndim == 2 else arr
    out = np.zeros((size, size, arr.shape[-1]), dtype=np.uint8)
    out[:nh, :nw] = arr
    return out, scale


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W, channels): grey <-> RGB, alpha dropped."""
    img = image[..., None] if image.ndim == 2 else image
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.shape[-1] == channels:
        return img
    if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
        grey = img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return grey.round().clip(0, 255).astype(np.uint8)[..., None]
    return np.repeat(img[..., :1], channels, axis=-1)
