"""Small plots drawn with Pillow (installed with torchvision): a scatter coloured by label, a
curve, and named curves with a legend. Matplotlib would cost about 0.6 s to import and 70 ms a
figure on two CPU cores, more than the pictures may take of a small model's training (2%)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

#: Colours of labels 0..9 (matplotlib's tab10), repeated for more labels.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
SIZE = 320  # plot area, pixels
MARGIN = 36  # room for the title and the tick labels


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font (loading it takes milliseconds: once per size)."""
    return ImageFont.load_default(size=size)


def _canvas(title: str, legend_width: int = 0) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE + 2 * MARGIN + legend_width, SIZE + 2 * MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN // 3), title, fill="black", font=_font(13))
    draw.rectangle((MARGIN, MARGIN, MARGIN + SIZE, MARGIN + SIZE), outline="black")
    return image, draw


def _to_pixels(values: np.ndarray, low: float, high: float, flip: bool = False) -> np.ndarray:
    """Plot coordinates of ``values`` on an axis from ``low`` to ``high``."""
    fraction = (values - low) / max(high - low, 1e-12)
    return MARGIN + SIZE * (1 - fraction if flip else fraction)


def _span(values: np.ndarray) -> tuple[float, float]:
    """The axis range: the values' range with 5% room on each side."""
    low, high = float(values.min()), float(values.max())
    room = 0.05 * (high - low) or 1.0
    return low - room, high + room


def _ticks(
    draw: ImageDraw.ImageDraw, x_range: tuple[float, float], y_range: tuple[float, float]
) -> None:
    """Each axis's two ends, labelled; the vertical axis's inside the plot, where a label as
    long as ``-1234.57`` has room."""
    font = _font(10)
    bottom, right = MARGIN + SIZE, MARGIN + SIZE
    draw.text((MARGIN, bottom + 4), f"{x_range[0]:.6g}", fill="black", font=font)
    draw.text((right, bottom + 4), f"{x_range[1]:.6g}", fill="black", font=font, anchor="ra")
    draw.text((MARGIN + 4, bottom - 2), f"{y_range[0]:.6g}", fill="black", font=font, anchor="ld")
    draw.text((MARGIN + 4, MARGIN + 2), f"{y_range[1]:.6g}", fill="black", font=font, anchor="la")


def _axis_names(image: Image.Image, draw: ImageDraw.ImageDraw, axes: Sequence[str]) -> None:
    """The horizontal axis's name below it, the vertical one's turned upright beside it."""
    font = _font(11)
    draw.text(
        (MARGIN + SIZE // 2, MARGIN + SIZE + 18), axes[0], fill="black", font=font, anchor="ma"
    )
    left, top, right, bottom = draw.textbbox((0, 0), axes[1], font=font)
    label = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(label).text((-left + 1, -top + 1), axes[1], fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (MARGIN - label.width - 12, MARGIN + (SIZE - label.height) // 2))


def _as_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float image with values in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def scatter(points: Tensor, labels: Tensor | None, title: str, axes: Sequence[str]) -> Tensor:
    """Points (N x 2) coloured by integer label (one colour without labels), with a legend.

    Args:
        points: the coordinates, one row per point.
        labels: (N,) integer labels, or None.
        title: the line above the plot.
        axes: the names of the horizontal and vertical axes.
    """
    xy = points.detach().double().cpu().numpy()
    classes = [] if labels is None else sorted(set(labels.tolist()))
    image, draw = _canvas(title, legend_width=60 if classes else 0)
    x_range, y_range = _span(xy[:, 0]), _span(xy[:, 1])
    px, py = _to_pixels(xy[:, 0], *x_range), _to_pixels(xy[:, 1], *y_range, flip=True)
    index = {label: i for i, label in enumerate(classes)}
    colours = (
        [PALETTE[index[label] % len(PALETTE)] for label in labels.tolist()]
        if labels is not None
        else [PALETTE[0]] * len(xy)
    )
    for x, y, colour in zip(px, py, colours, strict=True):
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    _ticks(draw, x_range, y_range)
    _axis_names(image, draw, axes)
    _legend(draw, [str(label) for label in classes])
    return _as_tensor(image)


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str]) -> None:
    """A coloured square and a name per entry, in the palette's order, right of the plot."""
    font = _font(11)
    for i, name in enumerate(names[:20]):  # a legend longer than the plot helps nobody
        top = MARGIN + 14 * i
        left = 2 * MARGIN + SIZE
        draw.rectangle((left, top + 2, left + 9, top + 11), fill=PALETTE[i % len(PALETTE)])
        draw.text((left + 14, top), name, fill="black", font=font)


def lines(
    x: Sequence[float], series: Mapping[str, Sequence[float]], title: str, axes: Sequence[str]
) -> Tensor:
    """Named curves against the same ``x``: each a line with a dot at every point, coloured in
    the palette's order (a later one drawn over an earlier one), with a legend.

    Args:
        x: the horizontal positions, shared by every curve.
        series: name -> the curve's heights, one per ``x``.
        title: the line above the plot.
        axes: the names of the horizontal and vertical axes.
    """
    xs = np.asarray(x, dtype=np.float64)
    heights = [np.asarray(values, dtype=np.float64) for values in series.values()]
    longest = max((len(name) for name in series), default=0)
    image, draw = _canvas(title, legend_width=20 + 7 * longest)
    x_range, y_range = _span(xs), _span(np.concatenate(heights))
    for i, y in enumerate(heights):
        colour = PALETTE[i % len(PALETTE)]
        px, py = _to_pixels(xs, *x_range), _to_pixels(y, *y_range, flip=True)
        points = list(zip(px.tolist(), py.tolist(), strict=True))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for a, b in points:
            draw.ellipse((a - 3, b - 3, a + 3, b + 3), fill=colour)
    _ticks(draw, x_range, y_range)
    _axis_names(image, draw, axes)
    _legend(draw, list(series))
    return _as_tensor(image)


def curve(values: Sequence[float], title: str, axes: Sequence[str]) -> Tensor:
    """A line through ``values`` against their index (0, 1, ...), with the ends labelled.

    Args:
        values: the curve's heights, one per step.
        title: the line above the plot.
        axes: the names of the horizontal and vertical axes.
    """
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    image, draw = _canvas(title)
    x_range = (0.0, max(float(x[-1]), 1.0)) if len(x) else (0.0, 1.0)
    y_range = _span(y) if len(y) else (0.0, 1.0)
    px, py = _to_pixels(x, *x_range), _to_pixels(y, *y_range, flip=True)
    points = list(zip(px.tolist(), py.tolist(), strict=True))
    if len(points) > 1:
        draw.line(points, fill=PALETTE[0], width=2)
    for point in points[-1:]:  # the last value, as a dot: a one-point curve is visible too
        draw.ellipse((point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3), fill=PALETTE[3])
    _ticks(draw, x_range, y_range)
    _axis_names(image, draw, axes)
    return _as_tensor(image)
