"""Small line plots drawn with PIL (matplotlib is not a dependency of this project).

    line_plot('fid.png', {'FID': (stds, fids)}, xlabel='EMA length sigma_rel', ylabel='FID', title='...')

One function, enough for the curves the tools report (FID against EMA length, loss against kimg): axes
with "nice" tick values, one polyline with markers per series, a legend when there are several series, and
optionally a highlighted point (e.g. the minimum). Written atomically (dnnlib.util.atomic_write).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f'axis range [{lo}, {hi}] is not finite')
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    k = 0
    while not ticks or ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _label(value: float) -> str:
    return f'{value:.6g}'


def line_plot(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = '',
              ylabel: str = '', title: str = '', highlight: Optional[tuple[float, float]] = None,
              size: tuple[int, int] = (720, 480)) -> None:
    """Write a PNG with one line per entry of `series` ({name: (xs, ys)}); non-finite points are skipped.
    `highlight` = (x, y) draws a ring there (e.g. the best value) with its coordinates."""
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))]
              for name, (xs, ys) in series.items()}
    every = [p for pts in points.values() for p in pts]
    if not every:
        raise ValueError('line_plot: no finite points to draw')
    xticks = nice_ticks(min(x for x, _ in every), max(x for x, _ in every))
    yticks = nice_ticks(min(y for _, y in every), max(y for _, y in every))

    width, height = size
    image = PIL.Image.new('RGB', size, 'white')
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default()
    left, right, top, bottom = 70, 20, 40 if title else 20, 50
    x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    # Grid, axes, tick labels.
    for x in xticks:
        px, _ = to_pixel(x, y0)
        draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
        draw.text((px, height - bottom + 6), _label(x), fill='black', font=font, anchor='ma')
    for y in yticks:
        _, py = to_pixel(x0, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((left - 6, py), _label(y), fill='black', font=font, anchor='rm')
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    if title:
        draw.text((width / 2, 12), title, fill='black', font=font, anchor='ma')
    if xlabel:
        draw.text(((left + width - right) / 2, height - 18), xlabel, fill='black', font=font, anchor='ma')
    if ylabel:
        label = PIL.Image.new('RGB', (int(draw.textlength(ylabel, font=font)) + 4, 14), 'white')
        PIL.ImageDraw.Draw(label).text((2, 1), ylabel, fill='black', font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (6, int((top + height - bottom) / 2 - label.height / 2)))

    # Series, legend, highlight.
    for k, (name, pts) in enumerate(points.items()):
        color = COLORS[k % len(COLORS)]
        pixels = [to_pixel(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        if len(points) > 1:
            ly = top + 8 + 14 * k
            draw.line([(width - right - 110, ly), (width - right - 90, ly)], fill=color, width=2)
            draw.text((width - right - 85, ly), name, fill='black', font=font, anchor='lm')
    if highlight is not None:
        px, py = to_pixel(*highlight)
        draw.ellipse([px - 7, py - 7, px + 7, py + 7], outline=(214, 39, 40), width=2)
        draw.text((px + 10, py - 10), f'({_label(highlight[0])}, {_label(highlight[1])})', fill=(214, 39, 40),
                  font=font, anchor='ls')

    with dnnlib.util.atomic_write(path) as f:
        image.save(f, format='PNG')
