"""Small plots drawn with PIL (matplotlib is not a dependency): the figures the tools write.

    line_plot({'heun': ([5, 9, 17], [80.1, 31.0, 20.2]), ...}, 'fid-nfe.png', xlabel='NFE', ylabel='FID', log_y=True,
              intervals={'heun': ([78.0, 30.1, 19.5], [82.3, 32.0, 21.0])})   # optional error bars
    scatter_plot([('baseline', 1.2, 20.3), ('l1-50', 0.7, 22.9)], 'size.png', xlabel='size (MB)', ylabel='FID')

Axes with round tick values, a light grid, rotated y label; `line_plot` draws one polyline with markers per
series (legend when there are several), `scatter_plot` one labelled marker per point; both draw optional
error bars (`intervals`). Files are written atomically (dnnlib.util.atomic_write); both also return the image.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib

# Distinguishable colours (Okabe-Ito, then a few more), cycled.
COLORS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0),
          (240, 228, 66), (153, 153, 153), (140, 86, 75), (127, 60, 141)]
HIGHLIGHT = (214, 39, 40)
GRID = (230, 230, 230)


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
    while not ticks or ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k inside [lo, hi] (at least the two ends)."""
    ticks = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        ticks += [m * 10 ** k for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
    return ticks or [lo, hi]


def _label(value: float) -> str:
    return f'{value:.6g}'


def _font(size: int = 13):
    try:
        return PIL.ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, ImportError, OSError):
        return PIL.ImageFont.load_default()


class _Axes:
    """A white image with a plot frame mapping data coordinates to pixels (y optionally logarithmic)."""

    def __init__(self, size, margins, x_range, y_range, x_ticks, y_ticks, log_y=False, title='', xlabel='', ylabel=''):
        self.image = PIL.Image.new('RGB', size, 'white')
        self.draw = draw = PIL.ImageDraw.Draw(self.image)
        self.font = font = _font()
        width, height = size
        left, right, top, bottom = margins
        self.box = (left, top, width - right, height - bottom)
        self.x_range, self.y_range = x_range, y_range
        self.ty: Callable[[float], float] = math.log10 if log_y else float
        for t in x_ticks:
            if x_range[0] <= t <= x_range[1]:
                px, _ = self.to_pixel(t, y_range[0])
                draw.line([(px, top), (px, height - bottom)], fill=GRID)
                draw.text((px, height - bottom + 6), _label(t), fill='black', font=font, anchor='ma')
        for t in y_ticks:
            if y_range[0] <= t <= y_range[1]:
                _, py = self.to_pixel(x_range[0], t)
                draw.line([(left, py), (width - right, py)], fill=GRID)
                draw.text((left - 6, py), _label(t), fill='black', font=font, anchor='rm')
        draw.rectangle(self.box, outline='black')
        if title:
            draw.text((width / 2, 12), title, fill='black', font=font, anchor='ma')
        if xlabel:
            draw.text(((left + width - right) / 2, height - 22), xlabel, fill='black', font=font, anchor='ma')
        if ylabel:
            box = draw.textbbox((0, 0), ylabel, font=font)
            label = PIL.Image.new('RGB', (box[2] + 4, box[3] + 4), 'white')
            PIL.ImageDraw.Draw(label).text((2, 2), ylabel, fill='black', font=font)
            label = label.rotate(90, expand=True)
            self.image.paste(label, (6, int((top + height - bottom) / 2 - label.height / 2)))

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        left, top, right, bottom = self.box
        ty = self.ty
        return (left + (x - x0) / ((x1 - x0) or 1) * (right - left),
                bottom - (ty(y) - ty(y0)) / ((ty(y1) - ty(y0)) or 1) * (bottom - top))

    def marker(self, x, y, color, radius=3, outline=None):
        px, py = self.to_pixel(x, y)
        self.draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color, outline=outline)
        return px, py

    def save(self, path: Optional[str]) -> PIL.Image.Image:
        if path is not None:
            with dnnlib.util.atomic_write(path) as f:
                self.image.save(f, format='PNG')
        return self.image


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Optional[str] = None,
              title: str = '', xlabel: str = '', ylabel: str = '', log_y: bool = False,
              highlight: Optional[tuple[float, float]] = None, size: tuple[int, int] = (900, 600),
              intervals: Optional[Mapping[str, tuple[Sequence[float], Sequence[float]]]] = None) -> PIL.Image.Image:
    """One polyline with markers per series ({name: (xs, ys)}); saved as PNG to `path` if given.
    Non-finite (with log_y: non-positive) points are skipped. `highlight` = (x, y) rings that point (e.g. the
    best value) and prints its coordinates. `intervals` = {name: (lows, highs)}, one pair per point of that
    series: drawn as error bars (non-finite ends are skipped)."""
    def usable(x, y):
        return math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if usable(float(x), float(y))]
              for name, (xs, ys) in series.items()}
    bars = {name: [(float(x), float(lo), float(hi)) for x, y, lo, hi in zip(series[name][0], series[name][1], *pair)
                   if usable(float(x), float(y)) and usable(float(x), float(lo)) and usable(float(x), float(hi))]
            for name, pair in (intervals or {}).items() if name in series}
    every = [p for pts in points.values() for p in pts]
    every += [(x, y) for b in bars.values() for x, lo, hi in b for y in (lo, hi)]  # the axes hold the bars
    if not every:
        raise ValueError('line_plot: no finite points to draw')
    xs, ys = [x for x, _ in every], [y for _, y in every]
    x_ticks = nice_ticks(min(xs), max(xs))
    if log_y:
        y_range = _log_range(min(ys), max(ys))
        y_ticks = log_ticks(*y_range)
    else:
        y_ticks = nice_ticks(min(ys), max(ys))
        y_range = (y_ticks[0], y_ticks[-1])
    legend = len(points) > 1
    axes = _Axes(size, (80, 190 if legend else 20, 40 if title else 20, 55), (x_ticks[0], x_ticks[-1]), y_range,
                 x_ticks, y_ticks, log_y=log_y, title=title, xlabel=xlabel, ylabel=ylabel)
    draw, right = axes.draw, axes.box[2]
    for k, (name, pts) in enumerate(points.items()):
        color = COLORS[k % len(COLORS)]
        pixels = [axes.to_pixel(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for x, lo, hi in bars.get(name, []):
            (px, p_lo), (_, p_hi) = axes.to_pixel(x, lo), axes.to_pixel(x, hi)
            draw.line([(px, p_lo), (px, p_hi)], fill=color, width=1)
            for py in (p_lo, p_hi):
                draw.line([(px - 4, py), (px + 4, py)], fill=color, width=1)
        for x, y in pts:
            axes.marker(x, y, color)
        if legend:
            ly = axes.box[1] + 10 + 18 * k
            draw.line([(right + 15, ly), (right + 40, ly)], fill=color, width=2)
            draw.ellipse([right + 24, ly - 3, right + 30, ly + 3], fill=color)
            draw.text((right + 46, ly), name, fill='black', font=axes.font, anchor='lm')
    if highlight is not None:
        px, py = axes.to_pixel(*highlight)
        draw.ellipse([px - 7, py - 7, px + 7, py + 7], outline=HIGHLIGHT, width=2)
        draw.text((px + 10, py - 10), f'({_label(highlight[0])}, {_label(highlight[1])})', fill=HIGHLIGHT,
                  font=axes.font, anchor='ls')
    return axes.save(path)


def _log_range(lo: float, hi: float) -> tuple[float, float]:
    """The 1-2-5 ticks just outside [lo, hi] (both > 0), for a logarithmic axis."""
    around = lambda v: [m * 10 ** k for k in range(math.floor(math.log10(v)) - 1, math.ceil(math.log10(v)) + 1)
                        for m in (1, 2, 5)]
    return max(t for t in around(lo) if t <= lo), min(t for t in around(hi) if t >= hi)


def scatter_plot(points: Sequence[tuple[str, float, float]], path: Optional[str] = None, title: str = '',
                 xlabel: str = '', ylabel: str = '', size: tuple[int, int] = (900, 600),
                 intervals: Optional[Sequence[tuple[float, float]]] = None, groups: Optional[Sequence[str]] = None,
                 log_y: bool = False) -> PIL.Image.Image:
    """One marker per (name, x, y), labelled with its name; saved as PNG to `path` if given. `intervals`: one
    (low, high) per point, drawn as error bars (non-finite ones skipped). `groups`: one group name per point;
    each group gets its own colour and a legend entry. `log_y` (every y > 0): a logarithmic y axis, for values
    that span decades. A label that would overlap another label or leave the frame is tried on the other side,
    above and below its marker, and left out (the marker stays) when no place is free."""
    def padded(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 if hi > lo else (abs(hi) * 0.1 or 1.0)
        return lo - pad, hi + pad
    if not points:
        raise ValueError('scatter_plot: no points to draw')
    if log_y and any(not p[2] > 0 for p in points):
        raise ValueError('scatter_plot: log_y needs every y > 0')
    bars = [(x, float(lo), float(hi)) for (_name, x, _y), (lo, hi) in zip(points, intervals or [])
            if math.isfinite(float(lo)) and math.isfinite(float(hi)) and (float(lo) > 0 or not log_y)]
    x_range = padded([p[1] for p in points])
    ys = [p[2] for p in points] + [v for _x, lo, hi in bars for v in (lo, hi)]
    if log_y:
        y_range = _log_range(min(ys), max(ys))
        y_ticks = log_ticks(*y_range)
    else:
        y_range = padded(ys)
        y_ticks = nice_ticks(*y_range)
    names = list(dict.fromkeys(groups)) if groups else []
    color_of = {g: COLORS[k % len(COLORS)] for k, g in enumerate(names)}
    legend = len(names) > 1
    axes = _Axes(size, (80, 150 if legend else 30, 40 if title else 20, 55), x_range, y_range, nice_ticks(*x_range),
                 y_ticks, log_y=log_y, title=title, xlabel=xlabel, ylabel=ylabel)
    draw, (left, top, right, bottom) = axes.draw, axes.box
    for x, lo, hi in bars:
        (px, p_lo), (_, p_hi) = axes.to_pixel(x, lo), axes.to_pixel(x, hi)
        draw.line([(px, p_lo), (px, p_hi)], fill='black', width=1)
        for py in (p_lo, p_hi):
            draw.line([(px - 5, py), (px + 5, py)], fill='black', width=1)
    taken = []  # label boxes already drawn
    for k, (name, x, y) in enumerate(points):
        color = color_of[groups[k]] if groups else HIGHLIGHT
        px, py = axes.marker(x, y, color, radius=5, outline='black')
        for anchor, at in (('lb', (px + 8, py - 6)), ('rb', (px - 8, py - 6)), ('mb', (px, py - 9)),
                           ('mt', (px, py + 9))):
            box = draw.textbbox(at, name, font=axes.font, anchor=anchor)
            inside = box[0] >= left + 2 and box[2] <= right - 2 and box[1] >= top + 2 and box[3] <= bottom - 2
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                draw.text(at, name, fill='black', font=axes.font, anchor=anchor)
                taken.append(box)
                break
    if legend:
        for k, g in enumerate(names):
            ly = top + 10 + 18 * k
            draw.ellipse([right + 20, ly - 5, right + 30, ly + 5], fill=color_of[g], outline='black')
            draw.text((right + 38, ly), g, fill='black', font=axes.font, anchor='lm')
    return axes.save(path)
