"""Drawing the report's figures with matplotlib from the plain rows that figures.py computes (a Plot: rows, title,
footnotes, labels), and laying each out so that no text is cut: constrained layout with the legend outside the axes,
the title and the footnote in bands above and below the area the layout fills, point labels where they overlap
nothing, and a figure that grows until every artist lies inside it (a long method name, many layer groups). What is drawn is what is saved: the figure is made at the saved dpi and
saved without bbox_inches, so the canvas a test measures is the file's.

matplotlib is imported only in pyplot(), when a figure is drawn, so that the tables work without it.
"""

from __future__ import annotations

import io
import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DPI = 200
WIDTH = 7.0  # inches: the text width of a two-column paper page
FONT = 8
METADATA = {
    "png": {"Software": "qpeft-bench-report"},
    "pdf": {"Creator": "qpeft-bench-report", "Producer": "qpeft-bench-report", "CreationDate": None},
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
BASELINE_GREY = "0.45"
# where a point's label goes, tried in this order: (offset in points, horizontal and vertical alignment)
LABEL_SPOTS = (
    ((5, 2), "left", "bottom"),
    ((5, -2), "left", "top"),
    ((-5, 2), "right", "bottom"),
    ((-5, -2), "right", "top"),
    ((0, 6), "center", "bottom"),
    ((0, -6), "center", "top"),
)
MIN_AXES = (2.2, 1.8)  # inches: an axes the layout squeezes below this gets a larger figure instead
PAD = 0.08  # inches between the title or footnote and the figure's edges
EDGE = 0.04  # inches that every artist keeps from the figure's edges


class MissingDependency(RuntimeError):
    """matplotlib is not installed (the figures need it; the tables do not)."""


@dataclass
class Plot:
    """What one figure shows: its data rows (also its CSV), title, footnotes (one paragraph each) and the display
    labels figures.py chose (a curve's label per run id, a tick label per bar group)."""

    rows: list[dict[str, Any]]
    title: str
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    x_label: str = ""
    x_log: bool = False


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependency("--figures needs matplotlib, which is not installed") from exc
    matplotlib.use("Agg")  # no display; also the same renderer everywhere
    matplotlib.rcParams.update(
        {
            "svg.hashsalt": "qpeft-bench",
            "pdf.compression": 6,
            "text.parse_math": False,  # a '$' in a method name or run id is text, not broken TeX
            "font.size": FONT,
            "axes.titlesize": FONT + 1,
            "figure.titlesize": FONT + 2,
            "legend.fontsize": FONT - 1,
        }
    )
    import matplotlib.pyplot as plt

    return plt


def wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def save(fig, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, metadata=METADATA[fmt], dpi=DPI)
    return buffer.getvalue()


# --------------------------------------------------------------------------- layout


def new_figure(plt, n_panels: int = 1, width: float = WIDTH, height: float = 3.2):
    ncols = min(2, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = plt.figure(figsize=(width, height * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def outside_legend(ax, handles: Sequence, headers: Sequence[str] = (), below: bool = False) -> None:
    """One legend outside ``ax`` (right of the top right panel, or below it for many long entries), which
    constrained layout makes room for (a figure legend would sit at the figure's top, over the title); ``headers``
    (entries without a symbol) are bold, so that one legend can say both what the colours and what the markers
    mean."""
    if below:
        where = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.18), "ncols": 2}
    else:
        where = {"loc": "upper left", "bbox_to_anchor": (1.02, 1), "ncols": math.ceil(len(handles) / 24)}
    legend = ax.legend(handles=handles, borderaxespad=0, frameon=False, **where)
    for text in legend.get_texts():
        if text.get_text() in headers:
            text.set_fontweight("bold")


def bands(fig) -> tuple[Any, Any]:
    """The title and the footnote: figure texts that fit() places in bands above and below the layout's area (so
    that an outside legend can never run into the title)."""
    title = fig.text(0.5, 1, "", ha="center", va="top", fontsize=FONT + 2)
    note = fig.text(0, 0, "", ha="left", va="bottom", fontsize=FONT - 1.5)
    return title, note


def fit(fig, plot: Plot, title, note) -> None:
    """Wrap title and footnote to the figure's width; then, while any artist comes closer than EDGE to the figure's
    border or the layout squeezed an axes below MIN_AXES, grow the figure by as much and lay it out again."""
    width, height = fig.get_size_inches()
    content = height * fig.get_layout_engine().get()["rect"][3]  # the bands of an earlier fit() left out
    for _ in range(12):
        top = _fill(fig, title, [plot.title], width, indent="")
        bottom = _fill(fig, note, plot.notes, width, indent="   ")
        # whole pixels, so that the canvas measured here is the saved image to the pixel
        width, height = (math.ceil(v * DPI - 1e-6) / DPI for v in (width, content + top + bottom))
        fig.set_size_inches(width, height)
        title.set_position((0.5, 1 - PAD / height))
        note.set_position((PAD / width, PAD / height))
        fig.get_layout_engine().set(rect=(0, bottom / height, 1, content / height))
        with warnings.catch_warnings():  # a collapsed layout is what the loop is there to fix
            warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
            fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        grow_w = max(0.0, EDGE - box.x0) + max(0.0, box.x1 - width + EDGE)
        grow_h = max(0.0, EDGE - box.y0) + max(0.0, box.y1 - height + EDGE)
        for ax in fig.axes:
            if ax.get_visible():
                pos = ax.get_position()
                grow_w = max(grow_w, MIN_AXES[0] - pos.width * width)
                grow_h = max(grow_h, MIN_AXES[1] - pos.height * height)
        if grow_w <= 0.005 and grow_h <= 0.005:
            return
        width += max(grow_w, 0.0) + 0.05 * (grow_w > 0)
        content += max(grow_h, 0.0) + 0.05 * (grow_h > 0)
    raise RuntimeError(f"figure {plot.title!r}: no size fits its text")  # not seen; better than a clipped figure


def _fill(fig, text, paragraphs: Sequence[str], width: float, indent: str) -> float:
    """Set ``text`` to the paragraphs wrapped to the figure's width (narrower until its extent fits); returns the
    height of its band (inches), 0 for no paragraphs."""
    if not paragraphs:
        text.set_text("")
        return 0.0
    renderer = fig.canvas.get_renderer()
    chars = int((width - 2 * PAD) * 72 / (text.get_fontsize() * 0.5))
    while True:
        text.set_text("\n".join(textwrap.fill(p, chars, subsequent_indent=indent) for p in paragraphs))
        extent = text.get_window_extent(renderer)
        if extent.width / fig.dpi <= width - 2 * PAD or chars <= 20:
            return extent.height / fig.dpi + 2 * PAD
        chars = int(chars * 0.95)


def draw(plt, name: str, plot: Plot):
    """The figure ``name`` of ``plot``, laid out and ready to save (or to measure)."""
    fig, place_labels = DRAW[name](plt, plot)
    title, note = bands(fig)
    fit(fig, plot, title, note)
    if place_labels is not None:  # point labels are placed where the laid-out points leave room, then fit again
        place_labels(fig)
        fit(fig, plot, title, note)
    return fig


# --------------------------------------------------------------------------- the figures


def _colours(plt, n: int) -> list:
    return list(plt.get_cmap("tab10" if n <= 10 else "tab20").colors)


def _header(plt, label: str):
    return plt.Line2D([], [], linestyle="none", label=label)


def draw_pareto(plt, plot: Plot):
    from matplotlib import ticker

    rows = plot.rows
    panels = list(dict.fromkeys((r["model"], r["data"]) for r in rows))
    quants = list(dict.fromkeys(str(r["quant"]) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    colour = dict(zip(quants, _colours(plt, len(quants)) * len(quants), strict=False))
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    fig, axes = new_figure(plt, len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        points = [r for r in rows if (r["model"], r["data"]) == panel]
        for p in points:
            c = colour[str(p["quant"])]
            yerr = None if p["low"] is None else [[p["y"] - p["low"]], [p["high"] - p["y"]]]
            ax.errorbar(
                [p["x"]],
                [p["y"]],
                yerr=yerr,
                fmt=marker[str(p["method"])],
                color=c,
                mfc="white" if p["marked"] else c,
                ms=6,
                capsize=2,
                elinewidth=0.8,
                zorder=3,
            )
            ax.annotate(
                wrap(plot.labels.get(p["key"], ""), 18),
                (p["x"], p["y"]),
                xytext=(5, 2),
                textcoords="offset points",
                fontsize=FONT - 2,
                va="bottom",
            )
        front = sorted((p["x"], p["y"]) for p in points if p["front"])
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color=BASELINE_GREY, ls="--", lw=0.9)
        ax.set_title(wrap(f"{panel[0]} · {panel[1]}", 45))
        ax.set_xlabel(plot.x_label)
        ax.set_ylabel("held-out perplexity after\n(lower is better)")
        if plot.x_log:
            ax.set_xscale("log")
            # the log axis' default labels are TeX ('$10^{4}$'), which text.parse_math=False prints verbatim
            ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
            xs = [p["x"] for p in points if p["x"] > 0]
            if xs and max(xs) < 8 * min(xs):  # within a decade there may be no major tick: label 2, 3 and 5 too
                ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2, 3, 5)))
                ax.xaxis.set_minor_formatter(ticker.EngFormatter(sep=""))
            else:
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.2, y=0.15)
    handles = [_header(plt, "quantizer (colour)")]
    handles += [plt.Line2D([], [], marker="s", ls="none", color=colour[q], label=wrap(q, 28)) for q in quants]
    handles += [_header(plt, "method (marker)")]
    handles += [plt.Line2D([], [], marker=marker[m], ls="none", color="0.3", label=wrap(m, 28)) for m in methods]
    handles += [plt.Line2D([], [], color=BASELINE_GREY, ls="--", label="Pareto front")]
    if any(r["marked"] for r in rows):
        handles += [plt.Line2D([], [], marker="o", ls="none", mfc="white", mec="0.3", label="† not full benchmark")]
    outside_legend(axes[min(2, len(axes)) - 1], handles, ("quantizer (colour)", "method (marker)"))
    return fig, _place_point_labels


def _place_point_labels(fig) -> None:
    """Each point's label at the first of LABEL_SPOTS where it stays inside its axes and overlaps no point, error bar
    or label placed before it (else where it overlaps fewest): points close together keep readable labels."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    half = fig.dpi * 4 / 72  # a marker's half size, in pixels
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text()]
        taken = []
        for label in labels:
            x, y = ax.transData.transform(label.xy)
            taken.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
        for bars in ax.collections:  # the error bars (LineCollections)
            for segment in getattr(bars, "get_segments", list)():
                (x0, y0), (x1, y1) = ax.transData.transform(segment[[0, -1]])
                taken.append(Bbox.from_extents(min(x0, x1) - 1, min(y0, y1), max(x0, x1) + 1, max(y0, y1)))
        frame = ax.get_window_extent(renderer)
        for label in labels:
            scores = []
            for offset, ha, va in LABEL_SPOTS:
                label.xyann = offset
                label.set(ha=ha, va=va)
                scores.append(_clashes(label.get_window_extent(renderer), frame, taken))
                if scores[-1] == 0:
                    break
            offset, ha, va = LABEL_SPOTS[scores.index(min(scores))]
            label.xyann = offset
            label.set(ha=ha, va=va)
            taken.append(label.get_window_extent(renderer))


def _clashes(box, frame, taken: Sequence) -> int:
    """How badly a label's box sits: the boxes it overlaps, and more than all of them when it leaves the axes."""
    outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
    return (len(taken) + 1) * outside + sum(box.overlaps(other) for other in taken)


def draw_layer_groups(plt, plot: Plot):
    rows = plot.rows
    groups = list(dict.fromkeys(r["group"] for r in rows))
    baseline = rows[0]["baseline"]
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != baseline]
    colour = dict(zip(settings, _colours(plt, len(settings)) * len(settings), strict=False))
    cell = {(r["group"], r["setting"]): r for r in rows}
    # bars no wider than 0.3 (one setting would fill the group), the figure wide enough for every group's bars
    width = min(0.8 / len(settings), 0.3)
    span = len(settings) * width / 2 + 0.08  # half the baseline line's length
    fig, (ax,) = new_figure(plt, width=max(5.5, 2.5 + len(groups) * (0.3 + 0.3 * len(settings))), height=3.4)
    top = 0.0
    for i, group in enumerate(groups):
        base = cell.get((group, baseline))
        if base is not None:
            if base["low"] is not None:
                ax.fill_between([i - span, i + span], base["low"], base["high"], color=BASELINE_GREY, alpha=0.25, lw=0)
            ax.hlines(base["mean"], i - span, i + span, colors="k", linestyles=":" if base["marked"] else "-", zorder=4)
            top = max(top, base["high"] if base["high"] is not None else base["mean"])
        for j, setting in enumerate(settings):
            hit = cell.get((group, setting))
            if hit is None:
                continue
            x = i + (j - (len(settings) - 1) / 2) * width
            c = colour[setting]
            yerr = None if hit["low"] is None else [[hit["mean"] - hit["low"]], [hit["high"] - hit["mean"]]]
            ax.bar(
                x,
                hit["mean"],
                width * 0.9,
                color="white" if hit["marked"] else c,
                edgecolor=c,
                hatch="///" if hit["marked"] else None,
                yerr=yerr,
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
            high = hit["high"] if hit["high"] is not None else hit["mean"]
            top = max(top, high)
            mark = ("*" if hit["significant"] else "") + ("†" if hit["marked"] else "")
            if mark:
                ax.annotate(mark, (x, high), xytext=(0, 1), textcoords="offset points", ha="center", va="bottom")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xticks(range(len(groups)), [wrap(plot.labels.get(g, g), 16) for g in groups])
    ax.set_ylabel("held-out perplexity after\n(lower is better)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[s], label=wrap(s, 28)) for s in settings]
    if any((group, baseline) in cell for group in groups):
        handles += [plt.Line2D([], [], color="k", label=f"{baseline} (baseline)")]
    outside_legend(ax, [_header(plt, "layer groups"), *handles], ("layer groups",))
    return fig, None


def draw_losses(plt, plot: Plot):
    runs = list(dict.fromkeys(r["run_id"] for r in plot.rows))
    below = len(runs) > 12  # a long legend goes below the axes, in two columns
    colours = _colours(plt, len(runs))
    styles = ("-", "--", ":", "-.")
    fig, (ax,) = new_figure(plt)
    for i, run_id in enumerate(runs):
        pts = [r for r in plot.rows if r["run_id"] == run_id]
        ax.plot(
            [p["step"] for p in pts],
            [p["loss"] for p in pts],
            color=colours[i % len(colours)],
            ls=styles[(i // len(colours)) % len(styles)],
            lw=1.0,
            label=wrap(plot.labels[run_id], 55 if below else 40),
        )
    ax.set_xlabel("training step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("training loss\n(mean token cross-entropy, nats)")
    handles, _ = ax.get_legend_handles_labels()
    outside_legend(ax, handles, below=below)
    return fig, None


DRAW: dict[str, Callable[[Any, Plot], Any]] = {
    "by_layer_group": draw_layer_groups,
    "pareto": draw_pareto,
    "loss_curves": draw_losses,
}
