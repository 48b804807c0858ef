"""The evaluation report as one self-contained HTML page: tables, an inline SVG chart, the top modes.

    html_text = render_html(report)      # report: the dict capguard.models.evaluate.evaluate returns

Self-contained: no script, no stylesheet or font from elsewhere, and a Content-Security-Policy that
forbids both, so the page renders offline and from a file. Every string that comes from a model or a
file name (captions, checkpoint names, paths) goes through ``html.escape``: captions are model output and
must never become markup. Korean renders through a font list that names the usual CJK fonts before the
generic ``sans-serif``. The chart is hand-written SVG (no plotting library needed for bars and a line).
"""

from __future__ import annotations

import html
import math

FONTS = ('"Noto Sans CJK KR", "Noto Sans KR", "Source Han Sans KR", "NanumGothic", "Nanum Gothic", '
         '"Apple SD Gothic Neo", "Malgun Gothic", sans-serif')
# No script, no remote anything: even a caption that slipped past escaping could not run or fetch.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
HEALTHY_LINE = 0.5   # the field report's healthy diversity line (GuardThresholds.min_unique_ratio by default)

CSS = f"""
body {{ font-family: {FONTS}; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1b1f24; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #d8dee4; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }}
th {{ background: #f3f5f7; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
.collapsed {{ color: #b42318; font-weight: 600; }} .ok {{ color: #067647; font-weight: 600; }}
.warnings {{ background: #fff6e5; border-left: 4px solid #f79009; padding: 0.5rem 1rem; }}
.meta {{ color: #57606a; font-size: 0.85rem; }}
.mode {{ display: flex; gap: 0.6rem; align-items: baseline; margin: 0.15rem 0; }}
.share {{ display: inline-block; height: 0.6rem; background: #4e79a7; }}
.share-box {{ width: 8rem; flex: none; background: #e9edf1; }}
code {{ font-size: 0.8rem; }}
"""


def _e(value) -> str:
    """Escape anything for HTML text or a quoted attribute: '<b>' -> '&lt;b&gt;', '"' -> '&quot;'."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 2) -> str:
    """0.0934 -> "0.09"; None or nan -> "-" (a metric that was not computed)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _verdict(row: dict) -> str:
    status = row.get("status") or "-"
    tripped = row.get("tripped") or []
    rules = f' <span class="meta">({_e(", ".join(tripped))})</span>' if tripped else ""
    return f'<span class="{_e(status)}">{_e(status)}</span>{rules}'


def main_table(rows: list[dict]) -> str:
    """The field report's table: Checkpoint | Unique captions | Diversity | SigLIP | ... | Representative
    caption, plus the near-duplicate, mode, grounding and verdict columns the report lacked."""
    head = ("Checkpoint", "Unique captions", "Diversity", "SigLIP", "Near-unique", "Top mode share",
            "Grounding R@1", "Content-unique", "Looping", "Verdict", "Representative caption")
    body = []
    for r in rows:
        body.append(
            "<tr>"
            f"<td>{_e(r['name'])}</td>"
            f"<td class=\"num\">{_e(r['unique'])}/{_e(r['n'])}</td>"
            f"<td class=\"num\">{_num(r['diversity'])}</td>"
            f"<td class=\"num\">{_num(r['siglip_mean'], 3)}</td>"
            f"<td class=\"num\">{_e(r['near_unique'])}/{_e(r['n'])}</td>"
            f"<td class=\"num\">{_num(r['top_mode_share'])}</td>"
            f"<td class=\"num\">{_num(r['grounding_r1'])}</td>"
            f"<td class=\"num\">{_num(r.get('content_unique_ratio'))}</td>"   # .get: reports older than the rules
            f"<td class=\"num\">{_num(r.get('degenerate_share'))}</td>"
            f"<td>{_verdict(r)}</td>"
            f"<td>&ldquo;{_e(r['top_mode'])}&rdquo;</td>"
            "</tr>")
    return _table(head, body, "main")


_DIGITS = {"bleu": 1, "chrf": 1, "repetition_stops": 0}   # decimals per detail column (default 3)


def detail_table(rows: list[dict]) -> str:
    """Every other figure per checkpoint; the reference columns only when some row has them."""
    columns = [("repeat_probability", "Repeat prob."), ("distinct_1", "Distinct-1"),
               ("distinct_2", "Distinct-2"), ("self_bleu", "Self-BLEU"), ("siglip_median", "SigLIP median"),
               ("grounding_margin", "Grounding margin"), ("vendi_score", "Vendi score")]
    for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("cider_d", "CIDEr-D"),
                       ("attribute_accuracy", "Attribute acc.")):
        if any(r.get(key) is not None for r in rows):
            columns.append((key, label))
    if any(r.get("repetition_stops") for r in rows):   # rows the stop_on_repetition option cut (a loop each)
        columns.append(("repetition_stops", "Repetition stops"))
    body = []
    for r in rows:
        cells = "".join(f"<td class=\"num\">{_num(r.get(k), _DIGITS.get(k, 3))}</td>"
                        for k, _ in columns)
        body.append(f"<tr><td>{_e(r['name'])}</td>{cells}"
                    f"<td><code>{_e((r.get('fingerprint') or '')[:12])}</code></td></tr>")
    return _table(("Checkpoint", *(label for _, label in columns), "Fingerprint"), body, "details")


def _table(head, body: list[str], css_id: str) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table id="{css_id}"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def chart_svg(rows: list[dict], healthy: float = HEALTHY_LINE, width: int = 760, height: int = 320) -> str:
    """Diversity bars (red when collapsed) with a near-unique tick, and a SigLIP line per checkpoint on one
    0-1 axis, with the dashed healthy line: the field report's E5-v3 chart. One ``class="bar"`` rect per
    checkpoint and one ``class="point"`` circle per checkpoint that has a SigLIP mean.

    Example: two rows -> an <svg> with 2 bars, up to 2 points, and the 0.5 line at
    y = top + 0.5 * plot height.
    """
    left, right, top, bottom = 48, 96, 28, 72
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(rows), 1)
    slot = plot_w / n
    bar_w = min(48.0, slot * 0.6)

    def y(value: float) -> float:
        return top + (1.0 - min(max(value, 0.0), 1.0)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" font-family=\'{_e(FONTS)}\' font-size="11">',
             "<title>Diversity and SigLIP per checkpoint</title>"]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#e5e9ee"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" fill="#57606a">'
                     f'{tick:.2f}</text>')
    points = []
    for i, r in enumerate(rows):
        cx = left + slot * (i + 0.5)
        diversity = r.get("diversity")
        if diversity is not None:
            colour = "#d1495b" if r.get("status") == "collapsed" else "#4e79a7"
            parts.append(f'<rect class="bar" data-checkpoint="{_e(r["name"])}" x="{cx - bar_w / 2:.1f}" '
                         f'y="{y(diversity):.1f}" width="{bar_w:.1f}" height="{y(0) - y(diversity):.1f}" '
                         f'fill="{colour}"><title>{_e(r["name"])}: diversity {_num(diversity)} '
                         f'({_e(r.get("unique"))}/{_e(r.get("n"))}), {_e(r.get("status"))}</title></rect>')
        near = r.get("near_unique_ratio")
        if near is not None:
            parts.append(f'<line class="near" x1="{cx - bar_w / 2 - 3:.1f}" x2="{cx + bar_w / 2 + 3:.1f}" '
                         f'y1="{y(near):.1f}" y2="{y(near):.1f}" stroke="#1b1f24" stroke-width="2">'
                         f'<title>{_e(r["name"])}: near-unique {_num(near)}</title></line>')
        siglip = r.get("siglip_mean")
        if siglip is not None:
            points.append((cx, y(siglip), r["name"], siglip))
        label = _e(r["name"] if len(r["name"]) <= 18 else r["name"][:17] + "…")
        parts.append(f'<text x="{cx:.1f}" y="{height - bottom + 14}" text-anchor="end" fill="#1b1f24" '
                     f'transform="rotate(-30 {cx:.1f} {height - bottom + 14})">{label}</text>')
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{yy:.1f}" for x, yy, _, _ in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#f28e2b" stroke-width="2"/>')
    for x, yy, name, value in points:
        parts.append(f'<circle class="point" data-checkpoint="{_e(name)}" cx="{x:.1f}" cy="{yy:.1f}" r="4" '
                     f'fill="#f28e2b"><title>{_e(name)}: SigLIP {_num(value)}</title></circle>')
    parts.append(f'<line class="healthy" x1="{left}" x2="{width - right}" y1="{y(healthy):.1f}" '
                 f'y2="{y(healthy):.1f}" stroke="#067647" stroke-dasharray="6 4" stroke-width="1.5"/>')
    parts.append(f'<text x="{width - right + 6}" y="{y(healthy) + 4:.1f}" fill="#067647">'
                 f'healthy {healthy:.2f}</text>')
    legend_y = 14
    parts.append(f'<rect x="{left}" y="{legend_y - 9}" width="12" height="10" fill="#4e79a7"/>'
                 f'<text x="{left + 16}" y="{legend_y}">diversity (unique / captions), ok</text>'
                 f'<rect x="{left + 205}" y="{legend_y - 9}" width="12" height="10" fill="#d1495b"/>'
                 f'<text x="{left + 221}" y="{legend_y}">collapsed</text>'
                 f'<line x1="{left + 290}" x2="{left + 306}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
                 f'stroke="#1b1f24" stroke-width="2"/>'
                 f'<text x="{left + 311}" y="{legend_y}">near-unique</text>'
                 f'<circle cx="{left + 392}" cy="{legend_y - 4}" r="4" fill="#f28e2b"/>'
                 f'<text x="{left + 401}" y="{legend_y}">SigLIP mean</text>')
    parts.append("</svg>")
    return "".join(parts)


def modes_section(rows: list[dict]) -> str:
    """The top near-duplicate modes of each checkpoint: what the model keeps saying, and how often."""
    blocks = []
    for r in rows:
        lines = []
        for m in r.get("modes") or []:
            width = max(0.0, min(1.0, m.get("share") or 0.0)) * 100
            variants = f", {m['variants']} variants" if (m.get("variants") or 1) > 1 else ""
            lines.append(f'<div class="mode"><span class="share-box"><span class="share" '
                         f'style="width:{width:.1f}%"></span></span><span class="meta">'
                         f'{_num(m.get("share"))} ({_e(m.get("count"))}{_e(variants)})</span>'
                         f'<span>&ldquo;{_e(m.get("caption"))}&rdquo;</span></div>')
        blocks.append(f"<details open><summary>{_e(r['name'])} &mdash; {_verdict(r)}</summary>"
                      f"{''.join(lines) or '<p class=meta>no captions</p>'}</details>")
    return "".join(blocks)


def render_html(report: dict) -> str:
    """The whole page for a report dict (see capguard.models.evaluate.build_report for its keys)."""
    rows = report.get("checkpoints") or []
    dataset = report.get("dataset") or {}
    run = report.get("run") or {}
    correlation = (report.get("correlation") or {}).get("siglip_mean_vs_diversity") or {}
    warnings = report.get("warnings") or []
    title = f"capguard evaluation: {dataset.get('source', '')}"
    evaluated = dataset.get("n_evaluated", dataset.get("n_videos"))
    meta = (f"{_e(evaluated)} of {_e(dataset.get('n_videos'))} videos from {_e(dataset.get('source'))} "
            f"({_e(dataset.get('kind'))}); references: {_e(dataset.get('references') or 'none')}; "
            f"{len(rows)} checkpoints; updated {_e(run.get('updated'))}")
    warning_html = ""
    if warnings:
        items = "".join(f"<li>{_e(w.get('message'))}</li>" for w in warnings)
        warning_html = f'<div class="warnings" id="warnings"><strong>Warnings</strong><ul>{items}</ul></div>'
    rho = correlation.get("rho")
    if rho is None and correlation.get("note"):
        correlation_html = (f"<p>Spearman rank correlation of SigLIP mean and diversity: {_e(correlation['note'])}"
                            ". Read the SigLIP-rose-while-diversity-fell warning instead.</p>")
    else:
        correlation_html = (f"<p>Spearman rank correlation of SigLIP mean and diversity across the "
                            f"{_e(correlation.get('n'))} checkpoints: <strong>{_num(rho)}</strong>. A negative "
                            "value means SigLIP rewards the checkpoints that repeat themselves (the field "
                            "report's trap).</p>")
    notes = "".join(f"<li><strong>{_e(k)}</strong>: {_e(v)}</li>"
                    for k, v in (run.get("metrics") or {}).items())
    thresholds = run.get("thresholds") or {}
    threshold_text = ", ".join(f"{_e(k)} {_e(v)}" for k, v in thresholds.items())
    return f"""<!DOCTYPE html>
<html lang="ko">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{_e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{meta}</p>
{warning_html}
<h2>Checkpoints</h2>
{main_table(rows)}
<h2>Diversity and SigLIP</h2>
{chart_svg(rows, thresholds.get("min_unique_ratio", HEALTHY_LINE))}
{correlation_html}
<h2>Top modes</h2>
{modes_section(rows)}
<h2>All figures</h2>
{detail_table(rows)}
<ul class="meta">{notes}</ul>
<p class="meta">Diversity = unique captions / captions (after normalization); near-unique counts
one-word variants once; a checkpoint is collapsed when any guard rule trips ({threshold_text}).</p>
</body>
</html>
"""


__all__ = ["chart_svg", "detail_table", "main_table", "modes_section", "render_html"]
