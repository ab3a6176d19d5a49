"""The run report: one self-contained HTML page (images inlined) and a Markdown twin."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1000px;
color:#1b1f24;padding:0 1rem}h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;
margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #d0d7de;
padding:.25rem .6rem;text-align:left}th{background:#f6f8fa}.pass{color:#1a7f37;font-weight:600}
.fail{color:#cf222e;font-weight:600}img{max-width:100%;border:1px solid #eee}.muted{color:#57606a}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px}
.scroll{overflow-x:auto;max-width:100%}
"""


def _img_tag(path: str | Path | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f'<p class="muted">({html.escape(alt)}: not available)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    # a wide table (the search: one column per searched key) scrolls in its own box, not the page
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _table_md(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(none)_\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)


def kv_rows(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"item": k, "value": v} for k, v in d.items()]


def write_report(ctx: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """ctx sections: title, summary{}, search{rows, columns, plot}, train{metrics{}, curves, confusion},
    promotion{decision, passed, numbers{}}, serving{}, lineage{}. Returns (html, md) paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = ctx.get("title", "scalelab run report")
    search, train = ctx.get("search", {}), ctx.get("train", {})
    promo, serving, lineage = ctx.get("promotion", {}), ctx.get("serving", {}), ctx.get("lineage", {})
    verdict = "pass" if promo.get("passed") else "fail"

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>{html.escape(ctx.get('subtitle', ''))}</p>",
        "<h2>Summary</h2>",
        _table_html(kv_rows(ctx.get("summary", {}))),
        "<h2>Search</h2>",
        _table_html(search.get("rows", [])[:20], search.get("columns")),
        _img_tag(search.get("plot"), "accuracy vs parameters by scales"),
        "<h2>Training</h2>",
        _table_html(kv_rows(train.get("metrics", {}))),
        _img_tag(train.get("curves"), "training curves"),
        _img_tag(train.get("confusion"), "confusion matrix"),
        "<h2>Promotion</h2>",
        f"<p>Decision: <span class='{verdict}' id='decision'>{html.escape(str(promo.get('decision', 'n/a')))}"
        "</span></p>",
        _table_html(kv_rows(promo.get("numbers", {}))),
        "<h2>Serving (smoke test over HTTP)</h2>",
        _table_html(kv_rows(serving)),
        "<h2>Lineage</h2>",
        _table_html(kv_rows(lineage)),
        "</body></html>",
    ]
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts))

    def md_img(path: Any, alt: str) -> str:
        if not path or not Path(path).is_file():
            return f"_({alt}: not available)_\n"
        dest = out / Path(path).name
        if Path(path).resolve() != dest.resolve():
            dest.write_bytes(Path(path).read_bytes())
        return f"![{alt}]({dest.name})\n"

    md = [
        f"# {title}\n",
        f"{ctx.get('subtitle', '')}\n",
        "## Summary\n",
        _table_md(kv_rows(ctx.get("summary", {}))),
        "## Search\n",
        _table_md(search.get("rows", [])[:20], search.get("columns")),
        md_img(search.get("plot"), "accuracy vs parameters by scales"),
        "## Training\n",
        _table_md(kv_rows(train.get("metrics", {}))),
        md_img(train.get("curves"), "training curves"),
        md_img(train.get("confusion"), "confusion matrix"),
        "## Promotion\n",
        f"Decision: **{promo.get('decision', 'n/a')}**\n\n",
        _table_md(kv_rows(promo.get("numbers", {}))),
        "## Serving (smoke test over HTTP)\n",
        _table_md(kv_rows(serving)),
        "## Lineage\n",
        _table_md(kv_rows(lineage)),
    ]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    return html_path, md_path
