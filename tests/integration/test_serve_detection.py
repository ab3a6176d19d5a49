"""Detection models over HTTP: boxes come back in the uploaded image's own pixels, for any size."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from scalelab.cluster.services import free_port
from scalelab.config import ServeSpec

pytestmark = pytest.mark.integration


def png_b64(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_served_detection_boxes_in_original_pixels(workdir, ray_session, scenes_detector):
    from ray import serve

    from scalelab.serve.deploy import build_application
    from scalelab.serve.settings import replica_config

    # the session's short detection run (tests/conftest.py), also checked offline by the unit tests
    out, test = scenes_detector.outcome, scenes_detector.test
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        sspec = ServeSpec(port=port)
        cfg = replica_config(
            sspec, "scenes", None, None, None, bundle_path=str(out.model_dir), include_key=False
        )
        serve.run(
            build_application({"serve": sspec.model_dump(), "user_config": cfg.model_dump()}),
            name="det",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert info["task"] == "detection"
        found = total = 0
        for i in range(6):
            img = test.x[i]
            big = np.kron(img, np.ones((3, 3, 1), np.uint8))  # 192 px: three times the model's 64 px
            r = httpx.post(f"{url}/v1/predict", json={"images": [png_b64(img), png_b64(big)]}, timeout=60)
            assert r.status_code == 200, r.text
            small, large = r.json()["detections"]
            assert large["labels"] == small["labels"]
            assert np.allclose(
                np.array(large["boxes"]).reshape(-1, 4), np.array(small["boxes"]).reshape(-1, 4) * 3, atol=0.2
            )
            assert all(0 <= v <= 192 for b in large["boxes"] for v in b)
            truth = test.boxes[test.box_image_index == i] * 3  # the true boxes in the 192 px image
            confident = [b for b, s in zip(large["boxes"], large["scores"], strict=True) if s > 0.3]
            total += len(truth)
            found += sum(any(iou(t, b) > 0.5 for b in confident) for t in truth)
        assert found / total >= 0.5, (found, total)  # most objects found, at the right place and scale
        # the pipeline's smoke test on the same service: well-formed answers, AP50 near offline
        from scalelab.serve.smoke import check_smoke, smoke_test

        smoke = smoke_test(url, test, {"test_map50": out.metrics["test_map50"]}, max_images=40)
        check_smoke(smoke)
        assert smoke["task"] == "detection" and smoke["errors"] == 0 and smoke["malformed"] == []
        assert smoke["hit_rate"] >= 0.5 and smoke["objects"] > 40
        # multipart upload of a non-square image works too
        wide = np.concatenate([test.x[0], test.x[1]], axis=1)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(wide[..., 0]).save(buf, format="PNG")
        r = httpx.post(
            f"{url}/v1/predict/file", files={"files": ("wide.png", buf.getvalue(), "image/png")}, timeout=60
        )
        assert r.status_code == 200 and all(b[2] <= 128 for b in r.json()["detections"][0]["boxes"])
    finally:
        serve.shutdown()
