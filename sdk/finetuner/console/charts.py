"""Charts drawn on the server as inline SVG: no script, no library, nothing fetched by the browser.

One function, :func:`chart`, draws lines (loss by step, metrics by epoch) or points (a sweep's metric
by a parameter's value) on a linear or logarithmic x axis, or on named categories. Every text is
escaped; colours are the Okabe-Ito palette, which stays readable with colour-blindness. Each series is
a ``<g class="series" data-name=... data-points=N>`` so that tests (and people) can read what is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

PALETTE = ('#0072B2', '#E69F00', '#009E73', '#D55E00', '#CC79A7', '#56B4E9', '#000000', '#F0E442')


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y); categories: x is the category's position


@dataclass
class Axis:
    label: str = ''
    log: bool = False  # logarithmic (x only; every value must be > 0)
    integer: bool = False  # ticks on whole numbers only (steps, epochs)
    categories: list[str] = field(default_factory=list)  # named positions 0, 1, 2... instead of numbers


@dataclass(frozen=True)
class _Frame:
    width: int
    height: int
    left: int = 58
    right: int = 16
    top: int = 30
    bottom: int = 42

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten; with
    ``integer``, never less than 1)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(step, 1.0)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        if value >= low - step * 1e-9:
            ticks.append(round(value, 12))
        value += step
    return ticks


def format_number(value: float) -> str:
    """Short and exact enough for an axis: 0.0001 -> 1e-04, 12000 -> 1.2e+04, 0.25 -> 0.25."""
    if value == 0:
        return '0'
    magnitude = abs(value)
    if magnitude < 1e-3 or magnitude >= 1e4:
        return f'{value:.1e}'
    return f'{value:.4g}'


def _extent(values: Sequence[float], pad: bool) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        spread = abs(low) * 0.1 or 1.0
        return low - spread, high + spread
    if pad:
        margin = (high - low) * 0.05
        return low - margin, high + margin
    return low, high


class _Scale:
    def __init__(self, low: float, high: float, start: float, length: float, log: bool = False):
        self.log = log
        self.low, self.high = (math.log10(low), math.log10(high)) if log else (low, high)
        self.start, self.length = start, length

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.low) / (self.high - self.low) * self.length


def _x_scale(
    series: Sequence[Series], axis: Axis, frame: _Frame, pad: bool = False
) -> tuple[_Scale, list[tuple[float, str]]]:
    if axis.categories:
        n = len(axis.categories)
        scale = _Scale(-0.5, n - 0.5, frame.left, frame.plot_width)
        return scale, [(float(i), name) for i, name in enumerate(axis.categories)]
    xs = [x for s in series for x, _ in s.points]
    if axis.log:
        low, high = min(xs), max(xs)
        low, high = (low / 2, high * 2) if low == high else (low / 1.5, high * 1.5)
        ticks = [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
        ticks = [t for t in ticks if low <= t <= high] or [xs[0]]
        return _Scale(low, high, frame.left, frame.plot_width, log=True), [(t, format_number(t)) for t in ticks]
    low, high = _extent(xs, pad=pad)
    ticks = nice_ticks(low, high, integer=axis.integer)
    return _Scale(low, high, frame.left, frame.plot_width), [(t, format_number(t)) for t in ticks]


def chart(
    series: Sequence[Series],
    *,
    title: str,
    x: Axis | None = None,
    y_label: str = '',
    lines: bool = True,
    highlight: tuple[float, float] | None = None,
    width: int = 560,
    height: int = 260,
) -> Markup:
    """An SVG chart of ``series``; ``lines=False`` draws points only; ``highlight`` rings one point."""
    x = x or Axis()
    drawn = [s for s in series if s.points]
    frame = _Frame(width, height, top=48 if len(drawn) > 1 else 30)  # room for the legend row
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text class="chart-title" x="{frame.left}" y="18">{escape(title)}</text>',
    ]
    if not drawn:
        out.append(
            f'<text class="chart-empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text>'
        )
        return Markup(''.join([*out, '</svg>']))
    x_scale, x_ticks = _x_scale(drawn, x, frame, pad=not lines)  # points off the frame's edges
    y_low, y_high = _extent([y for s in drawn for _, y in s.points], pad=True)
    y_scale = _Scale(y_low, y_high, frame.top + frame.plot_height, -frame.plot_height)
    out.extend(_axes(frame, x_scale, x_ticks, y_scale, nice_ticks(y_low, y_high), x.label, y_label))
    for index, one in enumerate(drawn):
        out.append(_series(one, PALETTE[index % len(PALETTE)], x_scale, y_scale, lines, x.categories))
    if highlight is not None:
        hx, hy = x_scale(highlight[0]), y_scale(highlight[1])
        out.append(f'<circle class="highlight" cx="{hx:.1f}" cy="{hy:.1f}" r="8" fill="none" stroke="#D55E00"/>')
    if len(drawn) > 1:
        out.append(_legend(drawn, frame))
    out.append('</svg>')
    return Markup(''.join(out))


def _axes(
    frame: _Frame,
    x_scale: _Scale,
    x_ticks: list[tuple[float, str]],
    y_scale: _Scale,
    y_ticks: list[float],
    x_label: str,
    y_label: str,
) -> list[str]:
    bottom, right = frame.top + frame.plot_height, frame.left + frame.plot_width
    parts = [
        f'<rect class="plot" x="{frame.left}" y="{frame.top}" width="{frame.plot_width}" '
        f'height="{frame.plot_height}" fill="#fafafa" stroke="#cccccc"/>'
    ]
    for value in y_ticks:
        y = y_scale(value)
        parts.append(f'<line x1="{frame.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(
            f'<text class="tick" x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end">{format_number(value)}</text>'
        )
    for value, label in x_ticks:
        xp = x_scale(value)
        parts.append(f'<line x1="{xp:.1f}" y1="{bottom}" x2="{xp:.1f}" y2="{bottom + 4}" stroke="#888888"/>')
        parts.append(f'<text class="tick" x="{xp:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    if x_label:
        parts.append(
            f'<text class="axis-label" x="{frame.left + frame.plot_width / 2}" y="{frame.height - 6}" '
            f'text-anchor="middle">{escape(x_label)}</text>'
        )
    if y_label:
        parts.append(
            f'<text class="axis-label" x="12" y="{frame.top + frame.plot_height / 2}" text-anchor="middle" '
            f'transform="rotate(-90 12 {frame.top + frame.plot_height / 2})">{escape(y_label)}</text>'
        )
    return parts


def _series(one: Series, color: str, x_scale: _Scale, y_scale: _Scale, lines: bool, categories: list[str]) -> str:
    coords = [(x_scale(px), y_scale(py)) for px, py in one.points]
    parts = [f'<g class="series" data-name="{escape(one.name)}" data-points="{len(one.points)}">']
    if lines and len(coords) > 1:
        path = ' '.join(f'{cx:.1f},{cy:.1f}' for cx, cy in coords)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    radius = 2.5 if lines and len(coords) > 40 else 4
    for (px, py), (cx, cy) in zip(one.points, coords, strict=True):
        shown_x = categories[int(px)] if categories else format_number(px)
        tip = f'{one.name}: {format_number(py)} at {shown_x}'
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius}" fill="{color}"><title>{escape(tip)}</title></circle>'
        )
    parts.append('</g>')
    return ''.join(parts)


def _legend(series: Sequence[Series], frame: _Frame) -> str:
    """One row under the title: a swatch and the name of each series (names of ~7 px a letter)."""
    parts = ['<g class="legend">']
    x = frame.left
    for index, one in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="26" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text class="legend-label" x="{x + 14}" y="35">{escape(one.name)}</text>')
        x += 14 + 7 * len(one.name) + 12
    parts.append('</g>')
    return ''.join(parts)
