"""What a finished (or interrupted) search leaves behind: results table, best recipe, plots, summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from scalelab.config.specs import ParamSpace, RecipeSpec

STATUS_ORDER = {"completed": 0, "stopped": 1, "running": 2, "error": 3, "pruned": 4}


TIE_BREAK = "val_loss"
SHOWN_METRICS = ("val_acc", "val_loss")  # kept in every row (and results.csv) beside the search metric


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """By the metric (best first), rows without a value last.

    Ties on the metric are common with a small validation split (digits: 179 images, so trials tie
    at 1.0 or 0.9944): among them the lower ``val_loss`` ranks first (the more confident fit of the
    same split), then completed before stopped, then the trial id (stable).
    """

    def key(row: dict[str, Any]) -> tuple:
        value = _number(row.get(metric))
        score = 0.0 if value is None else (-value if mode == "max" else value)
        tie = _number(row.get(TIE_BREAK)) if metric != TIE_BREAK else None
        return (
            value is None,
            score,
            tie is None,
            tie or 0.0,
            STATUS_ORDER.get(row["status"], 9),
            row["trial_id"],
        )

    return sorted(rows, key=key)


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """Best trial trained to the full budget; if none finished, the best of those that ran."""
    ranked = [r for r in sort_rows(rows, metric, mode) if isinstance(r.get(metric), (int, float))]
    completed = [r for r in ranked if r["status"] == "completed"]
    return (completed or [r for r in ranked if r["status"] != "pruned"] or [None])[0]


def write_results_csv(rows: list[dict[str, Any]], space_keys: list[str], path: Path, metric: str) -> Path:
    head = [
        "rank",
        "trial_id",
        "status",
        metric,
        "epochs",
        "params",
        "flops",
        "startup_s",
        *space_keys,
        "reason",
    ]
    extra = sorted({k for r in rows for k in r} - set(head) - {"config", "checkpoint"})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=head + extra, extrasaction="ignore")
        writer.writeheader()
        for rank, row in enumerate(rows, 1):
            flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
            writer.writerow({"rank": rank, **flat})
    return path


def best_recipe(spec: RecipeSpec, values: dict[str, Any], note: str) -> RecipeSpec:
    """The searched recipe with the best values applied: same data, full training budget, no space."""
    from scalelab.config.loader import validate_recipe
    from scalelab.tune.space import apply_config

    tree = apply_config(spec.model_dump(mode="json"), values)
    tree["search"]["space"] = {}  # `scalelab train best.yaml` ignores search; `tune` would ask for a space
    tree["train"]["run_name"] = None
    tree["description"] = (f"{spec.description} " if spec.description else "") + note
    return validate_recipe(tree, "best.yaml")


def plot_search(
    rows: list[dict[str, Any]], space: dict[str, ParamSpace], metric: str, out_dir: Path
) -> list[Path]:
    """Accuracy vs parameters coloured by scales, and a parallel-coordinates view of the search."""
    import matplotlib

    matplotlib.use("Agg")
    ran = [r for r in rows if isinstance(r.get(metric), (int, float)) and r.get("params")]
    if not ran:
        return []
    # the accuracy plot shows accuracy even where the search ranks on something else (val_loss)
    shown = "val_acc" if all(isinstance(r.get("val_acc"), (int, float)) for r in ran) else metric
    return [
        _plot_accuracy_vs_params(ran, shown, out_dir / "accuracy_vs_params.png"),
        _plot_parallel_coordinates(ran, space, metric, out_dir / "parallel_coordinates.png"),
    ]


def _plot_accuracy_vs_params(ran: list[dict[str, Any]], metric: str, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    scales = sorted({r.get("model.scales", r.get("scales")) for r in ran}, key=str)
    cmap = plt.get_cmap("viridis", max(2, len(scales)))
    for i, s in enumerate(scales):
        pts = [r for r in ran if r.get("model.scales", r.get("scales")) == s]
        for status, marker in (("completed", "o"), ("stopped", "x"), ("error", "s"), ("running", "^")):
            sub = [r for r in pts if r["status"] == status]
            if sub:
                ax.scatter(
                    [r["params"] for r in sub],
                    [r[metric] for r in sub],
                    color=cmap(i),
                    marker=marker,
                    label=f"scales={s} ({status})",
                    alpha=0.85,
                )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric)
    ax.set_title("accuracy vs parameters (x: stopped early by ASHA)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _axis_scales(
    ran: list[dict[str, Any]], space: dict[str, ParamSpace], metric: str
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Per axis (each searched key, then the metric): value -> position in [0, 1], and end labels."""
    positions: dict[str, Any] = {}
    labels: dict[str, list[str]] = {}
    for key, dim in space.items():
        if dim.choice is not None:
            shown = [json.dumps(v) for v in dim.choice]
            labels[key] = shown
            positions[key] = lambda v, shown=shown: shown.index(json.dumps(v)) / max(1, len(shown) - 1)
        else:
            lo, hi = dim.uniform or dim.loguniform or dim.randint
            log_scale = dim.loguniform is not None
            labels[key] = [f"{lo:.3g}", f"{hi:.3g}"]
            positions[key] = lambda v, lo=lo, hi=hi, log_scale=log_scale: (
                (math.log(v / lo) / math.log(hi / lo)) if log_scale else (v - lo) / (hi - lo)
            )
    values = [r[metric] for r in ran]
    lo_m, hi_m = min(values), max(values)
    positions[metric] = lambda v: (v - lo_m) / (hi_m - lo_m) if hi_m > lo_m else 0.5
    labels[metric] = [f"{lo_m:.3f}", f"{hi_m:.3f}"]
    return positions, labels


def _plot_parallel_coordinates(
    ran: list[dict[str, Any]], space: dict[str, ParamSpace], metric: str, path: Path
) -> Path:
    import matplotlib.pyplot as plt

    axes = [*space, metric]
    positions, labels = _axis_scales(ran, space, metric)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(axes)), 4))
    cm = plt.get_cmap("plasma")
    for r in sorted(ran, key=lambda r: r[metric]):
        try:
            ys = [positions[k](r[k]) for k in axes]
        except (KeyError, ValueError, TypeError):
            continue
        ax.plot(
            range(len(axes)),
            ys,
            color=cm(positions[metric](r[metric])),
            alpha=0.8,
            linestyle="-" if r["status"] == "completed" else ":",
        )
    for i, key in enumerate(axes):
        ax.axvline(i, color="grey", linewidth=0.6)
        ax.text(i, -0.08, labels[key][0][:14], ha="center", va="top", fontsize=6)
        ax.text(i, 1.04, labels[key][-1][:14], ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(axes)), [k.split(".")[-1] for k in axes], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.12)
    ax.set_title(f"search, coloured by {metric} (dotted: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# Columns a narrow terminal loses first (rank, status and the metric always stay).
DROP_ORDER = ("startup s", "epochs", "trial", "params")


def summary_table(
    rows: list[dict[str, Any]], space_keys: list[str], metric: str, drop: tuple = (), match: str = "none"
):
    from rich.table import Table

    colours = {"completed": "green", "stopped": "yellow", "error": "red", "pruned": "magenta"}
    columns: dict[str, Any] = {
        "#": lambda rank, r: str(rank),
        "trial": lambda rank, r: r["trial_id"],
        "status": lambda rank, r: f"[{colours.get(r['status'], 'white')}]{r['status']}[/]",
        metric: lambda rank, r: f"{r[metric]:.4f}" if isinstance(r.get(metric), (int, float)) else "-",
        **{  # the other validation figure beside the one that ranks (val_acc next to val_loss)
            other: lambda rank, r, other=other: (
                f"{r[other]:.4f}" if isinstance(r.get(other), (int, float)) else "-"
            )
            for other in SHOWN_METRICS
            if other != metric and any(other in r for r in rows)
        },
        "epochs": lambda rank, r: str(r.get("epochs") or "-"),
        "params": lambda rank, r: f"{r['params']:,}" if r.get("params") else "-",
        "startup s": lambda rank, r: (
            f"{r['startup_s']:.2f}" if isinstance(r.get("startup_s"), (int, float)) else "-"
        ),
    }
    if match != "none":  # the matched figure, against the base recipe's budget
        columns[f"{match} vs base"] = lambda rank, r: (
            f"{r['match_ratio'] - 1:+.1%}" if isinstance(r.get("match_ratio"), (int, float)) else "-"
        )
    for key in space_keys:
        columns[key.split(".", 1)[-1]] = lambda rank, r, key=key: _cell(r.get(key))
    shown = [c for c in columns if c not in drop]
    title = f"search results (by {metric})"
    if match != "none":
        target = next((r["match_target"] for r in rows if r.get("match_target")), None)
        title += f", widths matched to the base {match}" + (f" ({target:,})" if target else "")
    table = Table(title=title, show_lines=False)
    for col in shown:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right", no_wrap=True)
    for rank, r in enumerate(rows, 1):
        table.add_row(*[columns[c](rank, r) for c in shown])
    return table


def print_summary(
    console,
    rows: list[dict[str, Any]],
    space_keys: list[str],
    metric: str,
    limit: int = 12,
    match: str = "none",
) -> None:
    """The best ``limit`` trials as a table that fits ``console.width``: columns are left out (the
    least telling first, then searched keys from the last) rather than squeezed to nothing; the
    full table is results.csv."""
    from rich.measure import Measurement

    shown = rows[:limit]
    space_cols = [k.split(".", 1)[-1] for k in space_keys]
    candidates = [*DROP_ORDER, *reversed(space_cols)]
    dropped: list[str] = []
    table = summary_table(shown, space_keys, metric, match=match)
    unbounded = console.options.update_width(100_000)  # the table's natural width, not clamped

    while Measurement.get(console, unbounded, table).maximum > console.width and candidates:
        dropped.append(candidates.pop(0))
        table = summary_table(shown, space_keys, metric, tuple(dropped), match)
    console.print(table)
    notes = []
    if dropped:
        notes.append(f"left out to fit {console.width} columns: {', '.join(dropped)}")
    hidden = len(rows) - limit
    if hidden > 0:
        notes.append(f"{hidden} more row(s)")
    if notes:
        console.print(f"({'; '.join(notes)}: all in results.csv)", highlight=False)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "-" if value is None else str(value)
