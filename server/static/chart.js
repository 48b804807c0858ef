// The live chart: the active checkpoint's guard figures over time, with the rules' lines.
//
// Reads GET /checkpoints/{name}/guard/history (server/history.py) and draws plain SVG: one polyline
// per figure on a 0-1 axis (every figure is a ratio or a probability), a dashed line per rule in the
// colour of the figure it reads, a shaded band where the guard said collapsed. Hand-written: the page
// works offline and loads nothing from another origin, so no charting library. app.js calls
// refreshChart(name) on every poll. Strings from the server go in as text only (textContent).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 640, height: 260, left: 40, right: 12, top: 12, bottom: 28 };
// figure -> [label, series class (its colour, style.css)]; figures the server adds later draw in grey
const SERIES = {
  unique_ratio: ["unique ratio", "s-unique"],
  near_unique_ratio: ["near-unique ratio", "s-near"],
  top_mode_share: ["top mode share", "s-top"],
  grounding_r1: ["grounding R@1", "s-r1"],
  siglip_mean: ["SigLIP mean", "s-siglip"],
  repeat_probability: ["repeat probability", "s-repeat"],
  content_unique_ratio: ["content-unique ratio", "s-content"],
  degenerate_share: ["looping share", "s-loop"],
};

function svg(tag, attrs = {}, children = []) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  node.append(...children);
  return node;
}

const seriesOf = (figure) => SERIES[figure] || [figure.replaceAll("_", " "), "s-other"];

/** Draw `history` (the endpoint's JSON) into the <svg id="guard-chart"> and its legend. */
function drawChart(history) {
  const target = document.getElementById("guard-chart");
  const legend = document.getElementById("chart-legend");
  const points = Array.isArray(history.points) ? history.points : [];
  const figures = Array.isArray(history.figures) ? history.figures.filter((f) => typeof f === "string") : [];
  const { width, height, left, right, top, bottom } = CHART;
  const plotW = width - left - right, plotH = height - top - bottom;
  const first = points.length ? points[0].captions_seen : 0;
  const last = points.length ? points[points.length - 1].captions_seen : 1;
  const span = Math.max(last - first, 1);
  const x = (seen) => left + (points.length > 1 ? ((seen - first) / span) * plotW : plotW);
  const y = (value) => top + (1 - Math.min(Math.max(value, 0), 1)) * plotH;

  const layers = [svg("rect", { class: "plot", x: left, y: top, width: plotW, height: plotH })];
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    layers.push(svg("line", { class: "grid", x1: left, x2: left + plotW, y1: y(tick), y2: y(tick) }));
    const label = svg("text", { class: "tick", x: left - 6, y: y(tick) + 4, "text-anchor": "end" });
    label.textContent = tick.toFixed(2);
    layers.push(label);
  }
  // collapsed stretches: a band from each collapsed point to the next point
  points.forEach((p, i) => {
    if (p.status !== "collapsed") return;
    const x0 = x(p.captions_seen), x1 = i + 1 < points.length ? x(points[i + 1].captions_seen) : x0 + 2;
    layers.push(svg("rect", { class: "collapsed-band", x: x0, y: top, width: Math.max(x1 - x0, 2), height: plotH }));
  });
  const rules = Array.isArray(history.rules) ? history.rules : [];
  for (const rule of rules) {
    if (typeof rule.value !== "number") continue;
    const [label, cls] = seriesOf(String(rule.figure));
    const line = svg("line", { class: `rule ${cls}`, "data-figure": String(rule.figure), x1: left,
      x2: left + plotW, y1: y(rule.value), y2: y(rule.value) });
    const title = svg("title");
    title.textContent = `${label} ${rule.kind === "max" ? "≤" : "≥"} ${rule.value}`;
    line.append(title);
    layers.push(line);
  }
  for (const figure of figures) {
    const coords = points.filter((p) => typeof p[figure] === "number")
      .map((p) => `${x(p.captions_seen).toFixed(1)},${y(p[figure]).toFixed(1)}`);
    if (!coords.length) continue;
    const cls = seriesOf(figure)[1];
    layers.push(coords.length > 1
      ? svg("polyline", { class: `series ${cls}`, "data-figure": figure, points: coords.join(" ") })
      : svg("circle", { class: `series ${cls}`, "data-figure": figure, cx: coords[0].split(",")[0],
        cy: coords[0].split(",")[1], r: 3 }));
  }
  const axis = svg("text", { class: "tick", x: left + plotW, y: height - 8, "text-anchor": "end" });
  axis.textContent = points.length ? `captions served: ${first} → ${last}` : "no captions yet";
  layers.push(axis);
  target.replaceChildren(...layers);
  target.dataset.points = String(points.length);

  legend.replaceChildren(...figures.map((figure) => {
    const [label, cls] = seriesOf(figure);
    const rule = rules.find((r) => r.figure === figure);
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch ${cls}`;
    item.append(swatch, rule ? `${label} (${rule.kind === "max" ? "≤" : "≥"} ${rule.value})` : label);
    return item;
  }));
}

/** Fetch and draw the history of checkpoint `name`; a checkpoint not loaded yet shows an empty chart. */
async function refreshChart(name) {
  const path = `/checkpoints/${String(name).split("/").map(encodeURIComponent).join("/")}/guard/history`;
  const note = document.getElementById("chart-note");
  try {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      drawChart({ points: [], figures: [], rules: [] });
      note.textContent = response.status === 404 ? `${name} is not loaded yet` : `history: HTTP ${response.status}`;
      return;
    }
    const history = await response.json();
    drawChart(history);
    note.textContent = `${name}: one point every ${history.every} caption(s), the last ${history.points.length}`;
  } catch (err) {
    note.textContent = `cannot read the history: ${err.message}`;
  }
}

window.capguardChart = { drawChart, refreshChart };
