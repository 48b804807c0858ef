// capguard's page: caption an upload, watch the active checkpoint's guard, list evaluations.
//
// It speaks only the JSON API of its own origin (POST /caption, GET /checkpoints,
// GET /checkpoints/{name}/guard, GET /evaluations; chart.js: GET /checkpoints/{name}/guard/history). Captions are untrusted (a model wrote them, maybe a
// collapsed one), so every string from the server goes into the page as text: el() and textContent,
// never innerHTML. The server's Content-Security-Policy forbids inline script on top of that.
"use strict";

const POLL_MS = 4000;          // live guard, checkpoints and evaluations refresh this often
const SHORT_HASH = 12;         // hex digits of a fingerprint or video hash shown (the full one is the tooltip)
const STATUSES = ["warming_up", "ok", "collapsed"];

// Window figures of a GuardState, in display order: [key, label, threshold key, comparison].
// A figure whose key is also a rule name ("unique_ratio", ...) is marked when that rule is tripped.
const FIGURES = [
  ["window_captions", "videos in window", null, null],
  ["unique_ratio", "unique ratio", "min_unique_ratio", "≥"],
  ["near_unique_ratio", "near-unique ratio", "min_near_unique_ratio", "≥"],
  ["top_mode_share", "top mode share", "max_top_mode_share", "≤"],
  ["grounding_r1", "grounding R@1", "min_grounding_r1", "≥"],
  ["grounding_margin", "grounding margin", null, null],
  ["repeat_probability", "repeat probability", null, null],
  ["siglip_mean", "SigLIP mean", null, null],
  ["content_unique_ratio", "content-unique ratio", "min_content_unique_ratio", "≥"],
  ["degenerate_share", "looping share", "max_degenerate_share", "≤"],
  ["vendi_score", "Vendi score", null, null],
];

const $ = (id) => document.getElementById(id);

/** A new element; props.text becomes its textContent, children are nodes or strings (text nodes). */
function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, String(value));
  }
  node.append(...children);
  return node;
}

// ------------------------------------------------------------------------------------------ formatting

const isNumber = (x) => typeof x === "number" && Number.isFinite(x);
const fixed = (x, digits) => (isNumber(x) ? x.toFixed(digits) : "–");
const percent = (x) => (isNumber(x) ? `${(100 * x).toFixed(1)} %` : "–");
const shortHash = (hex) => (typeof hex === "string" && hex ? hex.slice(0, SHORT_HASH) : "–");

function formatFigure(key, value) {
  if (key === "window_captions") return isNumber(value) ? String(value) : "–";
  return fixed(value, 3);
}

// ----------------------------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;   // HTTP status; 0 when the server did not answer
    this.code = code;       // the API's error code, e.g. "not_a_video"
  }
}

/** fetch + JSON; any failure becomes an ApiError with the API's own code and message when it sent one. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch (err) {
    throw new ApiError(0, "network_error", `the server did not answer (${err.message})`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && typeof body === "object" ? body.error : null;
    let message = error && typeof error.message === "string"
      ? error.message : `${response.status} ${response.statusText} ${text.slice(0, 200)}`.trim();
    const retry = response.headers.get("Retry-After");
    if (retry) message += ` (retry after ${retry} s)`;
    throw new ApiError(response.status, error && error.code ? String(error.code) : `http_${response.status}`,
      message);
  }
  if (body === null) throw new ApiError(response.status, "bad_response", `${path} did not answer JSON`);
  return body;
}

// --------------------------------------------------------------------------------------------- guard

function badge(status) {
  const known = STATUSES.includes(status) ? status : "unknown";
  return el("span", { class: `badge badge-${known}`, "data-status": known, text: status || "unknown" });
}

/** Fill `target` with a GuardState dict: badge, tripped rules, window figures against their lines and,
 * unless withModes is false, the window's most frequent captions. */
function renderGuard(target, guard, withModes = true) {
  const tripped = Array.isArray(guard.tripped) ? guard.tripped.map(String) : [];
  const thresholds = guard.thresholds && typeof guard.thresholds === "object" ? guard.thresholds : {};
  const videos = isNumber(guard.window_captions) ? guard.window_captions : 0;
  const summary = tripped.length
    ? el("span", { class: "tripped-rules", text: `rules tripped: ${tripped.join(", ")}` })
    : el("span", { class: "muted", text: guard.status === "warming_up"
      ? `no verdict yet: ${videos} ${videos === 1 ? "video" : "videos"} in the window` : "no rule tripped" });

  const rows = FIGURES.map(([key, label, lineKey, cmp]) => {
    const line = lineKey && isNumber(thresholds[lineKey]) ? `${cmp} ${thresholds[lineKey]}` : "";
    const clears = guard.clears_in && isNumber(guard.clears_in[key]) ? ` (clears in ${guard.clears_in[key]})` : "";
    return el("tr", { class: tripped.includes(key) ? "tripped" : null, "data-figure": key }, [
      el("th", { text: label }),
      el("td", { class: "num", text: formatFigure(key, guard[key]) }),
      el("td", { class: "muted", text: line + clears }),
    ]);
  });
  const table = el("table", { class: "figures guard-figures" }, [
    el("thead", {}, [el("tr", {}, [el("th", { text: "window figure" }), el("th", { text: "value" }),
      el("th", { text: "rule" })])]),
    el("tbody", {}, rows),
  ]);

  const parts = [el("p", { class: "guard-head" }, [badge(guard.status), " ", summary]), table];
  if (isNumber(guard.metrics_age) && guard.metrics_age > 0) {
    parts.push(el("p", { class: "muted small",
      text: `near-duplicate and grounding figures are ${guard.metrics_age} observations old` }));
  }
  const modes = withModes && Array.isArray(guard.modes) ? guard.modes : [];
  if (modes.length) {
    parts.push(el("h4", { text: "Most frequent captions in the window" }));
    parts.push(el("ol", { class: "modes" }, modes.map((mode) => el("li", {}, [
      el("span", { class: "mode-share", text: `${percent(mode.share)} · ${mode.count ?? "?"}×` }),
      el("span", { class: "mode-text", text: String(mode.representative ?? "") }),
    ]))));
  }
  target.replaceChildren(...parts);
}

// ------------------------------------------------------------------------------------------- caption

/** Show one POST /caption answer. */
function renderResult(body) {
  const caption = $("caption");
  caption.textContent = String(body.caption ?? "");
  caption.classList.toggle("empty", caption.textContent === "");   // CSS says "(empty caption)"

  $("result-checkpoint").textContent = String(body.checkpoint ?? "–");
  const fingerprint = $("result-fingerprint");
  fingerprint.textContent = shortHash(body.fingerprint);
  fingerprint.title = String(body.fingerprint ?? "");
  const video = $("result-video");
  video.textContent = shortHash(body.video_sha256);
  video.title = String(body.video_sha256 ?? "");
  $("result-siglip").textContent = body.scores ? fixed(body.scores.siglip, 4) : "–";
  $("result-decoding").textContent = formatDecoding(body.decoding);
  // under collapse_policy=fallback: the checkpoint asked for and the rules it tripped
  const fallback = body.fallback && typeof body.fallback === "object" ? body.fallback : null;
  $("result-fallback").textContent = fallback
    ? `asked for ${String(fallback.requested)}, collapsed (${(Array.isArray(fallback.reason) ? fallback.reason : []).join(", ")})`
    : "";
  $("result-fallback").hidden = $("result-fallback-term").hidden = fallback === null;

  const frames = body.frames || {};
  const indices = Array.isArray(frames.indices) ? frames.indices : [];
  const times = Array.isArray(frames.timestamps_s) ? frames.timestamps_s : [];
  $("frames-count").textContent = `(${frames.count ?? indices.length})`;
  $("frames").replaceChildren(...indices.map((index, i) => el("li", { "data-index": index }, [
    el("b", { text: `#${index}` }), ` ${fixed(times[i], 2)} s`,
  ])));

  const timings = body.timings_ms || {};
  const row = $("timings").tBodies[0].rows[0];
  row.replaceChildren(...["decode", "encode", "generate", "score", "total"].map(
    (stage) => el("td", { class: "num", "data-stage": stage, text: fixed(timings[stage], 1) })));

  // the modes are in the live panel next to it; here the verdict and its figures are enough
  if (body.guard && typeof body.guard === "object") renderGuard($("result-guard"), body.guard, false);
  else $("result-guard").replaceChildren(el("p", { class: "muted", text: "no guard in the answer" }));

  const result = $("result");
  result.hidden = false;
  result.dataset.state = "done";
}

/** "greedy" / "beam search ×3" / "sampled: temperature 1, top-p 0.9, seed 7" (+ repetition penalty). */
function formatDecoding(d) {
  if (!d || typeof d !== "object") return "–";
  const parts = [];
  if (d.do_sample) {
    parts.push(`sampled: temperature ${d.temperature}`);
    if (isNumber(d.top_p) && d.top_p < 1) parts.push(`top-p ${d.top_p}`);
    if (isNumber(d.top_k) && d.top_k > 0) parts.push(`top-k ${d.top_k}`);
    parts.push(`seed ${d.seed}`);
  } else {
    parts.push(isNumber(d.num_beams) && d.num_beams > 1 ? `beam search ×${d.num_beams}` : "greedy");
  }
  if (isNumber(d.repetition_penalty) && d.repetition_penalty !== 1) parts.push(`repetition penalty ${d.repetition_penalty}`);
  return parts.join(", ");
}

function showError(err) {
  $("error-code").textContent = err instanceof ApiError ? `${err.code} (${err.status || "no answer"}):` : "error:";
  $("error-message").textContent = err && err.message ? err.message : String(err);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-code").textContent = "";
  $("error-message").textContent = "";
}

async function submitCaption(event) {
  event.preventDefault();
  clearError();
  const file = $("video").files[0];
  if (!file) {
    showError(new ApiError(0, "no_file", "choose a video file first"));
    return;
  }
  const form = new FormData();
  const sample = $("do-sample").checked;   // the sampling fields go only with do_sample (the server's rule)
  const fields = { checkpoint: $("checkpoint").value, num_frames: $("num-frames").value,
    max_new_tokens: $("max-new-tokens").value, do_sample: sample ? "true" : "",
    temperature: sample ? $("temperature").value : "", seed: sample ? $("seed").value : "" };
  for (const [name, value] of Object.entries(fields)) {
    if (value !== "") form.append(name, value);   // empty = the server's default
  }
  form.append("video", file, file.name);

  $("submit").disabled = true;
  $("busy").hidden = false;
  $("result").dataset.state = "pending";
  try {
    renderResult(await api("/caption", { method: "POST", body: form }));
  } catch (err) {
    $("result").dataset.state = "error";
    showError(err);
  } finally {
    $("submit").disabled = false;
    $("busy").hidden = true;
  }
  refreshLive();   // the window just changed
}

// ------------------------------------------------------------------------------------- live panel

let guardEndpoint = true;   // false once the server says it has no GET /checkpoints/{name}/guard

function fillCheckpointSelect(checkpoints) {
  const select = $("checkpoint");
  const names = checkpoints.map((c) => String(c.name));
  const current = Array.from(select.options).slice(1).map((o) => o.value);
  if (names.join("\n") === current.join("\n")) return;   // unchanged: keep the user's open list alone
  const chosen = select.value;
  select.replaceChildren(select.options[0], ...names.map((name) => el("option", { value: name, text: name })));
  select.value = names.includes(chosen) ? chosen : "";
}

function renderCheckpoints(checkpoints) {
  const active = checkpoints.find((c) => c.active);
  $("checkpoint").options[0].textContent = active ? `active: ${active.name}` : "active checkpoint";
  $("checkpoints").tBodies[0].replaceChildren(...checkpoints.map((c) => el("tr", { class: c.active ? "active" : null }, [
    el("td", {}, [el("span", { text: String(c.name) }), c.active ? el("span", { class: "tag", text: "active" }) : "",
      c.error ? el("div", { class: "error-text small", text: String(c.error) }) : ""]),
    el("td", { text: c.projector_type ?? "–" }),
    el("td", { text: c.loaded ? shortHash(c.fingerprint) : "no", title: c.fingerprint ?? null }),
    el("td", {}, [c.guard_status ? badge(c.guard_status) : el("span", { class: "muted", text: "–" })]),
  ])));
}

async function activeGuard(active) {
  if (!guardEndpoint || !active.loaded) return null;
  try {
    return await api(`/checkpoints/${active.name.split("/").map(encodeURIComponent).join("/")}/guard`);
  } catch (err) {
    if (err.status === 404 && err.code === "not_found") guardEndpoint = false;   // an older server
    if (err.status === 404) return null;
    throw err;
  }
}

async function refreshLive() {
  const target = $("live-guard");
  try {
    const { checkpoints } = await api("/checkpoints");
    fillCheckpointSelect(checkpoints);
    renderCheckpoints(checkpoints);
    const active = checkpoints.find((c) => c.active);
    $("live-checkpoint").textContent = active ? String(active.name) : "";
    if (!active) {
      target.replaceChildren(el("p", { class: "muted", text: "no active checkpoint" }));
    } else {
      if (window.capguardChart) window.capguardChart.refreshChart(active.name);   // chart.js
      const guard = await activeGuard(active);
      if (guard) renderGuard(target, guard);
      else if (active.guard_status) target.replaceChildren(el("p", {}, [badge(active.guard_status)]));
      else target.replaceChildren(el("p", { class: "muted", text: `${active.name} is not loaded yet` }));
    }
    $("live-updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    target.replaceChildren(el("p", { class: "error-text", text: `cannot read the guard: ${err.message}` }));
  }
}

// ------------------------------------------------------------------------------------- evaluations

function formatProgress(progress) {
  if (isNumber(progress)) return progress <= 1 ? percent(progress) : String(progress);
  if (progress && typeof progress === "object" && isNumber(progress.done) && isNumber(progress.total)) {
    return `${progress.done} / ${progress.total}`;
  }
  return progress === undefined || progress === null ? "–" : JSON.stringify(progress);
}

function renderEvaluations(jobs) {
  const target = $("evaluations");
  if (!jobs.length) {
    target.replaceChildren(el("p", { class: "muted", id: "no-evaluations", text: "no evaluations" }));
    return;
  }
  target.replaceChildren(el("table", { class: "figures" }, [
    el("thead", {}, [el("tr", {}, ["id", "status", "progress", "report"].map((h) => el("th", { text: h })))]),
    el("tbody", {}, jobs.map((job) => {
      const id = String(job.id ?? "");
      const base = `/evaluations/${encodeURIComponent(id)}`;   // our own paths: no URL from the answer is used
      return el("tr", { "data-id": id }, [
        el("td", {}, [el("a", { href: base, text: id })]),
        el("td", {}, [el("span", { class: `status status-${typeof job.status === "string" && /^[a-z_]+$/.test(job.status) ? job.status : "other"}`,
          text: String(job.status ?? "–") })]),
        el("td", { class: "num", text: formatProgress(job.progress) }),
        el("td", {}, [el("a", { href: `${base}/report.html`, text: "report.html" })]),
      ]);
    })),
  ]));
}

async function refreshEvaluations() {
  try {
    const body = await api("/evaluations");
    const jobs = Array.isArray(body) ? body : body.evaluations || body.jobs || body.items || [];
    renderEvaluations(Array.isArray(jobs) ? jobs : []);
  } catch (err) {
    if (err.status === 404) renderEvaluations([]);   // the server has no evaluations endpoint
    else $("evaluations").replaceChildren(el("p", { class: "error-text", text: `cannot list evaluations: ${err.message}` }));
  }
}

// -------------------------------------------------------------------------------------------- start

async function poll() {
  await Promise.all([refreshLive(), refreshEvaluations()]);
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("caption-form").addEventListener("submit", submitCaption);
  poll();
});

window.capguard = { renderResult, renderGuard, showError };   // for the browser tests and the console
