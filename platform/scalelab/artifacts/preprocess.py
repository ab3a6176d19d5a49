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

# MPO is the multi-picture JPEG phones write (a JPEG plus previews/depth maps): its first frame is a JPEG
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "WEBP"}
ACCEPTED = "PNG, JPEG, BMP or WebP"
MAGIC = (b"\x89PNG", b"\xff\xd8", b"BM", b"RIFF")
NPY_MAGIC = b"\x93NUMPY"


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

    @property
    def background(self) -> tuple[int, ...]:
        """The colour transparent pixels become: the ground of the training images.

        Single-channel datasets here are line art on a plain ground (digits, Fashion-MNIST: bright
        strokes on black, mean ~0.3): black when the mean is below one half, else white. Colour
        datasets are photos with no common ground: their mean colour, which normalises to zero.
        """
        if self.channels == 1:
            return (0,) if sum(self.mean) / len(self.mean) < 0.5 else (255,)
        return tuple(int(round(m * 255)) for m in self.mean)


def open_image(raw: bytes, max_pixels: int, where: str = "image"):
    """Image bytes -> a decoded PIL image, upright (EXIF orientation applied), first frame of a
    multi-picture file. The pixel count is checked on the header, before any decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not raw:
        raise BadInput(422, f"{where}: empty file; send the bytes of a {ACCEPTED} image")
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:  # PIL's own ceiling; ours is lower and says the size
        img = None
        size = _declared_size(raw)
        if size is None:
            raise BadInput(413, f"{where}: image exceeds the limit of {max_pixels:,} pixels") from None
        _check_pixels(size, max_pixels, where)
    except UnidentifiedImageError:
        if raw.startswith(MAGIC):  # the right signature but no decodable header: cut short
            raise BadInput(422, f"{where}: truncated or corrupt image file; send the whole file") from None
        raise BadInput(415, f"{where}: not a {ACCEPTED} image (unrecognised file signature)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the client's file
        raise BadInput(422, f"{where}: unreadable image header ({type(exc).__name__}: {exc})") from None
    if img.format not in ALLOWED_FORMATS:
        raise BadInput(415, f"{where}: format {img.format} is not accepted; send {ACCEPTED}")
    _check_pixels(img.size, max_pixels, where)
    try:
        img.load()  # the first frame (MPO: the main JPEG picture)
        return ImageOps.exif_transpose(img)  # phones store sideways pixels plus an orientation tag
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data
        raise BadInput(
            422, f"{where}: truncated or corrupt image data ({type(exc).__name__}); send the whole file"
        ) from None


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise BadInput(422, f"{where}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:  # decompression bombs stop here, before decoding
        raise BadInput(
            413,
            f"{where}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}; "
            "send a smaller image (the model sees it scaled down anyway)",
        )


def _declared_size(raw: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, bypassing PIL's decompression-bomb refusal (which
    ``Image.open`` raises before the size can be read)."""
    from PIL import Image

    Image.init()
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(raw[:16])):
            continue
        try:
            return tuple(factory(io.BytesIO(raw), None).size)
        except Exception:  # noqa: BLE001 - not this format
            continue
    return None


def decode_image_bytes(raw: bytes, spec: InputSpec, max_pixels: int, where: str = "image") -> np.ndarray:
    """PNG/JPEG/MPO/BMP/WebP bytes -> uint8 (H, W, C) in the model's size and channels."""
    img = open_image(raw, max_pixels, where)
    try:
        return to_model_array(img, spec)
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - odd modes / corrupt data
        raise BadInput(422, f"{where}: could not convert the image ({type(exc).__name__}: {exc})") from None


def to_model_array(img, spec: InputSpec) -> np.ndarray:
    """A PIL image of any mode and size -> uint8 (S, S, C) as the model was trained on (detection
    keeps the image's own size: the detector letterboxes it and maps boxes back)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = Image.fromarray(composite(np.asarray(img.convert("RGBA")), spec), mode="RGB")
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if not spec.keep_size and img.size != (spec.image_size, spec.image_size):
        img = img.resize((spec.image_size, spec.image_size), Image.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
    return arr[..., None] if arr.ndim == 2 else arr


def composite(rgba: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (H, W, 4) -> (H, W, 3): transparent pixels take the training images' ground.

    On single-channel (line-art) datasets the visible pixels are the strokes; strokes of the ground's
    own polarity (dark ink on a transparent sheet, for bright-on-black digits) would vanish into it,
    so they are inverted first: dark strokes on transparency classify like the dataset's bright ones.
    """
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0  # (H, W, 1)
    ground = np.array(spec.background * (3 if len(spec.background) == 1 else 1), dtype=np.float32)
    if spec.channels == 1 and alpha.min() < 1.0 and alpha.sum() > 0:
        luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
        ink = float((luma * alpha[..., 0]).sum() / alpha.sum())  # alpha-weighted stroke brightness
        if abs(ink - float(ground.mean())) < 128:  # same side of grey as the ground: invisible
            rgb = 255.0 - rgb
    out = rgb * alpha + ground * (1.0 - alpha)
    return np.rint(out).clip(0, 255).astype(np.uint8)


def decode_base64(text: str, spec: InputSpec, max_pixels: int, where: str = "image") -> np.ndarray:
    if not isinstance(text, str) or not text.strip():
        raise BadInput(422, f"{where}: empty base64 string")
    if text.startswith("data:"):  # a data URL from a browser: data:image/png;base64,....
        _, _, text = text.partition(",")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        reason = str(exc).rstrip(".") or type(exc).__name__
        raise BadInput(
            422,
            f"{where}: invalid base64 ({reason}); send the image file's bytes base64-encoded "
            "(standard alphabet A-Z a-z 0-9 + /, '=' padding, no line breaks) or a data: URL",
        ) from None
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
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (OverflowError, ValueError):  # an integer past float range: 10**400
        raise BadInput(
            422, f"{where}: pixel values must be numbers in [0, 255]; got one out of range"
        ) from None
    if not np.isfinite(arr).all():
        raise BadInput(422, f"{where}: array holds NaN or infinite values")
    if arr.min() < 0 or arr.max() > 255:
        raise BadInput(422, f"{where}: pixel values must be in [0, 255], got [{arr.min():g}, {arr.max():g}]")
    arr = np.rint(arr).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    mode = {2: "L"}.get(arr.ndim) or ("RGB" if arr.shape[2] == 3 else "RGBA")
    return to_model_array(Image.fromarray(arr, mode=mode), spec)


NPY_HINT = "send numpy.save() output of a uint8 array shaped (N, H, W) or (N, H, W, C)"


def decode_npy(raw: bytes, spec: InputSpec, max_images: int, max_pixels: int) -> np.ndarray:
    """A ``.npy`` file (``numpy.save`` of a uint8 batch) -> uint8 (N, S, S, C), validated on its header
    before any pixel is read: dtype uint8, (N, H, W) or (N, H, W, C), the model's size and channels
    (detection models take any size within ``max_pixels``), 1 <= N <= ``max_images``. Never unpickles."""
    fmt = np.lib.format
    if not raw.startswith(NPY_MAGIC):
        raise BadInput(422, f"body is not a .npy file (it must start with b'\\x93NUMPY'); {NPY_HINT}")
    fp = io.BytesIO(raw)
    try:
        version = fmt.read_magic(fp)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fp)
    except Exception as exc:  # noqa: BLE001 - a malformed header is the client's file
        raise BadInput(422, f"unreadable .npy header ({exc}); {NPY_HINT}") from None
    if dtype != np.uint8:
        raise BadInput(
            422, f".npy array has dtype {dtype}; {NPY_HINT} (pixel values 0-255, e.g. x.astype(np.uint8))"
        )
    if len(shape) not in (3, 4):
        raise BadInput(422, f".npy array has shape {shape}; {NPY_HINT}")
    n, h, w = shape[:3]
    c = shape[3] if len(shape) == 4 else 1
    if n < 1:
        raise BadInput(422, ".npy array holds no images (N = 0); send at least one")
    if n > max_images:
        raise BadInput(413, f".npy array holds {n} images, over the limit of {max_images} per request")
    if c != spec.channels:
        raise BadInput(
            422,
            f".npy images have {c} channel(s) but the model takes {spec.channels}: send (N, H, W, "
            f"{spec.channels})" + (" or (N, H, W)" if spec.channels == 1 else ""),
        )
    if spec.keep_size:
        if h < 1 or w < 1 or h * w > max_pixels:
            raise BadInput(
                413 if h * w > max_pixels else 422,
                f".npy images of {h}x{w} pixels: send 1 to {max_pixels:,} pixels per image",
            )
    elif (h, w) != (spec.image_size, spec.image_size):
        raise BadInput(
            422,
            f".npy images are {h}x{w} but the model takes {spec.image_size}x{spec.image_size}: "
            "resize them first, or send image files (those are resized for you)",
        )
    count = n * h * w * c
    data = memoryview(raw)[fp.tell() :]
    if len(data) != count:
        raise BadInput(
            422,
            f".npy data is {len(data):,} bytes but its header's shape {shape} needs {count:,}; "
            "send the whole file",
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F" if fortran_order else "C")
    arr = np.array(arr, order="C")  # a writable C-order copy: torch.from_numpy needs one
    return arr[..., None] if arr.ndim == 3 else arr  # (N, H, W, C)


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
