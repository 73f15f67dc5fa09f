"""Small PNG figures without a plotting dependency (SimpleITK writes the PNG): slice montages with titles and a
label legend, line charts with title, axis labels, tick labels and a legend, and the built-in bitmap font that
writes their text.

The font is a 5x8 cell per character (capitals and digits in rows 0-6, descenders of ``g j p q y , ; _`` in
row 7), one column of spacing between characters; it covers printable ASCII (:data:`FONT_CHARS`) and draws
any other character as a box. ``scale`` repeats each font pixel ``scale`` x ``scale`` times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABEL_COLOURS = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.float32)

TEXT_COLOUR = (0, 0, 0)

# -- bitmap font -------------------------------------------------------------------------------------------------
# One glyph: 8 rows, top first, as 2 hex digits each; bit 4 is the leftmost of the 5 columns.
_FONT_HEX = {
    "A": "0e11111f11111100", "B": "1e11111e11111e00", "C": "0e11101010110e00", "D": "1c12111111121c00",
    "E": "1f10101e10101f00", "F": "1f10101e10101000", "G": "0e11101711110f00", "H": "1111111f11111100",
    "I": "0e04040404040e00", "J": "0702020202120c00", "K": "1112141814121100", "L": "1010101010101f00",
    "M": "111b151511111100", "N": "1111191513111100", "O": "0e11111111110e00", "P": "1e11111e10101000",
    "Q": "0e11111115120d00", "R": "1e11111e14121100", "S": "0f10100e01011e00", "T": "1f04040404040400",
    "U": "1111111111110e00", "V": "11111111110a0400", "W": "1111111515150a00", "X": "11110a040a111100",
    "Y": "11110a0404040400", "Z": "1f01020408101f00", "a": "00000e010f110f00", "b": "1010161911111e00",
    "c": "00000e1010110e00", "d": "01010d1311110f00", "e": "00000e111f100e00", "f": "0609081c08080800",
    "g": "00000f11110f010e", "h": "1010161911111100", "i": "04000c0404040e00", "j": "020006020202120c",
    "k": "1010121418141200", "l": "0c04040404040e00", "m": "00001a1515111100", "n": "0000161911111100",
    "o": "00000e1111110e00", "p": "00001e11111e1010", "q": "00000f11110f0101", "r": "0000161910101000",
    "s": "00000f100e011e00", "t": "08081c0808090600", "u": "0000111111130d00", "v": "00001111110a0400",
    "w": "0000111115150a00", "x": "0000110a040a1100", "y": "00001111110f010e", "z": "00001f0204081f00",
    "0": "0e11131519110e00", "1": "040c040404040e00", "2": "0e11010204081f00", "3": "1f02040201110e00",
    "4": "02060a121f020200", "5": "1f101e0101110e00", "6": "0608101e11110e00", "7": "1f01020408080800",
    "8": "0e11110e11110e00", "9": "0e11110f01020c00", " ": "0000000000000000", "!": "0404040404000400",
    "\"": "0a0a0a0000000000", "#": "0a0a1f0a1f0a0a00", "$": "040f140e051e0400", "%": "1819020408130300",
    "&": "0c12140815120d00", "'": "0404040000000000", "(": "0204080808040200", ")": "0804020202040800",
    "*": "0004150e15040000", "+": "0004041f04040000", ",": "000000000c0c0408", "-": "0000000e00000000",
    ".": "00000000000c0c00", "/": "0001020408100000", ":": "000c0c000c0c0000", ";": "000c0c000c0c0408",
    "<": "0204081008040200", "=": "00001f001f000000", ">": "0804020102040800", "?": "0e11010204000400",
    "@": "0e11171517100e00", "[": "0e08080808080e00", "\\": "0010080402010000", "]": "0e02020202020e00",
    "^": "040a110000000000", "_": "000000000000001f", "`": "0804000000000000", "{": "0304040804040300",
    "|": "0404040404040400", "}": "1804040204041800", "~": "0000081502000000",
}
_BOX_HEX = "1f11111111111f00"  # any character without a glyph

FONT_CHARS = "".join(_FONT_HEX)
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 8
ADVANCE = GLYPH_WIDTH + 1  # glyph plus one column of spacing


def _glyph_bits(code: str) -> np.ndarray:
    rows = np.array([int(code[i:i + 2], 16) for i in range(0, 2 * GLYPH_HEIGHT, 2)])
    return ((rows[:, None] >> np.arange(GLYPH_WIDTH - 1, -1, -1)) & 1).astype(bool)


_GLYPHS = np.stack([_glyph_bits(code) for code in [*_FONT_HEX.values(), _BOX_HEX]])  # (n + 1, 8, 5)
_INDEX = {char: i for i, char in enumerate(_FONT_HEX)}
_BOX = len(_FONT_HEX)


def _check_scale(scale: int) -> int:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"text scale must be a whole number >= 1, not {scale!r}")
    return int(scale)


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of ``text`` drawn at ``scale`` (0 for an empty string)."""
    return max(len(text) * ADVANCE - 1, 0) * _check_scale(scale)


def text_height(scale: int = 1) -> int:
    """Height in pixels of a line of text at ``scale`` (descenders included)."""
    return GLYPH_HEIGHT * _check_scale(scale)


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Boolean (text_height, text_width) image of ``text``: True where the font has ink."""
    scale = _check_scale(scale)
    if not text:
        return np.zeros((text_height(scale), 0), bool)
    glyphs = _GLYPHS[[_INDEX.get(char, _BOX) for char in text]]                   # (n, 8, 5)
    cells = np.pad(glyphs, ((0, 0), (0, 0), (0, ADVANCE - GLYPH_WIDTH)))           # (n, 8, 6)
    mask = cells.transpose(1, 0, 2).reshape(GLYPH_HEIGHT, -1)[:, :-(ADVANCE - GLYPH_WIDTH)]
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def draw_text(rgb: np.ndarray, text: str, x: int, y: int, colour: Sequence[int] = TEXT_COLOUR, scale: int = 1,
              vertical: bool = False) -> int:
    """Write ``text`` into the (H, W, 3) array ``rgb`` in place, its top-left corner at column ``x``, row ``y``.

    Pixels outside the image are dropped (text may start at negative coordinates). ``vertical`` turns the text
    90 degrees anticlockwise (read bottom to top, as a y-axis label), its bounding box still starting at (x, y).
    Returns the column just right of the text (``vertical``: the row just below it).
    """
    if rgb.ndim != 3:
        raise ValueError(f"draw_text needs an (H, W, 3) image, not shape {rgb.shape}")
    mask = text_mask(text, scale)
    if vertical:
        mask = np.rot90(mask)
    x, y = int(round(x)), int(round(y))
    h, w = mask.shape
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, rgb.shape[1]), min(y + h, rgb.shape[0])
    if x1 > x0 and y1 > y0:
        region = rgb[y0:y1, x0:x1]
        region[mask[y0 - y:y1 - y, x0 - x:x1 - x]] = np.asarray(colour, dtype=rgb.dtype)[:rgb.shape[2]]
    return y + h if vertical else x + w


def fit_text(text: str, max_width: int, scale: int, min_scale: int = 1) -> tuple[str, int]:
    """``(text, scale)`` to draw within ``max_width`` pixels: the largest scale from ``scale`` down to
    ``min_scale`` at which it fits, else at ``min_scale`` the longest start of it followed by ".." that fits
    (possibly "")."""
    for s in range(_check_scale(scale), _check_scale(min_scale) - 1, -1):
        if text_width(text, s) <= max_width:
            return text, s
    s = min(scale, min_scale)
    for n in range(len(text) - 1, 0, -1):
        if text_width(text[:n].rstrip() + "..", s) <= max_width:
            return text[:n].rstrip() + "..", s
    return ("..", s) if text_width("..", s) <= max_width else ("", s)


def _centred(rgb: np.ndarray, text: str, y: int, scale: int, x0: int = 0, x1: int | None = None,
             colour: Sequence[int] = TEXT_COLOUR) -> None:
    x1 = rgb.shape[1] if x1 is None else x1
    draw_text(rgb, text, x0 + (x1 - x0 - text_width(text, scale)) // 2, y, colour, scale)


# -- legend --------------------------------------------------------------------------------------------------------
def _legend_band(entries: Sequence[tuple[Sequence[int], str]], width: int, scale: int, swatch: str) -> np.ndarray:
    """White (h, width, 3) band with one entry per (colour, name): a swatch ("square" or "line") and the name;
    entries run left to right, wrap onto further rows, and each row is centred."""
    if not entries:
        return np.full((0, width, 3), 255, np.uint8)
    th = text_height(scale)
    swatch_w = th if swatch == "square" else 2 * th
    gap, sep, pad = 2 * scale + 1, 4 * scale + 6, 2
    names = [fit_text(name, max(width - swatch_w - gap - 2 * pad, 0), scale, scale)[0] for _, name in entries]
    widths = [swatch_w + gap + text_width(name, scale) for name in names]
    rows: list[list[int]] = [[]]
    for i, w in enumerate(widths):
        used = sum(widths[j] + sep for j in rows[-1])
        if rows[-1] and used + w > width - 2 * pad:
            rows.append([])
        rows[-1].append(i)
    row_h = th + 2 * scale + 2
    band = np.full((len(rows) * row_h + pad, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        x = (width - (sum(widths[i] for i in row) + sep * (len(row) - 1))) // 2
        y = pad + r * row_h
        for i in row:
            colour = np.asarray(entries[i][0], np.uint8)
            if swatch == "square":  # 7 font rows high (capital height), dark outline so pale colours show
                side = 7 * scale
                band[y:y + side, x:x + side] = 60
                band[y + 1:y + side - 1, x + 1:x + side - 1] = colour
            else:
                mid = y + (7 * scale) // 2
                band[mid - 1:mid + 2, x:x + swatch_w] = colour
            draw_text(band, names[i], x + swatch_w + gap, y, TEXT_COLOUR, scale)
            x += widths[i] + sep
    return band


# -- montage -------------------------------------------------------------------------------------------------------
def _grey(slice2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice2d, [1, 99])
    g = np.clip((slice2d - lo) / (hi - lo + 1e-9), 0, 1) * 255
    return np.repeat(g[..., None], 3, axis=2)


def _heat(slice2d: np.ndarray) -> np.ndarray:
    """0..1 -> black-red-yellow-white."""
    v = np.clip(slice2d, 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1) * 255


def _labels(slice2d: np.ndarray, under: np.ndarray | None) -> np.ndarray:
    colours = LABEL_COLOURS[np.asarray(slice2d, dtype=np.int64) % len(LABEL_COLOURS)]
    if under is None:
        return colours
    fg = (slice2d > 0)[..., None]
    return np.where(fg, 0.55 * colours + 0.45 * under, under)


def label_colour(value: int) -> tuple[int, int, int]:
    """The colour of label ``value`` in montages (and their legend)."""
    r, g, b = LABEL_COLOURS[int(value) % len(LABEL_COLOURS)]
    return int(r), int(g), int(b)


def save_montage(panels: list[tuple[str, np.ndarray, str]], path: str | Path, background: np.ndarray | None = None,
                 scale: int = 3, title: str | None = None,
                 legend: Mapping[int, str] | Sequence[tuple[int, str]] | None = None, text_scale: int = 2) -> Path:
    """Write panels side by side as a PNG, each under its title, with an optional overall title and label legend.

    Args:
        panels: (title, 2D array, kind) with kind "grey", "labels" (overlaid on ``background``) or "heat" (0..1).
        background: 2D grey slice under label panels.
        scale: pixels per array element.
        title: drawn centred above everything.
        legend: label value -> name (or (value, name) pairs): a colour swatch and the name per label, below
            the panels.
        text_scale: font scale of the panel titles and legend (the overall title is one larger).

    Layout, top to bottom: the title band (only with ``title``; ``text_height(text_scale + 1) + 8`` rows), the
    panel title band (only if a panel has a title; ``text_height(text_scale) + 8`` rows), the panels (each its
    array times ``scale``, framed in grey, in a 4-pixel margin; together as wide as the image) and the legend
    band (only with ``legend``; as many rows of entries as needed). Text that does not fit is drawn smaller (down to
    scale 1; panel titles all at one scale), then cut short with "..".
    """
    under = _grey(background) if background is not None else None
    tiles = []
    for _, array, kind in panels:
        if kind == "grey":
            tile = _grey(array)
        elif kind == "labels":
            tile = _labels(array, under)
        elif kind == "heat":
            tile = _heat(array)
        else:
            raise ValueError(f"unknown panel kind '{kind}'")
        tile = np.kron(tile, np.ones((scale, scale, 1)))
        tile = np.pad(tile, ((1, 1), (1, 1), (0, 0)), constant_values=160)  # a frame: white panels still show
        tiles.append(np.pad(tile, ((3, 3), (3, 3), (0, 0)), constant_values=255))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    body = np.concatenate(tiles, axis=1).astype(np.uint8)
    width = body.shape[1]
    bands = []
    if title:
        band = np.full((text_height(text_scale + 1) + 8, width, 3), 255, np.uint8)
        text, s = fit_text(title, width - 8, text_scale + 1)
        _centred(band, text, 4 + text_height(text_scale + 1) - text_height(s), s)
        bands.append(band)
    titles = [str(t) for t, _, _ in panels]
    if any(titles):
        band = np.full((text_height(text_scale) + 8, width, 3), 255, np.uint8)
        room = [t.shape[1] - 4 for t in tiles]
        s = next((s for s in range(text_scale, 0, -1)
                  if all(text_width(t, s) <= r for t, r in zip(titles, room))), 1)
        x = 0
        for text, tile, r in zip(titles, tiles, room):
            text, _ = fit_text(text, r, s, s)
            _centred(band, text, 4 + text_height(text_scale) - text_height(s), s, x, x + tile.shape[1])
            x += tile.shape[1]
        bands.append(band)
    bands.append(body)
    if legend:
        items = legend.items() if isinstance(legend, Mapping) else legend
        bands.append(_legend_band([(label_colour(v), str(n)) for v, n in items], width, text_scale, "square"))
    rgb = np.concatenate(bands, axis=0)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


# -- line chart ----------------------------------------------------------------------------------------------------
def _tick(value: float) -> str:
    return f"{value:g}"


def nice_ceiling(value: float) -> float:
    """``value`` rounded up to two significant digits (0.7277 -> 0.73, 2.43 -> 2.5); 1 for 0, NaN or less."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    step = 10.0 ** (np.floor(np.log10(value)) - 1)
    return float(round(np.ceil(value / step - 1e-9) * step, 12))


def line_chart(series: Sequence[tuple[Sequence[float], Sequence[float], Sequence[int], str | None]], width: int,
               height: int, title: str = "", xlabel: str = "", ylabel: str = "", xmax: float | None = None,
               ymax: float | None = None, text_scale: int = 1, title_scale: int = 2) -> np.ndarray:
    """(height, width, 3) uint8 image of line series on white, with title, legend, axes and axis labels.

    Args:
        series: (xs, ys, colour, name): points with a NaN y are left out; a series with one point is a dot. The
            first series is drawn on top; the legend lists those with a name and a point, in order.
        xmax, ymax: the axes run from 0 to these (defaults: the largest x; :func:`nice_ceiling` of 1.05 times
            the largest y); values outside are drawn at the edge. Tick labels at both ends of both axes.

    Layout: the title centred at the top, the legend below it, the plot under them, the x-axis tick labels and
    ``xlabel`` below the plot, the y-axis tick labels and ``ylabel`` (turned, read bottom to top) to its left.
    """
    pad, th = 4, text_height(text_scale)
    rgb = np.full((height, width, 3), 255, np.uint8)
    points = []
    for xs, ys, colour, name in series:
        xy = np.array([(float(x), float(y)) for x, y in zip(xs, ys)], dtype=float).reshape(-1, 2)
        points.append((xy[np.isfinite(xy).all(axis=1)], colour, name))
    all_xy = np.concatenate([p for p, _, _ in points]) if points else np.zeros((0, 2))
    if xmax is None:
        xmax = float(all_xy[:, 0].max()) if len(all_xy) else 1.0
    xmax = xmax if xmax > 0 else 1.0
    if ymax is None:
        ymax = nice_ceiling(1.05 * float(all_xy[:, 1].max())) if len(all_xy) else 1.0
    ymax = ymax if ymax > 0 else 1.0

    y = pad
    if title:
        text, s = fit_text(title, width - 2 * pad, title_scale)
        _centred(rgb, text, y + text_height(title_scale) - text_height(s), s)
        y += text_height(title_scale) + pad
    entries = [(colour, name) for xy, colour, name in points if name and len(xy)]
    band = _legend_band(entries, width - 2 * pad, text_scale, "line")
    rgb[y:y + band.shape[0], pad:width - pad] = band[:max(min(band.shape[0], height - y), 0)]
    y += band.shape[0]

    y_ticks = [_tick(0), _tick(ymax)]
    x_ticks = [_tick(0), _tick(xmax)]
    top = y + th // 2 + 2
    bottom = height - 1 - pad - (th + 2 if xlabel else 0) - th - 5
    left = pad + (th + 4 if ylabel else 0) + max(text_width(t, text_scale) for t in y_ticks) + 5
    right = width - 1 - pad - max(text_width(x_ticks[1], text_scale) // 2, 2)
    if right - left < 10 or bottom - top < 10:
        raise ValueError(f"a {width}x{height} chart has no room for its plot after the text")

    rgb[top, left:right + 1] = 225                       # light line at the top value
    rgb[bottom, left:right + 1] = 0                      # x axis
    rgb[top:bottom + 1, left] = 0                        # y axis
    rgb[bottom + 1:bottom + 4, [left, right]] = 0        # x ticks
    rgb[[top, bottom], left - 3:left] = 0                # y ticks
    ink = 7 * text_scale                                 # height of digits (no descenders)
    for text, ty in zip(y_ticks, (bottom, top)):
        draw_text(rgb, text, left - 5 - text_width(text, text_scale), ty - ink // 2, TEXT_COLOUR, text_scale)
    for text, tx in zip(x_ticks, (left, right)):
        draw_text(rgb, text, tx - text_width(text, text_scale) // 2, bottom + 5, TEXT_COLOUR, text_scale)
    if xlabel:
        _centred(rgb, xlabel, height - pad - th, text_scale, left, right + 1)
    if ylabel:
        length = text_width(ylabel, text_scale)
        draw_text(rgb, ylabel, pad, (top + bottom - length) // 2, TEXT_COLOUR, text_scale, vertical=True)

    for xy, colour, _ in reversed(points):
        if not len(xy):
            continue
        px = left + (right - left) * np.clip(xy[:, 0] / xmax, 0, 1)
        py = bottom - (bottom - top) * np.clip(xy[:, 1] / ymax, 0, 1)
        if len(xy) > 1:  # samples every half pixel along the polyline
            arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(px), np.diff(py)))])
            s = np.arange(0.0, arc[-1] + 0.5, 0.5)
            px, py, brush = np.interp(s, arc, px), np.interp(s, arc, py), 1
        else:
            brush = 2
        rows, cols = np.round(py).astype(int), np.round(px).astype(int)
        for dy in range(-brush, brush + 1):
            for dx in range(-brush, brush + 1):
                rgb[np.clip(rows + dy, 0, height - 1), np.clip(cols + dx, 0, width - 1)] = colour
    return rgb
