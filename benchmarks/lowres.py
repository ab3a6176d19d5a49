"""Low-resolution robustness: multi-scale vs scales=1 at matched parameters (and matched FLOPs).

    nice -n 10 .venv/bin/python benchmarks/lowres.py [--train-subset N] [--epochs E] [--seeds 0 1 2] \
        [--batch-size B --lr LR] [--multiscale-overrides split_dilation=true head=weighted]
    # writes benchmarks/results/lowres.json (rewritten after every training, so a cut run keeps
    # what it finished; every training is also a line of lowres_runs.jsonl, so seeds can run as
    # separate processes side by side: each rewrites the summary from all lines of the same setup)

Fashion-MNIST from /usr/share/datasets/fashion-mnist (`make system-deps`), the official 10k test
set. Every model trains with the same recipe (``pipelines/fashion-mnist.yaml``: SGD one-cycle,
label smoothing, crop-pad 2 + hflip + erasing 0.1) on the same seeded subset of the training split
for the same epochs, on one thread, side by side in one run:

- ``multiscale``: ``msresnet_tiny`` (Res2Net scales=4, mean-logit head), plus any
  ``--multiscale-overrides`` (ModelSpec fields, e.g. ``split_dilation=true head=weighted``);
- ``baseline``: the same model with scales=1 (and the same overrides, except those that exist only
  for scales > 1: ``split_dilation``), stage widths matched to the multi-scale model's parameter
  count (``scalelab.tune.match``, the search's ``search.match: params``);
- ``baseline_flops``: scales=1 matched to its forward FLOPs instead.

Every run records its wall seconds (``wall_s``): on a shared machine those say what the run cost
then, not how fast the model is.

Each trains twice: at native resolution, and with mixed-resolution training
(``data.augment.rescale: [0.5, 1.0]``, the ``_mixedtrain`` keys). Each is tested at scales
0.5, 0.75, 1.0 (downsampled by s, area averaging, and resized back to 28 px, bilinear) and 1.25
(enlarged 1.25x and centre-cropped to 28 px: objects 25% larger), see
:mod:`scalelab.data.resolution`. Figures are means and (population) stds over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, machine  # noqa: E402

RECIPE = REPO / "pipelines" / "fashion-mnist.yaml"
TEST_SCALES = (0.5, 0.75, 1.0, 1.25)
MIXED = (0.5, 1.0)
MULTISCALE = "msresnet_tiny"


MULTISCALE_ONLY = {"split_dilation"}  # keys that change nothing with scales=1


def parse_overrides(items: list[str]) -> dict:
    """``["split_dilation=true", "head=weighted"]`` -> ModelSpec fields (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--multiscale-overrides takes KEY=VALUE items, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def model_specs(match_flops: bool, overrides: dict | None = None) -> dict[str, dict]:
    """Model overrides per benchmark model: the multi-scale variant and its matched scales=1 partners."""
    from scalelab.config.specs import ModelSpec
    from scalelab.tune.match import cost_function, match_widths

    overrides = dict(overrides or {})
    shared = {k: v for k, v in overrides.items() if k not in MULTISCALE_ONLY}
    base = ModelSpec(variant=MULTISCALE, **overrides)
    plain = ModelSpec(variant=MULTISCALE, **shared, scales=1)
    models = {"multiscale": {"variant": MULTISCALE, **overrides}}
    kinds = ["params", "flops"] if match_flops else ["params"]
    for kind in kinds:
        cost = cost_function(kind, 1, 10, 28)
        matched = match_widths(plain, cost(base), cost)
        name = "baseline" if kind == "params" else "baseline_flops"
        models[name] = {"variant": MULTISCALE, **shared, "scales": 1, "widths": matched.widths}
    return models


def load_data(train_subset: int, test_subset: int, data_dir: Path):
    import numpy as np

    from scalelab.config import load_recipe
    from scalelab.data.catalog import load_dataset
    from scalelab.data.dataset import Split

    spec = load_recipe(RECIPE, [f"data.data_dir={data_dir}"])
    data = load_dataset(spec.data)
    train = data.splits["train"]
    keep = np.sort(np.random.default_rng(0).permutation(len(train.y))[:train_subset])
    data.splits["train"] = Split(train.x[keep], train.y[keep])
    val = data.splits["val"]  # only reported per epoch: 2k of it is plenty
    data.splits["val"] = Split(val.x[:2000], val.y[:2000])
    test = data.splits["test"]  # the official test set, or its first test_subset images
    data.splits["test"] = Split(test.x[:test_subset], test.y[:test_subset])
    return data


def train_one(model: dict, seed: int, epochs: int, mixed: bool, data, workdir: Path, train: dict):
    from scalelab.config import load_recipe
    from scalelab.train.loop import fit

    overrides = {
        "model": model,
        "tracking.enabled": False,
        "train.epochs": epochs,
        "train.seed": seed,
        "train.threads": 1,
        "train.workers": 0,
        "train.output_dir": str(workdir / "outputs"),
        "train.storage_path": str(workdir / "runs"),
        **{f"train.{k}": v for k, v in train.items() if v is not None},
    }
    if mixed:
        overrides["data.augment.rescale"] = list(MIXED)
    spec = load_recipe(RECIPE, overrides)
    return fit(spec, data).model


def accuracy_at_scales(model, data) -> dict[float, float]:
    import torch

    from scalelab.artifacts.preprocess import normalise_tensor, pixel_scale
    from scalelab.data.resolution import rescale_images

    test = data.splits["test"]
    x = torch.from_numpy(test.x.transpose(0, 3, 1, 2).copy()).float()  # (N, C, H, W), 0..255
    y = torch.from_numpy(test.y)
    mean, std = pixel_scale(data.mean, data.std)
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    out = {}
    with torch.no_grad():
        for s in TEST_SCALES:
            correct = 0
            for i in range(0, len(y), 1000):
                xb = normalise_tensor(rescale_images(x[i : i + 1000], s), mean, std)
                correct += int((model(xb).argmax(1) == y[i : i + 1000]).sum())
            out[s] = correct / len(y)
    return out


def summarise(runs: list[dict], models: dict, costs: dict, args, started: float | None) -> dict:
    figures: dict = {
        "dataset": "fashion-mnist (official test set)",
        "train_subset": args.train_subset,
        "test_images": args.test_subset,
        "epochs": args.epochs,
        "seeds": sorted({r["seed"] for r in runs}),
        "test_scales": list(TEST_SCALES),
        "mixedtrain_rescale": list(MIXED),
        "test_rescale": "s<1: area-downsample by s, bilinear back to 28 px; s>1: bilinear up, centre crop",
        "recipe": "pipelines/fashion-mnist.yaml (threads 1, in-process)",
        "batch_size": args.batch_size,
        "lr": args.lr,
        "multiscale_overrides": parse_overrides(args.multiscale_overrides),
    }
    for name, model in models.items():
        figures[f"params_{name}"] = costs[name]["params"]
        figures[f"mflops_{name}"] = round(costs[name]["flops"] / 1e6, 3)
        figures[f"model_{name}"] = model
        for mixed in (False, True):
            tag = "_mixedtrain" if mixed else ""
            mine = [r for r in runs if r["model"] == name and r["mixed"] == mixed]
            for s in TEST_SCALES:
                accs = [r["acc"][str(s)] for r in mine]
                if not accs:
                    continue
                key = f"acc_{name}_s{s}{tag}"
                figures[key] = round(statistics.fmean(accs), 4)
                figures[key + "_std"] = round(statistics.pstdev(accs), 4)
                figures[key + "_per_seed"] = accs
            walls = [r["wall_s"] for r in mine if "wall_s" in r]
            if walls:
                figures[f"wall_s_{name}{tag}_per_seed"] = walls
    for tag in ("", "_mixedtrain"):
        ms, base = figures.get(f"acc_multiscale_s0.5{tag}"), figures.get(f"acc_baseline_s0.5{tag}")
        if ms is not None and base is not None:
            std = max(figures[f"acc_multiscale_s0.5{tag}_std"], figures[f"acc_baseline_s0.5{tag}_std"])
            n = min(len(figures[f"acc_{m}_s0.5{tag}_per_seed"]) for m in ("multiscale", "baseline"))
            # one seed has no std to beat: no verdict
            figures[f"multiscale_beats_baseline_s0.5{tag}"] = bool(ms - base > std) if n > 1 else None
    figures["runs_done"] = len(runs)
    if started is not None:  # a rewrite from the log (--summarise-only) has no run of its own
        figures["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    figures["note"] = (
        "2-core machine shared with other jobs while measured: accuracies are valid, the wall times "
        "(wall_s_*, wall_minutes) only say what the runs cost then, not how fast the models are"
    )
    if args.note:
        figures["budget_note"] = args.note
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subset", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--test-subset", type=int, default=10000, help="first N official test images")
    parser.add_argument("--data-dir", type=Path, default=None, help="prepared data (default: a temp dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-flops-partner", action="store_true", help="skip the matched-FLOPs baseline")
    parser.add_argument("--name", default="lowres", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="train.batch_size (default: the recipe's)"
    )
    parser.add_argument("--lr", type=float, default=None, help="train.lr (default: the recipe's)")
    parser.add_argument(
        "--multiscale-overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ModelSpec fields for the multi-scale model; its partners get the same, except "
        f"{sorted(MULTISCALE_ONLY)} (no meaning at scales=1), then are width-matched",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="train.precision (default: the recipe's auto: bf16 on a CPU with native bf16, fp32 elsewhere); "
        "recorded in each run line",
    )
    parser.add_argument("--note", default=None, help="a note on the budget, kept in the summary")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="train nothing: rewrite the summary from this setup's lines in NAME_runs.jsonl",
    )
    parser.add_argument(
        "--training",
        choices=["both", "native", "mixed"],
        default="both",
        help="native, mixed-resolution, or both trainings (lanes of one setup can split them)",
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="train only these (multiscale, baseline, baseline_flops)"
    )
    args = parser.parse_args()

    from scalelab.models.factory import count_flops, count_params, create_model

    started = time.perf_counter()
    models = model_specs(not args.no_flops_partner, parse_overrides(args.multiscale_overrides))
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models}
    costs = {}
    for name, model in models.items():
        net = create_model(model["variant"], 1, 10, 28, **{k: v for k, v in model.items() if k != "variant"})
        costs[name] = {"params": count_params(net), "flops": count_flops(net, 1, 28)}
        print(
            f"{name}: {model} {costs[name]['params']:,} params {costs[name]['flops'] / 1e6:.2f} MFLOPs",
            flush=True,
        )
    setup = {
        "train_subset": args.train_subset,
        "epochs": args.epochs,
        "test_subset": args.test_subset,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "multiscale_overrides": parse_overrides(args.multiscale_overrides),
    }
    train = {"batch_size": args.batch_size, "lr": args.lr, "precision": args.precision}
    if args.precision:
        setup["precision"] = args.precision
    log = RESULTS / f"{args.name}_runs.jsonl"
    if args.summarise_only:
        runs = [r for r in map(json.loads, log.read_text().splitlines()) if _same(r, setup)]
        write_atomic(args.name, summarise(runs, models, costs, args, None))
        return
    with tempfile.TemporaryDirectory(prefix="lowres-") as tmp:
        data = load_data(args.train_subset, args.test_subset, args.data_dir or Path(tmp) / "data")
        # seeds outermost: a run cut short still has every model at the same seeds
        for seed in args.seeds:
            for mixed in {"both": (False, True), "native": (False,), "mixed": (True,)}[args.training]:
                for name, model in models.items():
                    t0 = time.perf_counter()
                    net = train_one(model, seed, args.epochs, mixed, data, Path(tmp), train)
                    acc = accuracy_at_scales(net, data)
                    wall = round(time.perf_counter() - t0, 1)
                    run = {
                        "model": name,
                        "mixed": mixed,
                        "seed": seed,
                        "acc": {str(k): v for k, v in acc.items()},
                        "wall_s": wall,
                    }
                    print(
                        f"seed {seed} {name:<15} {'mixed ' if mixed else 'native'} "
                        + " ".join(f"s{s}={a:.4f}" for s, a in acc.items())
                        + f" ({wall:.0f}s)",
                        flush=True,
                    )
                    with log.open("a") as fh:
                        fh.write(json.dumps({**setup, **run}) + "\n")
                    runs = [r for r in map(json.loads, log.read_text().splitlines()) if _same(r, setup)]
                    write_atomic(args.name, summarise(runs, models, costs, args, started))


def _same(run: dict, setup: dict) -> bool:
    # lines written before --precision existed carry no precision: they ran at the recipe's 'auto'
    # (fp32 on the AVX2-only host of session 25), so they match whatever precision is asked
    return all(run.get(k) == v for k, v in setup.items() if not (k == "precision" and k not in run))


def write_atomic(name: str, figures: dict) -> None:
    """common.write_results, through a temporary file: seeds in parallel processes rewrite it."""
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**figures, **machine()}, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
