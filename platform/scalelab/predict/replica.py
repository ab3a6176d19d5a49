"""One model replica of the Ray Data actor pool: reads, decodes and scores one batch at a time.

The driver fetched (and checksum-verified) the bundle once and put its files in Ray's object
store; every actor reads them from there, so replicas on other nodes never talk to MLflow. Images are decoded
by ``artifacts.preprocess.decode_image_bytes``, exactly as a Serve replica decodes a request, and
scored by ``Predictor.predict_proba`` in the bundle's precision. A file that cannot be read or
decoded becomes a row with ``error`` set, never an exception: one bad image must not stop a run
of a million (the driver decides whether that is fatal: ``--on-bad-file``).
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from scalelab.artifacts.predictor import Predictor
from scalelab.artifacts.preprocess import BadInput, decode_image_bytes, to_model_array
from scalelab.predict.sources import S3Location

PASSTHROUGH = ("file", "index", "label")  # input columns copied to the output unchanged


class PredictReplica:
    """``map_batches`` callable class: batch {file|index, label, location|image} -> predictions."""

    def __init__(
        self,
        bundle_files: dict[str, bytes] | ray.ObjectRef,
        info: dict[str, Any],
        top_k: int,
        threads: int,
        max_pixels: int,
        s3: S3Location | None = None,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        if isinstance(bundle_files, ray.ObjectRef):  # put once by the driver, shared by every replica
            bundle_files = ray.get(bundle_files)
        with tempfile.TemporaryDirectory(prefix="scalelab-predict-") as tmp:
            for name, data in bundle_files.items():
                (Path(tmp) / name).write_bytes(data)
            self.predictor = Predictor.from_bundle(tmp, info)  # sha256 checked again; weights now in memory
        self.top_k = min(top_k, len(self.predictor.classes))
        self.max_pixels = max_pixels
        self.s3 = s3.client() if s3 else None
        self.bucket = s3.bucket if s3 else None
        self.pool = ThreadPoolExecutor(16) if s3 else None  # S3 GETs are latency-bound: overlap them

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["label"])
        errors = [""] * n
        if "image" in batch:  # a dataset split: uint8 (B, H, W, C) already
            images = self._conform(batch["image"])
        else:
            images = [None] * n
            for i, (raw, name) in enumerate(zip(self._read(batch["location"]), batch["file"], strict=True)):
                try:
                    if isinstance(raw, Exception):
                        raise raw
                    images[i] = decode_image_bytes(
                        raw, self.predictor.input, self.max_pixels, where=str(name)
                    )
                except BadInput as exc:
                    errors[i] = exc.message
                except Exception as exc:  # noqa: BLE001 - a vanished file, an S3 error: this row only
                    errors[i] = f"{name}: cannot read the file ({type(exc).__name__}: {exc})"
        good = [i for i in range(n) if not errors[i]]
        top_index = np.full((n, self.top_k), -1, dtype=np.int64)
        top_score = np.full((n, self.top_k), np.nan, dtype=np.float32)
        if good:
            probs = self.predictor.predict_proba(np.stack([images[i] for i in good]))  # (G, K)
            # stable: on a tie the lower class index wins, as argmax does in evaluation
            order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
            top_index[good] = order
            top_score[good] = np.take_along_axis(probs, order, axis=1)
        out = {key: batch[key] for key in PASSTHROUGH if key in batch}
        return {
            **out,
            "top_index": top_index,
            "top_score": top_score,
            "error": np.array(errors, dtype=object),
        }

    def _conform(self, images: np.ndarray) -> list[np.ndarray] | np.ndarray:
        """Dataset images of another size or channel count go through the server's conversion."""
        spec = self.predictor.input
        if images.shape[1:] == (spec.image_size, spec.image_size, spec.channels):
            return images
        from PIL import Image

        return [
            to_model_array(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), spec)
            for img in images
        ]

    def _read(self, locations: np.ndarray) -> list[bytes | Exception]:
        def one(location: str) -> bytes | Exception:
            try:
                if self.s3 is not None:
                    return self.s3.get_object(Bucket=self.bucket, Key=location)["Body"].read()
                return Path(location).read_bytes()
            except Exception as exc:  # noqa: BLE001 - reported per row by the caller
                return exc

        names = [str(loc) for loc in locations]
        return list(self.pool.map(one, names)) if self.pool else [one(loc) for loc in names]
