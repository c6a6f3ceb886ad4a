"""Figure helpers shared by every stage: the one place every figure's size and type sizes are set.

Every plot reads a stage's table; none recomputes numbers. Every stage draws its figures with
:func:`new_figure` and writes them with :func:`save_figure`, so each figure is drawn at the width
the report shows it at (``FIGURE_WIDTH_PX`` CSS pixels, ``PIXEL_RATIO`` image pixels per CSS
pixel) and no text in it is smaller than the report's body text (``BODY_FONT_PX``). The report's
template reads the same numbers (:func:`report_style`).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.text import Text

from .io import atomic_write

BODY_FONT_PX = 16          # the report's body text size (CSS px)
REPORT_WIDTH_PX = 1150     # the report's body width (CSS px)
FIGURE_WIDTH_PX = 1100     # every figure's displayed width: the body less a finding box's border and padding
PIXEL_RATIO = 1            # image pixels per CSS pixel (1: the PNG is shown at its natural size)
CSS_PX_PER_INCH = 96       # CSS: 1 in = 96 px = 72 pt
DPI = CSS_PX_PER_INCH * PIXEL_RATIO
FIGURE_WIDTH_IN = FIGURE_WIDTH_PX / CSS_PX_PER_INCH
MIN_FONT_PT = BODY_FONT_PX * 72 / CSS_PX_PER_INCH   # 12 pt: a point shown at 1 in = 72 pt is 4/3 CSS px
TITLE_FONT_PT = MIN_FONT_PT + 1

# what every figure is drawn with: nothing below the body text size
STYLE = {
    "font.size": MIN_FONT_PT,
    "axes.titlesize": TITLE_FONT_PT,
    "axes.labelsize": MIN_FONT_PT,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": TITLE_FONT_PT,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
}

# the PNG text chunks the report's browser test reads back
MIN_FONT_KEY = "behaviorlens:min_font_pt"
WIDTH_KEY = "behaviorlens:css_width_px"

# characters of body-size text that fit across a full-width figure (about 0.55 em a character),
# for wrapping titles and labels
CHARS_PER_WIDTH = int(FIGURE_WIDTH_PX / (0.55 * BODY_FONT_PX))


def report_style() -> dict[str, float]:
    """The sizes the report's template lays figures out with (the same numbers the figures use)."""
    return {"body_font_px": BODY_FONT_PX, "report_width_px": REPORT_WIDTH_PX, "figure_width_px": FIGURE_WIDTH_PX,
            "pixel_ratio": PIXEL_RATIO}


def new_figure(nrows: int = 1, ncols: int = 1, height: float = 4.5, **kwargs):
    """``plt.subplots`` at the report's figure width (``height`` in inches), with the report's type
    sizes and a constrained layout (so the saved PNG is exactly the report's width)."""
    with plt.rc_context(STYLE):
        return plt.subplots(nrows, ncols, figsize=(FIGURE_WIDTH_IN, height), layout="constrained", **kwargs)


def wrap(text: str, share: float = 1.0) -> str:
    """Break ``text`` into lines that fit ``share`` of a figure's width at the body text size."""
    return "\n".join(textwrap.wrap(text, max(10, int(CHARS_PER_WIDTH * share)))) if text else text


def tick_step(n: int, room_px: float) -> int:
    """Label every how-many-th of ``n`` ticks so body-size labels (side by side, or rotated a
    quarter turn) fit along ``room_px`` CSS pixels of axis."""
    pitch = 1.5 * BODY_FONT_PX
    return max(1, math.ceil(n * pitch / max(room_px, pitch)))


def min_font_pt(fig: plt.Figure) -> float:
    """The smallest size (pt) of any visible, non-empty text in the figure (as last drawn)."""
    sizes = [t.get_fontsize() for t in _texts(fig)]
    return min(sizes) if sizes else float("inf")


def _texts(fig: plt.Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _at_least_body_size(fig: plt.Figure) -> None:
    """Raise every text below the body size to it: tick labels through their axis (so ticks made
    at draw time follow), every other text directly."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for which, ticks in (("major", axis.get_major_ticks()), ("minor", axis.get_minor_ticks())):
                if any(t.label1.get_fontsize() < MIN_FONT_PT or t.label2.get_fontsize() < MIN_FONT_PT
                       for t in ticks):
                    axis.set_tick_params(which=which, labelsize=MIN_FONT_PT)
    for text in _texts(fig):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it (every stage's plots end here).

    The figure is set to the report's width and every text in it to at least the body text size;
    it is laid out by its layout engine (constrained, from :func:`new_figure`), never cropped to a
    tight bounding box, so the PNG is exactly ``FIGURE_WIDTH_PX * PIXEL_RATIO`` pixels wide. The
    smallest type size drawn and the width it is meant to be shown at go into the PNG's text chunks.
    """
    with plt.rc_context(STYLE):
        fig.set_size_inches(FIGURE_WIDTH_IN, fig.get_figheight())
        if fig.get_layout_engine() is None:  # a figure not made by new_figure: tight layout (constrained
            fig.set_layout_engine("tight")     # cannot take over colorbars already made without it)
        fig.canvas.draw()  # makes the tick labels, so they can be checked
        _at_least_body_size(fig)
        fig.canvas.draw()
        metadata = {MIN_FONT_KEY: f"{min_font_pt(fig):g}", WIDTH_KEY: str(FIGURE_WIDTH_PX)}
        out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata))
    plt.close(fig)
    return out
