"""Plots drawn with Pillow (the card's packages: no matplotlib): panels of marked series with error
bars, each panel a linear or logarithmic x axis. Used for docs/frontier.png (analyze.py
frontier)."""
import math

from PIL import Image, ImageDraw

from safety import write_atomic

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (23, 190, 207)]
PANEL, MARGIN = (440, 330), (58, 26, 34, 40)  # panel size; margins left, top, right, bottom


def ticks(lo, hi, log):
    """About five round tick values between lo and hi."""
    if log:
        return [v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= v <= hi]
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 5)
    return [step * k for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def panel(img, origin, title, xlabel, ylabel, series, logx=False, legend="top left"):
    """One panel at `origin`. series: [(label, [(x, y, y_lo, y_hi, tag)], connect)]; a point's
    interval is drawn as a vertical bar, its tag (if any) written beside it. legend: the corner
    that holds the series' labels ("top left", "top right", "bottom right", ...)."""
    draw = ImageDraw.Draw(img)
    x0, y0 = origin[0] + MARGIN[0], origin[1] + MARGIN[1] + 12
    w, h = PANEL[0] - MARGIN[0] - MARGIN[2], PANEL[1] - MARGIN[1] - MARGIN[3] - 12
    points = [p for _, pts, _ in series for p in pts]
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    xs = [fx(p[0]) for p in points]
    ys = [v for p in points for v in p[1:4]]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad, ypad = (xhi - xlo) * 0.08 or 0.5, (yhi - ylo) * 0.08 or 0.5
    xlo, xhi, ylo, yhi = xlo - xpad, xhi + xpad, ylo - ypad, yhi + ypad
    X = lambda v: x0 + (fx(v) - xlo) / (xhi - xlo) * w  # noqa: E731
    Y = lambda v: y0 + h - (v - ylo) / (yhi - ylo) * h  # noqa: E731
    draw.text((origin[0] + MARGIN[0], origin[1] + 4), title, fill="black")
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
    for v in ticks(10 ** xlo if logx else xlo, 10 ** xhi if logx else xhi, logx):
        draw.line([X(v), y0 + h, X(v), y0 + h + 4], fill="black")
        draw.text((X(v) - 6, y0 + h + 6), f"{v:g}", fill="black")
    for v in ticks(ylo, yhi, False):
        draw.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
        draw.text((x0 - 8 - draw.textlength(f"{v:g}"), Y(v) - 5), f"{v:g}", fill="black")
    draw.text((x0 + w / 2 - draw.textlength(xlabel) / 2, y0 + h + 20), xlabel, fill="black")
    draw.text((origin[0] + 4, y0 - 14), ylabel, fill="black")
    for k, (label, pts, connect) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if connect:
            draw.line([(X(p[0]), Y(p[1])) for p in pts], fill=colour, width=2)
        for x, y, lo, hi, tag in pts:
            draw.line([X(x), Y(lo), X(x), Y(hi)], fill=colour)
            draw.ellipse([X(x) - 3, Y(y) - 3, X(x) + 3, Y(y) + 3], fill=colour)
            if tag:
                draw.text((X(x) + 5, Y(y) - 12), tag, fill=colour)
    labels = [f"- {label}" for label, _, _ in series]
    lx = (x0 + 6 if "left" in legend
          else x0 + w - 6 - max(draw.textlength(t) for t in labels))
    ly = y0 + 4 if "top" in legend else y0 + h - 4 - 12 * len(labels)
    for k, text in enumerate(labels):
        draw.text((lx, ly + 12 * k), text, fill=COLOURS[k % len(COLOURS)])


def save_panels(panels, path, columns=2):
    """panels: [dict(title=, xlabel=, ylabel=, series=, logx=)], laid out `columns` wide, one
    PNG."""
    rows = math.ceil(len(panels) / columns)
    img = Image.new("RGB", (PANEL[0] * columns, PANEL[1] * rows), "white")
    for i, p in enumerate(panels):
        panel(img, ((i % columns) * PANEL[0], (i // columns) * PANEL[1]), **p)
    write_atomic(path, lambda f: img.save(f, format="PNG"))
