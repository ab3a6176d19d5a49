"""Detection: multi-scale backbone (msdet_s, scales=4) vs its scales=1 partner at matched parameters.

Same scenes (96 px canvases, 1-5 digits of 6-48 px, so COCO's small (< 32^2 px) and medium sizes
both occur), same budget (epochs, batch, schedule), several seeds; figures are medians over seeds
of the test split's COCO mAP (pycocotools), with means and population stds beside them
(``*_mean``, ``*_std``). Runs ``scalelab.train.loop.fit`` in-process.

    .venv/bin/python benchmarks/detection.py [--seeds 0 1] [--epochs 12] [--scenes 2000] [--gpu]
    # recipe keys on both models (ModelSpec fields; split_dilation only on the multi-scale one):
    nice -n 10 .venv/bin/python benchmarks/detection.py --name detection_keys --seeds 0 1 2 \
        --overrides split_dilation=true fpn_fusion=weighted

Every run is also a line of ``NAME_runs.jsonl``: seeds can run as separate processes side by side
(``--seeds 0``, ``--seeds 1``, ...); each rewrites the summary from all lines of the same setup,
and ``--summarise-only`` rewrites it without training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median, refuse_while_stack_runs  # noqa: E402
from lowres import parse_overrides, write_atomic  # noqa: E402
from scalelab.config import validate_recipe  # noqa: E402
from scalelab.data import read_raw  # noqa: E402
from scalelab.train.loop import fit  # noqa: E402

MODELS = {"multiscale": "msdet_s", "baseline": "det_s_baseline"}
MULTISCALE_ONLY = {"split_dilation"}  # no meaning with scales=1: the partner does not get it
METRICS = {"map50": "map50", "ap_small": "map_small", "map": "map", "ap_medium": "map_medium"}


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


def model_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """ModelSpec fields per benchmark model: ``--overrides`` on both, less the multi-scale-only keys
    on the scales=1 partner (its parameter match is the variant's, checked in the unit tests)."""
    overrides = parse_overrides(args.overrides)
    shared = {k: v for k, v in overrides.items() if k not in MULTISCALE_ONLY}
    return {"multiscale": overrides, "baseline": shared}


def costs(variant: str, model: dict, args: argparse.Namespace) -> dict[str, float]:
    from scalelab.models import count_flops, count_params, create_model

    net = create_model(variant, 1, 10, args.canvas, **model)
    return {"params": count_params(net), "mflops": round(count_flops(net, 1, args.canvas) / 1e6, 2)}


def recipe(variant: str, seed: int, args: argparse.Namespace, model: dict | None = None) -> dict:
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
        "model": {"variant": variant, **(model or {})},
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


def summarise(runs: dict[str, list[dict]], models: dict, cost: dict, args: argparse.Namespace) -> dict:
    figures: dict = {}
    for metric, field in METRICS.items():
        for key in MODELS:
            values = [r[field] or 0.0 for r in runs[key]]
            if not values:
                continue
            figures[f"{metric}_{key}"] = round(median(values), 4)  # the headline keys: medians
            figures[f"{metric}_{key}_mean"] = round(statistics.fmean(values), 4)
            figures[f"{metric}_{key}_std"] = round(statistics.pstdev(values), 4)
    for key in MODELS:
        figures[f"params_{key}"] = cost[key]["params"]
        figures[f"mflops_{key}"] = cost[key]["mflops"]
        figures[f"model_{key}"] = {"variant": MODELS[key], **models[key]}
    figures["setup"] = {
        "scenes": args.scenes,
        "canvas_px": args.canvas,
        "object_px": [6, args.canvas // 2],
        "epochs": args.epochs,
        "batch_size": 32,
        "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
        "threads": args.threads,
        "device": "cuda" if args.gpu else "cpu",
        "overrides": parse_overrides(args.overrides),
        "metric": "test split, COCO mAP (pycocotools); small: area < 32^2 px; medians over seeds "
        "(the plain keys), means and population stds (_mean, _std)",
        "note": "CPU runs on a shared 2-core machine (other agents working): timings are noisy, mAP is not",
        "load_average_at_end": os.getloadavg()[0],
    }
    figures["runs"] = runs
    return figures


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
    ap.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ModelSpec fields for both models (e.g. split_dilation=true fpn_fusion=weighted); the "
        f"scales=1 partner skips {sorted(MULTISCALE_ONLY)}",
    )
    ap.add_argument(
        "--summarise-only",
        action="store_true",
        help="train nothing: rewrite the summary from this setup's lines in NAME_runs.jsonl",
    )
    args = ap.parse_args()

    models = model_overrides(args)
    cost = {key: costs(MODELS[key], models[key], args) for key in MODELS}
    for key in MODELS:
        print(f"{key}: {MODELS[key]} {models[key]} {cost[key]}", flush=True)
    setup = {"scenes": args.scenes, "canvas": args.canvas, "epochs": args.epochs, "gpu": args.gpu}
    setup["overrides"] = parse_overrides(args.overrides)
    log = RESULTS / f"{args.name}_runs.jsonl"

    def logged_runs() -> dict[str, list[dict]]:
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        mine = [r for r in lines if all(r.get(k) == v for k, v in setup.items())]
        by_seed = sorted(mine, key=lambda r: r["seed"])
        return {key: [r for r in by_seed if r["model"] == key] for key in MODELS}

    if args.summarise_only:
        write_atomic(args.name, summarise(logged_runs(), models, cost, args))
        return
    data = read_raw(validate_recipe(recipe(MODELS["multiscale"], 0, args)).data)  # one scene set for all runs
    for seed in args.seeds:
        for key, variant in MODELS.items():  # interleaved: machine load drifts hit both alike
            spec = validate_recipe(recipe(variant, seed, args, models[key]))
            start = time.perf_counter()
            result = fit(spec, data)
            test = result.test
            run = {
                "model": key,
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
            print(run, flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            with log.open("a") as fh:
                fh.write(json.dumps({**setup, **run}) + "\n")
            write_atomic(args.name, summarise(logged_runs(), models, cost, args))


if __name__ == "__main__":
    main()
