"""Server-rendered SVG charts: stacked bars, bars and lines, no JavaScript library.

Each chart is a self-contained `<svg viewBox=...>` that scales to its
container's width (usable at phone width), with a `<title>` tooltip on every
mark and, where given, a link per column. Text is escaped: labels may come
from stored data (failure reasons, task names).
"""
from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

W, H, LEFT, BOTTOM, TOP = 640, 220, 44, 28, 26


def _frame(title: str, y_max: float, body: list[str], legend: Sequence[tuple[str, str]], y_fmt: str = "{:g}") -> Markup:
    ticks = []
    for i in range(5):
        v = y_max * i / 4
        y = H - BOTTOM - (H - BOTTOM - TOP) * i / 4
        ticks.append(f'<line x1="{LEFT}" x2="{W - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{LEFT - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                     f'{escape(y_fmt.format(v))}</text>')
    keys, x = [], LEFT
    for name, color in legend:
        keys.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{color}"/>'
                    f'<text x="{x + 14}" y="15" class="tick">{escape(name)}</text>')
        x += 22 + 7 * len(name)
    return Markup(f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">'
                  f'<title>{escape(title)}</title>{"".join(ticks)}{"".join(keys)}{"".join(body)}</svg>')


def _x_labels(labels: Sequence[str], step: float, every: int) -> list[str]:
    return [f'<text x="{LEFT + step * (i + 0.5):.1f}" y="{H - BOTTOM + 14}" class="tick" text-anchor="middle">'
            f'{escape(label)}</text>' for i, label in enumerate(labels) if i % every == 0]


def stacked_bars(title: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]],
                 links: Sequence[str | None] | None = None) -> Markup:
    """One column per label, one coloured segment per series (name, colour, values)."""
    n = max(1, len(labels))
    totals = [sum(s[2][i] for s in series) for i in range(len(labels))]
    y_max = max(totals + [1])
    step = (W - LEFT - 8) / n
    scale = (H - BOTTOM - TOP) / y_max
    body = []
    for i, label in enumerate(labels):
        y = H - BOTTOM
        marks = []
        for name, color, values in series:
            h = values[i] * scale
            if h > 0:
                y -= h
                marks.append(f'<rect x="{LEFT + step * i + step * 0.12:.1f}" y="{y:.1f}" width="{step * 0.76:.1f}"'
                             f' height="{h:.1f}" fill="{color}"><title>{escape(label)}: {escape(name)} '
                             f'{values[i]:g}</title></rect>')
        column = "".join(marks)
        link = links[i] if links else None
        body.append(f'<a href="{escape(link)}">{column}</a>' if link else column)
    body += _x_labels(labels, step, max(1, n // 12))
    return _frame(title, y_max, body, [(s[0], s[1]) for s in series])


def bars(title: str, labels: Sequence[str], values: Sequence[float], color: str = "#4a7bd0") -> Markup:
    return stacked_bars(title, labels, [(title, color, values)])


def lines(title: str, xs: Sequence[str], series: Sequence[tuple[str, str, Sequence[float | None]]],
          y_fmt: str = "{:.3g}", y_max: float | None = None) -> Markup:
    """One polyline per series over the same x labels; None leaves a gap. `y_max`: a fixed top."""
    n = max(1, len(xs))
    known = [v for s in series for v in s[2] if v is not None]
    y_max = y_max or (max(known + [0.0]) * 1.1 or 1.0)
    step = (W - LEFT - 8) / n
    scale = (H - BOTTOM - TOP) / y_max
    body = []
    for name, color, values in series:
        points, dots = [], []
        for i, v in enumerate(values):
            if v is None:
                if points:
                    body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>')
                points = []
                continue
            x, y = LEFT + step * (i + 0.5), H - BOTTOM - v * scale
            points.append(f"{x:.1f},{y:.1f}")
            dots.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(xs[i])}: '
                        f'{escape(name)} {escape(y_fmt.format(v))}</title></circle>')
        if points:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>')
        body += dots
    body += _x_labels(xs, step, max(1, n // 12))
    return _frame(title, y_max, body, [(s[0], s[1]) for s in series], y_fmt)
