"""Rendering a `DistillReport`: a plot of score against energy per inference, and a plain-text summary.

Theory: the choice a report explains is a trade-off between quality and cost on each class, so the plot puts each
candidate of each class at (predicted mJ per inference, score): x on a log scale (tiny students and class budgets
sit decades apart: 0.001 mJ against 400 mJ), one colour per class, the class's energy budget as a dashed vertical
line of the same colour, the chosen candidate ringed. The SVG is written by hand (no matplotlib in a worker), with
every point a `<circle class="point">` carrying data- attributes, so tests and scripts can read it back as XML.
The JSON itself is `report.to_dict()`; the models live in `protos/distill.py`.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape, quoteattr

from edgefleet.protos.distill import DistillReport

# Tableau-10: distinguishable in colour and in greyscale print order.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
WIDTH, HEIGHT = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 40, 60  # margins: the legend sits in the right one


def _x_range(values: list[float]) -> tuple[float, float]:
    positive = [v for v in values if v > 0]
    if not positive:
        return -3.0, 0.0
    lo, hi = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    return float(lo), float(hi if hi > lo else lo + 1)


def _y_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    lo = min(lo, hi - 0.05)  # at least a 5-point spread, so near-equal scores do not fill the axis with noise
    pad = (hi - lo) * 0.08
    return max(lo - pad, -1.0 if lo < 0 else 0.0), min(hi + pad, 1.0) if hi <= 1 else hi + pad


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    step = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=magnitude)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_svg(report: DistillReport) -> str:
    """An SVG document: score (y) against predicted mJ per inference (x, log) per candidate and class."""
    classes = list(report.classes.items())
    mj_values = [c.predicted_mj for _, r in classes for c in r.candidates]
    budgets = [r.budgets.mj_per_inference for _, r in classes if r.budgets.mj_per_inference]
    x_lo, x_hi = _x_range(mj_values + budgets)
    y_lo, y_hi = _y_range([c.score for _, r in classes for c in r.candidates])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(mj: float) -> float:
        v = math.log10(max(mj, 10 ** x_lo))
        return LEFT + (v - x_lo) / (x_hi - x_lo) * plot_w

    def py(score: float) -> float:
        return TOP + plot_h - (score - y_lo) / (y_hi - y_lo) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(report.model_name)}: {escape(report.metric)} against mJ per inference</title>",
           f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="14">{escape(report.model_name)}: candidates per class</text>']
    # Axes and ticks.
    out.append(f'<g class="axes" stroke="#333"><line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" '
               f'y2="{TOP + plot_h}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/></g>')
    out.append('<g class="xticks">')
    for e in range(int(x_lo), int(x_hi) + 1):
        x = px(10.0 ** e)
        out.append(f'<line x1="{x:.1f}" y1="{TOP + plot_h}" x2="{x:.1f}" y2="{TOP + plot_h + 5}" stroke="#333"/>'
                   f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{10.0 ** e:g}</text>')
    out.append("</g><g class=\"yticks\">")
    for t in _nice_ticks(y_lo, y_hi):
        y = py(t)
        out.append(f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#333"/>'
                   f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append("</g>")
    out.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 18}" text-anchor="middle">'
               "predicted mJ per inference (log scale)</text>")
    out.append(f'<text transform="translate(18 {TOP + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f"{escape(report.metric.split(' on ')[0])}</text>")
    # Budget lines, then points, so points stay on top.
    for i, (name, result) in enumerate(classes):
        colour = PALETTE[i % len(PALETTE)]
        limit = result.budgets.mj_per_inference
        if limit:
            x = px(limit)
            out.append(f'<line class="budget" data-class={quoteattr(name)} x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" '
                       f'y2="{TOP + plot_h}" stroke="{colour}" stroke-dasharray="5 4"/>')
    for i, (name, result) in enumerate(classes):
        colour = PALETTE[i % len(PALETTE)]
        chosen = result.chosen.candidate if result.chosen else None
        for c in result.candidates:
            x, y = px(c.predicted_mj), py(c.score)
            label = (f"{name}: {c.candidate} {c.precision} {c.runtime}, score {c.score:.4f}, "
                     f"{c.predicted_mj:.3g} mJ, p95 {c.predicted_p95_ms:.3g} ms{'' if c.fits else ', does not fit'}")
            fill = colour if c.fits else "white"
            out.append(f'<circle class="point" data-class={quoteattr(name)} data-candidate={quoteattr(c.candidate)} '
                       f'cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{colour}" stroke-width="1.5">'
                       f"<title>{escape(label)}</title></circle>")
            if c.candidate == chosen:
                out.append(f'<circle class="chosen" data-class={quoteattr(name)} cx="{x:.1f}" cy="{y:.1f}" r="9" '
                           f'fill="none" stroke="{colour}" stroke-width="2.5"/>')
    # Legend.
    lx = WIDTH - RIGHT + 20
    out.append('<g class="legend">')
    rows = [(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(classes)]
    for k, (name, colour) in enumerate(rows):
        y = TOP + 10 + k * 18
        out.append(f'<circle cx="{lx}" cy="{y}" r="4" fill="{colour}"/>'
                   f'<text x="{lx + 10}" y="{y + 4}">{escape(name)}</text>')
    y = TOP + 10 + len(rows) * 18 + 8
    out.append(f'<circle cx="{lx}" cy="{y}" r="9" fill="none" stroke="#333" stroke-width="2.5"/>'
               f'<text x="{lx + 14}" y="{y + 4}">chosen</text>')
    out.append(f'<circle cx="{lx}" cy="{y + 22}" r="4" fill="white" stroke="#333"/>'
               f'<text x="{lx + 14}" y="{y + 26}">does not fit</text>')
    out.append(f'<line x1="{lx - 6}" y1="{y + 44}" x2="{lx + 6}" y2="{y + 44}" stroke="#333" '
               f'stroke-dasharray="5 4"/><text x="{lx + 14}" y="{y + 48}">mJ budget</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def summary_text(report: DistillReport) -> str:
    """A few lines per class for logs and the CLI: chosen (or nearest) with its figures and the reason."""
    t = report.teacher
    lines = [f"teacher: {t.size_bytes / 1e3:.1f} kB, macs {t.macs if t.macs is not None else 'n/a'}, "
             f"accuracy {t.accuracy if t.accuracy is not None else 'n/a'}; output read as {report.teacher_output_kind}"]
    for s in report.students:
        acc = f"{s.accuracy:.4f}" if s.accuracy is not None else "n/a"
        lines.append(f"  student {s.candidate}: {s.params} params, {s.macs} MACs, accuracy {acc}, "
                     f"agreement {s.agreement:.4f}, {s.epochs} epochs, {s.train_s:.1f} s")
    for name, r in report.classes.items():
        pick = r.chosen or r.nearest
        head = "chosen" if r.chosen else "NONE FITS; nearest"
        if pick is None:
            lines.append(f"{name}: {r.reason}")
            continue
        lines.append(f"{name}: {head} {pick.candidate} {pick.precision}/{pick.runtime}, score {pick.score:.4f}, "
                     f"p95 {pick.predicted_p95_ms:.3g} ms, {pick.predicted_mj:.3g} mJ, {pick.size_bytes / 1e3:.1f} kB")
        lines.append(f"  why: {r.reason}")
        lines.append(f"  precision: {pick.precision_reason}")
    return "\n".join(lines)


__all__ = ["plot_svg", "summary_text"]
