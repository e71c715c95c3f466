"""Plots drawn with Pillow (no plotting dependency): the sweep's scatter panels and the training
curves (loss and learning rate per stage). Axes get rounded ticks (1, 2, 2.5 or 5 times a power of
ten), the title and the y-axis label each have a line of their own, and no text leaves the picture.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dalle2.core.images import draw_text, save_image_atomic, text_width

COLOURS = ("navy", "darkorange", "seagreen", "purple", "firebrick", "teal")


def nice_ticks(lo: float, hi: float, n: int = 6) -> tuple[list[float], int]:
    """About n rounded tick values spanning [lo, hi] (the first <= lo, the last >= hi) and the
    number of decimals that prints them exactly: nice_ticks(0.103, 0.352) -> [0.1, 0.15, ..., 0.4]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks needs finite bounds, got {lo}, {hi}")
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n - 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    mult = next(m for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    step = mult * mag
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if mult == 2.5 else 0))
    return [round(k * step, decimals) for k in range(first, last + 1)], decimals


def _fmt_tick(v: float, decimals: int) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.2g}"
    return f"{v:.{decimals}f}"


class _Axes:
    """One panel at x offset `ox` of a (w, h) cell: frame, title, labels, ticks and a data->pixel map."""

    def __init__(self, draw, font, ox: int, size: tuple[int, int], panel: dict, xs: list, ys: list,
                 pad_data: bool = True):
        self.draw, self.font = draw, font
        w, h = size
        self.cell = (ox, ox + w)
        line_h = font.getbbox("Ag")[3] + 4
        # scatter points get a margin so none sits on the frame; curves span exactly their data
        pad = (lambda lo, hi: (hi - lo) * 0.08 or abs(hi) * 0.1 or 0.5) if pad_data else (lambda lo, hi: 0.0)
        xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        self.xticks, xd = nice_ticks(xlo - pad(xlo, xhi), xhi + pad(xlo, xhi))
        self.yticks, yd = nice_ticks(ylo - pad(ylo, yhi), yhi + pad(ylo, yhi))
        ylabels = [_fmt_tick(v, yd) for v in self.yticks]
        left = 10 + max(text_width(t, font) for t in ylabels)
        top, bottom, right = 8 + 2 * line_h + 4, 2 * line_h + 12, 16
        self.x0, self.y0, self.x1, self.y1 = ox + left, top, ox + w - right, h - bottom
        self.xlo, self.xhi, self.ylo, self.yhi = self.xticks[0], self.xticks[-1], self.yticks[0], self.yticks[-1]
        draw_text(draw, (ox + 8, 6), panel.get("title", ""), font, "black")  # title, then y label below it
        draw_text(draw, (ox + 8, 6 + line_h), panel.get("ylabel", ""), font, "dimgray")
        draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline="black")
        xlabel = panel.get("xlabel", "")
        draw_text(draw, (self._fit(ox + (w - text_width(xlabel, font)) / 2, xlabel), h - line_h - 4), xlabel,
                  font, "black")
        for v, text in zip(self.yticks, ylabels):
            y = self.sy(v)
            draw.line([self.x0 - 3, y, self.x0, y], fill="black")
            draw.text((self.x0 - 6 - text_width(text, font), y - line_h / 2 + 1), text, fill="gray", font=font)
        for v in self.xticks:
            x, text = self.sx(v), _fmt_tick(v, xd)
            draw.line([x, self.y1, x, self.y1 + 3], fill="black")
            draw.text((self._fit(x - text_width(text, font) / 2, text), self.y1 + 5), text, fill="gray", font=font)

    def _fit(self, x: float, text: str) -> float:
        """x moved so that `text` starting there stays inside the panel's cell."""
        lo, hi = self.cell
        return min(max(x, lo + 2), hi - 2 - text_width(text, self.font))

    def sx(self, v: float) -> float:
        return self.x0 + (v - self.xlo) / (self.xhi - self.xlo) * (self.x1 - self.x0)

    def sy(self, v: float) -> float:
        return self.y1 - (v - self.ylo) / (self.yhi - self.ylo) * (self.y1 - self.y0)

    def label(self, x: float, y: float, text: str, colour) -> None:
        """A point's label right of it, or left of it where it would cross the frame's right edge."""
        px, py = self.sx(x), self.sy(y)
        width = text_width(text, self.font)
        tx = px + 6 if px + 6 + width <= self.x1 - 2 else px - 6 - width
        draw_text(self.draw, (self._fit(tx, text), py - 6), text, self.font, colour)


def _finite(*vals) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


def scatter_plot(panels: list[dict], path: str | os.PathLike, size=(460, 360)) -> Path:
    """Side-by-side scatter panels. Each panel: {"title", "xlabel", "ylabel", "points": [(x, y, label)],
    "highlight": index or None, "lines": [[index, ...], ...] (points joined in that order, e.g. by
    guidance scale)}. Points with a NaN coordinate are left out (indices still refer to the list)."""
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for p_i, panel in enumerate(panels):
        pts = panel["points"]
        ok = [i for i, (x, y, _) in enumerate(pts) if _finite(x, y)]
        ax = _Axes(draw, font, p_i * w, size, panel, [pts[i][0] for i in ok], [pts[i][1] for i in ok])
        for line in panel.get("lines") or []:
            xy = [(ax.sx(pts[i][0]), ax.sy(pts[i][1])) for i in line if i in ok]
            if len(xy) > 1:
                draw.line(xy, fill="lightsteelblue", width=2)
        for i in ok:
            x, y, lab = pts[i]
            hot = i == panel.get("highlight")
            r, colour = (5, "red") if hot else (3, "navy")
            draw.ellipse([ax.sx(x) - r, ax.sy(y) - r, ax.sx(x) + r, ax.sy(y) + r], fill=colour)
            ax.label(x, y, lab, colour)
    return save_image_atomic(img, path)


def line_plot(panels: list[dict], path: str | os.PathLike, size=(460, 300)) -> Path:
    """Side-by-side line panels. Each panel: {"title", "xlabel", "ylabel", "series": [{"label",
    "points": [(x, y), ...]}]}; non-finite points are skipped, a legend names the series."""
    w, h = size
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for p_i, panel in enumerate(panels):
        series = [[(x, y) for x, y in s["points"] if _finite(x, y)] for s in panel["series"]]
        ax = _Axes(draw, font, p_i * w, size, panel, [x for s in series for x, _ in s],
                   [y for s in series for _, y in s], pad_data=False)
        for k, (spec, pts) in enumerate(zip(panel["series"], series)):
            colour = COLOURS[k % len(COLOURS)]
            xy = [(ax.sx(x), ax.sy(y)) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            elif xy:
                draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
            if spec.get("label") and len(panel["series"]) > 1:
                text = spec["label"]
                draw_text(draw, (ax.x1 - 6 - text_width(text, font), ax.y0 + 4 + 12 * k), text, font, colour)
    return save_image_atomic(img, path)


def training_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike, stage: str) -> Path | None:
    """OUT/<stage>/loss.png from OUT/<stage>/metrics.jsonl: the training loss (mean over each
    log_every window) and the learning rate against the step. None while nothing is logged."""
    import json
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    rows = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or torn by a crash: the resume that follows drops it too
            continue
    rows = [r for r in rows if isinstance(r, dict) and "loss" in r and "step" in r]
    if not rows:
        return None
    return line_plot([
        {"title": f"{stage}: training loss", "xlabel": "step", "ylabel": "loss (mean per log interval)",
         "series": [{"label": "train", "points": [(r["step"], r["loss"]) for r in rows]}]},
        {"title": f"{stage}: learning rate", "xlabel": "step", "ylabel": "lr",
         "series": [{"label": "lr", "points": [(r["step"], r["lr"]) for r in rows if "lr" in r]}]},
    ], out_path)
