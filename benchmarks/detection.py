"""Detection: multi-scale backbone (msdet_s, scales=4) vs its scales=1 partner at matched parameters.

Same scenes (96 px canvases, 1-5 digits of 6-48 px, so COCO's small (< 32^2 px) and medium sizes
both occur), same budget (epochs, batch, schedule), several seeds; figures are medians over seeds
of the test split's COCO mAP (pycocotools). Runs ``scalelab.train.loop.fit`` in-process.

    .venv/bin/python benchmarks/detection.py [--seeds 0 1] [--epochs 12] [--scenes 2000] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, refuse_while_stack_runs, write_results  # noqa: E402
from scalelab.config import validate_recipe  # noqa: E402
from scalelab.data import read_raw  # noqa: E402
from scalelab.train.loop import fit  # noqa: E402

MODELS = {"multiscale": "msdet_s", "baseline": "det_s_baseline"}


def torchmetrics_map(result, data) -> dict[str, float]:
    """The same test predictions scored by torchmetrics' MeanAveragePrecision (needs torchvision,
    so only where it is installed, e.g. the GPU machine): a cross-check of the pycocotools path."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    from scalelab.train.detection import DetectionLoader

    split = data.splits["test"]
    loader = DetectionLoader(split, 256, data.mean, data.std, device=result.runtime.device)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    result.model.eval()
    for x, targets in loader:
        with torch.no_grad(), result.runtime.autocast():
            preds = result.model.predict(x)
        metric.update(
            [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in p.items()} for p in preds],
            [
                {"boxes": b.cpu(), "labels": lab.cpu()}
                for b, lab in zip(targets.boxes, targets.labels, strict=True)
            ],
        )
    out = metric.compute()
    return {"map50_torchmetrics": float(out["map_50"]), "map_small_torchmetrics": float(out["map_small"])}


def recipe(variant: str, seed: int, args: argparse.Namespace) -> dict:
    return {
        "name": "scenes-bench",
        "data": {
            "name": "scenes-bench",
            "kind": "scenes",
            "image_size": args.canvas,
            "scenes": {
                "num_scenes": args.scenes,
                "objects_per_scene": [1, 5],
                "object_size": [6, args.canvas // 2],
            },
        },
        "model": {"variant": variant},
        "train": {
            "epochs": args.epochs,
            "batch_size": 32,
            "optimizer": "adamw",
            "lr": 0.003,
            "weight_decay": 1e-4,
            "schedule": "onecycle",
            "seed": seed,
            "threads": args.threads,
            "use_gpu": args.gpu,
        },
        "tracking": {"enabled": False},
    }


def main() -> None:
    refuse_while_stack_runs()
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--canvas", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids thread thrash on a shared machine")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--crosscheck", action="store_true", help="also score with torchmetrics (needs torchvision)"
    )
    ap.add_argument("--name", default="detection", help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()

    runs: dict[str, list[dict]] = {k: [] for k in MODELS}
    data = read_raw(validate_recipe(recipe(MODELS["multiscale"], 0, args)).data)  # one scene set for all runs
    for seed in args.seeds:
        for key, variant in MODELS.items():  # interleaved: machine load drifts hit both alike
            spec = validate_recipe(recipe(variant, seed, args))
            start = time.perf_counter()
            result = fit(spec, data)
            test = result.test
            run = {
                "seed": seed,
                "variant": variant,
                "params": result.params,
                "map50": test.map50,
                "map": test.map,
                "map_small": test.map_small,
                "map_medium": test.map_medium,
                "seconds": round(time.perf_counter() - start, 1),
                "precision": result.runtime.precision,
            }
            if args.crosscheck:
                run.update(torchmetrics_map(result, data))
            runs[key].append(run)
            print(run, flush=True)
    figures: dict = {}
    for key in MODELS:
        figures[f"map50_{key}"] = round(median([r["map50"] for r in runs[key]]), 4)
    for key in MODELS:
        figures[f"ap_small_{key}"] = round(median([r["map_small"] for r in runs[key]]), 4)
    for key in MODELS:
        figures[f"params_{key}"] = runs[key][0]["params"]
    for key in MODELS:
        figures[f"map_{key}"] = round(median([r["map"] for r in runs[key]]), 4)
        figures[f"ap_medium_{key}"] = round(median([r["map_medium"] or 0.0 for r in runs[key]]), 4)
    figures["setup"] = {
        "scenes": args.scenes,
        "canvas_px": args.canvas,
        "object_px": [6, args.canvas // 2],
        "epochs": args.epochs,
        "batch_size": 32,
        "seeds": args.seeds,
        "threads": args.threads,
        "device": "cuda" if args.gpu else "cpu",
        "metric": "test split, COCO mAP (pycocotools); small: area < 32^2 px; medians over seeds",
        "note": "CPU runs on a shared 2-core machine (other agents working): timings are noisy, mAP is not",
        "load_average_at_end": os.getloadavg()[0],
    }
    figures["runs"] = runs
    write_results(args.name, figures)


if __name__ == "__main__":
    main()
