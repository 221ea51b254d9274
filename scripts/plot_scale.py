#!/usr/bin/env python3
"""The scale probe of docs/EXPERIMENTS.md as one picture: ITT x4 (r-norm70) minus dense at equal
parameters, against training compute (parameters x training tokens), one line per corpus, from
the committed results files (issue 24, item 5). No third-party packages: writes an SVG.

    python3 scripts/plot_scale.py            # -> docs/img/scale_probe.svg

Each point: the mean of the per-seed paired differences; the bar is its 95% t-interval where
there are two seeds or more (one seed: no bar; with two seeds the t multiplier is 12.7).
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (corpus label, results file) in order of training compute along each line.
SOURCES = [
    ("State of the Union (char)", "docs/results/text-sotu-char-lr-sweep.json"),
    ("State of the Union (char)", "docs/results/text-sotu-char-small.json"),
    ("State of the Union (char)", "docs/results/text-sotu-char-small10m.json"),
    ("World English Bible (char)", "docs/results/text-web-char-recipe.json"),
    ("World English Bible (char)", "docs/results/text-web-char-small.json"),
    ("World English Bible (char)", "docs/results/text-web-char-small10m.json"),
]
VARIANT = "r-norm70"


def points():
    out = []
    for corpus, rel in SOURCES:
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            print(f"skipped (not there yet): {rel}", file=sys.stderr)
            continue
        d = json.load(open(path))
        row = next(r for r in d["rows"] if r["variant"] == VARIANT and r["setting"] == "top-k" and r.get("lr_scale", 1) == 1)
        vs = row["vs_dense"]
        # the tokens each run of the variant trained on, as the results file records them
        tokens = next(r["tokens"] for r in d["runs"] if r["variant"] == VARIANT)
        preset = "small" if "--preset small" in d["command"] else "tiny"
        out.append(
            {
                "corpus": corpus,
                "x": row["params"] * tokens,
                "y": vs["mean"],
                "ci": vs.get("ci95"),
                "n": vs["n"],
                "label": f"{preset}, {tokens / 1e6:.1f}M tok, {vs['n']} seed{'s' if vs['n'] > 1 else ''}",
            }
        )
    return out


def svg(pts):
    w, h, left, right, top, bottom = 900, 430, 80, 370, 40, 60
    xs = [math.log10(p["x"]) for p in pts]
    lo_x, hi_x = math.floor(min(xs) * 2) / 2 - 0.1, math.ceil(max(xs) * 2) / 2 + 0.1
    ys = [p["y"] + s * (p["ci"] or 0) for p in pts for s in (-1, 1)] + [0.0]
    lo_y, hi_y = min(ys) - 0.004, max(ys) + 0.004
    px = lambda lx: left + (lx - lo_x) / (hi_x - lo_x) * (w - left - right)
    py = lambda y: top + (hi_y - y) / (hi_y - lo_y) * (h - top - bottom)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">']
    s.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    s.append(f'<text x="{w / 2 - 60}" y="22" text-anchor="middle" font-size="14">ITT x4 (r-norm70) minus dense, equal parameters (nats; below 0 = ITT better)</text>')
    # axes and grid
    s.append(f'<line x1="{left}" y1="{py(0)}" x2="{w - right}" y2="{py(0)}" stroke="black" stroke-dasharray="4,3"/>')
    step = 0.005 if hi_y - lo_y < 0.05 else 0.01
    t = math.ceil(lo_y / step) * step
    while t <= hi_y:
        s.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" stroke="black"/>')
        s.append(f'<text x="{left - 8}" y="{py(t) + 4:.1f}" text-anchor="end">{t:+.3f}</text>')
        t += step
    for e in range(math.ceil(lo_x), math.floor(hi_x) + 1):
        s.append(f'<line x1="{px(e):.1f}" y1="{h - bottom}" x2="{px(e):.1f}" y2="{h - bottom + 4}" stroke="black"/>')
        s.append(f'<text x="{px(e):.1f}" y="{h - bottom + 18}" text-anchor="middle">1e{e}</text>')
    s.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>')
    s.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>')
    s.append(f'<text x="{(left + w - right) / 2}" y="{h - 15}" text-anchor="middle">parameters x training tokens (log scale)</text>')
    corpora = list(dict.fromkeys(p["corpus"] for p in pts))
    notes = []
    number = {id(p): i + 1 for i, p in enumerate(pts)}
    for ci, corpus in enumerate(corpora):
        c = colors[ci % len(colors)]
        line = [p for p in pts if p["corpus"] == corpus]
        coords = " ".join(f"{px(math.log10(p['x'])):.1f},{py(p['y']):.1f}" for p in line)
        s.append(f'<polyline points="{coords}" fill="none" stroke="{c}" stroke-width="2"/>')
        for p in line:
            x, y = px(math.log10(p["x"])), py(p["y"])
            if p["ci"]:
                s.append(f'<line x1="{x:.1f}" y1="{py(p["y"] - p["ci"]):.1f}" x2="{x:.1f}" y2="{py(p["y"] + p["ci"]):.1f}" stroke="{c}"/>')
            s.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{c}"/>')
            # a number beside the point; the right-hand list says what it is
            num = number[id(p)]
            s.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" fill="{c}" font-size="11" font-weight="bold">{num}</text>')
            ci_text = f" [{p['y'] - p['ci']:+.4f}, {p['y'] + p['ci']:+.4f}]" if p["ci"] else ""
            notes.append((c, f"{num}. {p['label']}: {p['y']:+.4f}{ci_text}"))
        s.append(f'<rect x="{w - right + 15}" y="{top + 20 * ci}" width="12" height="12" fill="{c}"/>')
        s.append(f'<text x="{w - right + 32}" y="{top + 20 * ci + 10}">{corpus}</text>')
    for i, (c, text) in enumerate(notes):
        s.append(f'<text x="{w - right + 15}" y="{top + 20 * len(corpora) + 20 + 16 * i}" fill="{c}" font-size="11">{text}</text>')
    s.append("</svg>")
    return "\n".join(s)


def main():
    pts = points()
    for p in pts:
        print(f"{p['corpus']:28} {p['label']:32} x {p['x']:.3g}  ITT - dense {p['y']:+.4f}" + (f" +- {p['ci']:.4f}" if p["ci"] else ""))
    out = os.path.join(ROOT, "docs/img/scale_probe.svg")
    with open(out, "w") as f:
        f.write(svg(pts))
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
