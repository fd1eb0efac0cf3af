"""The report's page: its building blocks (images as data URIs, tables, picture tiles, branch
bars) and the template, one self-contained HTML file with no script and nothing fetched."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from googlenet.insight.branches import BRANCHES
from googlenet.insight.plots import as_rgb_array, png_bytes, upscale

GENERATOR = '<meta name="generator" content="googlenet report">'
BRANCH_COLOURS = ("#3b75af", "#ef8636", "#519e3e", "#c53932")  # 1x1, 3x3, 5x5, pool


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}"{w}>'


def table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def tiles_html(tiles: list[tuple[Tensor, str, bool]], min_side: int = 64) -> str:
    """Images (3 x H x W, 0..1) as small PNGs with HTML captions, mistakes in red (PIL only:
    a matplotlib grid cost seconds)."""
    cells = []
    for image, caption, ok in tiles:
        pic = img(png_bytes(as_rgb_array(upscale(image, min_side))), caption)
        cls = "tile" if ok else "tile bad"
        cells.append(
            f"<figure class='{cls}'>{pic}<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return "<div class=row>" + "".join(cells) + "</div>"


def bar(shares: Tensor) -> str:
    """A stacked horizontal bar of the four branch shares."""
    spans = "".join(
        f"<span style='width:{100 * float(v):.2f}%;background:{c}' "
        f"title='{b} {100 * float(v):.1f}%'></span>"
        for b, v, c in zip(BRANCHES, shares, BRANCH_COLOURS, strict=True)
    )
    return f"<div class=bar>{spans}</div>"


def render_page(run: Path, parts: list[str], notes: list[str], t0: float) -> str:
    """The whole page; notes on what is missing go right after the summary."""
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts = [parts[0], f"<ul class=notes>{items}</ul>", *parts[1:]]
    took = time.perf_counter() - t0
    title = f"googlenet run report: {run.name}"
    return PAGE.format(
        title=html.escape(title),
        generator=GENERATOR,
        body="\n".join(parts),
        footer=html.escape(
            f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} in {took:.1f} s "
            f"from {run} by googlenet report"
        ),
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{generator}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em;
       border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 12px; margin: .4em 0; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
img {{ max-width: 100%; }} figure {{ margin: 0; font-size: 11px; width: 200px; }}
.notes {{ color: #8a5300; }}
.tile {{ width: 96px; }} .tile figcaption {{ white-space: pre-line; }}
.bad figcaption {{ color: crimson; }}
.bar {{ display: flex; width: 220px; height: 12px; }}
.key {{ display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; }}
footer {{ color: #777; font-size: 11px; margin-top: 2em; }}
</style></head>
<body><h1>{title}</h1>
{body}
<footer>{footer}</footer>
</body></html>
"""
