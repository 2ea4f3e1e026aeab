"""A small line plot drawn with PIL (matplotlib is not a dependency): axes with tick labels, one polyline
with markers per series, a legend. Enough for a figure like FID against NFE.

    line_plot({'heun': ([5, 9, 17], [80.1, 31.0, 20.2]), ...}, 'fid-nfe.png', xlabel='NFE', ylabel='FID',
              log_y=True)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

# Distinguishable colours (Okabe-Ito, then a few more), cycled.
COLORS = ['#0072B2', '#D55E00', '#009E73', '#CC79A7', '#E69F00', '#56B4E9', '#000000', '#F0E442', '#999999',
          '#8C564B', '#7F3C8D']


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(target - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    return [first + k * step for k in range(int(math.ceil((hi - first) / step)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k inside [lo, hi] (at least the two ends' decades)."""
    ticks = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10 ** k for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
    return ticks or [lo, hi]


def _label(v: float) -> str:
    return f'{v:g}' if abs(v) < 1e5 else f'{v:.0e}'


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | None = None,
              title: str = '', xlabel: str = '', ylabel: str = '', log_y: bool = False,
              size: tuple[int, int] = (900, 600)) -> PIL.Image.Image:
    """Draw every series (name -> (xs, ys)) as a polyline with markers; save to `path` as PNG if given.
    Non-finite or (with log_y) non-positive points are skipped."""
    font = PIL.ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 70, 190, 40 if title else 20, 55
    image = PIL.Image.new('RGB', size, 'white')
    draw = PIL.ImageDraw.Draw(image)

    def usable(y):
        return math.isfinite(y) and (y > 0 or not log_y)
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if usable(float(y))] for name, (xs, ys) in series.items()}
    all_x = [x for pts in points.values() for x, _ in pts] or [0.0, 1.0]
    all_y = [y for pts in points.values() for _, y in pts] or [1.0, 2.0]
    x_ticks = nice_ticks(min(all_x), max(all_x))
    x_lo, x_hi = min(x_ticks[0], min(all_x)), max(x_ticks[-1], max(all_x))
    if log_y:
        steps = lambda v: [m * 10 ** k for k in range(math.floor(math.log10(v)) - 1, math.ceil(math.log10(v)) + 1)
                           for m in (1, 2, 5)]
        y_lo = max(t for t in steps(min(all_y)) if t <= min(all_y))  # the 1-2-5 values around the data
        y_hi = min(t for t in steps(max(all_y)) if t >= max(all_y))
        y_ticks = log_ticks(y_lo, y_hi)
        ty = math.log10
    else:
        y_ticks = nice_ticks(min(all_y), max(all_y))
        y_lo, y_hi = y_ticks[0], y_ticks[-1]
        ty = float
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def px(x):
        return x0 + (x - x_lo) / ((x_hi - x_lo) or 1) * (x1 - x0)

    def py(y):
        return y0 + (ty(y) - ty(y_lo)) / ((ty(y_hi) - ty(y_lo)) or 1) * (y1 - y0)

    # Grid, axes, ticks.
    for t in x_ticks:
        if x_lo <= t <= x_hi:
            draw.line([(px(t), y0), (px(t), y1)], fill='#e6e6e6')
            draw.text((px(t), y0 + 6), _label(t), fill='black', font=font, anchor='ma')
    for t in y_ticks:
        draw.line([(x0, py(t)), (x1, py(t))], fill='#e6e6e6')
        draw.text((x0 - 6, py(t)), _label(t), fill='black', font=font, anchor='rm')
    draw.rectangle([x0, y1, x1, y0], outline='black')
    draw.text(((x0 + x1) / 2, height - 22), xlabel, fill='black', font=font, anchor='ma')
    draw.text((8, (y0 + y1) / 2), ylabel, fill='black', font=font, anchor='lm')
    if title:
        draw.text((width / 2, 12), title, fill='black', font=font, anchor='ma')

    # Series and legend.
    for k, (name, pts) in enumerate(points.items()):
        color = COLORS[k % len(COLORS)]
        xy = [(px(x), py(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for cx, cy in xy:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        ly = top + 10 + 18 * k
        draw.line([(x1 + 15, ly), (x1 + 40, ly)], fill=color, width=2)
        draw.ellipse([x1 + 24, ly - 3, x1 + 30, ly + 3], fill=color)
        draw.text((x1 + 46, ly), name, fill='black', font=font, anchor='lm')
    if path is not None:
        import dnnlib
        with dnnlib.util.atomic_write(path) as f:
            image.save(f, format='PNG')
    return image
