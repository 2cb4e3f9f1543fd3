// Device page: facts, live charts (latency, FPS, CPU, temperature), input drift and the device's recent events.
import { ago, api, esc, labels, listOf, live, num, setTitle, short, state, tickAges, when } from "./common.js";
import { configPanel } from "./config.js";

const WINDOWS = [[300, "5 min"], [900, "15 min"], [3600, "1 h"], [6 * 3600, "6 h"], [86400, "24 h"]];
const MAX_POINTS = 5000; // per chart; older points fall off the left
// Columns of a live sample: [ts, p50, p95, fps, cpu, temperature] (dashboard.py `_sample`).
const FIELDS = ["ts", "latency_p50_ms", "latency_p95_ms", "fps", "cpu_percent", "temperature_c"];
const CHARTS = [
  { id: "latency", title: "Latency (ms)", series: [[1, "p50", "#2563eb"], [2, "p95", "#93c5fd"]] },
  { id: "fps", title: "Frames per second", series: [[3, "fps", "#16a34a"]] },
  { id: "cpu", title: "CPU (%)", series: [[4, "cpu", "#d97706"]] },
  { id: "temperature", title: "Temperature (°C)", series: [[5, "°C", "#dc2626"]], optional: true },
];

let uPlotReady = null;
function loadUPlot() {
  // Loaded only here, so the fleet page does not parse a chart library it does not use.
  uPlotReady ||= new Promise((resolve, reject) => {
    const css = document.createElement("link");
    css.rel = "stylesheet";
    css.href = "/static/vendor/uplot/uPlot.min.css";
    document.head.append(css);
    const script = document.createElement("script");
    script.src = "/static/vendor/uplot/uPlot.iife.min.js";
    script.onload = () => resolve(window.uPlot);
    script.onerror = () => reject(new Error("could not load the chart library"));
    document.head.append(script);
  });
  return uPlotReady;
}

/** Telemetry rows from the API (a list of samples, or columns keyed by field) as [ts, p50, p95, fps, cpu, temp]. */
function toRows(data) {
  const body = data && !Array.isArray(data) && data.ts === undefined ? data.samples || data.telemetry || data.items || data : data;
  if (body && !Array.isArray(body) && Array.isArray(body.ts)) {
    return body.ts.map((_, i) => FIELDS.map((f) => (body[f] ? body[f][i] : null)));
  }
  return listOf(body).map((s) => (Array.isArray(s) ? s : FIELDS.map((f) => s[f] ?? null)));
}

function facts(d) {
  const reported = d.reported || {};
  const update = reported.update || {};
  const items = [
    ["Status", state(d.online ? "online" : "offline")],
    ["Last seen", `<span data-ts="${Number(d.last_seen) || 0}">${ago(d.last_seen)}</span>`],
    ["Bundle", esc(d.bundle_label || "–") + (d.bundle_id ? ` <code>${esc(short(d.bundle_id))}</code>` : "")],
    ["Update", update.state ? state(update.state) + (update.detail ? ` <span class="muted">${esc(update.detail)}</span>` : "") : "–"],
    ...modelHealth(reported.shadow, d.health || {}),
    ["Profile", esc(d.profile || "–")],
    ["Agent", esc(d.agent_version || "–")],
    ["Runtimes", esc((d.runtimes || []).join(", ") || "–")],
    ["Labels", labels(d.labels) || "–"],
    ["Desired rev", esc(d.desired_rev ?? "–") + (reported.rev !== undefined ? ` (reported ${esc(reported.rev)})` : "")],
    ["First seen", when(d.first_seen)],
  ];
  return items.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
}

/** Facts rows for the active bundle's health and the shadow beside it (docs/health.md). */
function modelHealth(shadowState, health) {
  const rows = [];
  const model = health.model;
  if (model) {
    const errors = model.inferences ? `${num((100 * model.errors) / (model.inferences + model.errors), 2)}% errors` : "";
    rows.push(["Model health", `<span id="model-health">${esc(model.inferences)} inferences · p95 ${num(model.latency_p95_ms, 3)} ms · ${errors}</span>`]);
  }
  if (shadowState) {
    const bundle = shadowState.bundle || {};
    rows.push(["Shadow", `${esc(`${bundle.name}@${bundle.version}`)} ${state(shadowState.state)} <span class="muted">${esc(shadowState.detail || "")}</span>`]);
  }
  const shadow = health.shadow;
  if (shadowState && shadow && shadow.bundle === (shadowState.bundle || {}).id) {
    const agreement = shadow.agreement === null || shadow.agreement === undefined ? "–" : `${num(100 * shadow.agreement, 1)}%`;
    const latency = `shadow p95 ${num(shadow.latency_p95_ms, 3)} ms vs active ${num(shadow.active_p95_ms, 3)} ms`;
    const last = (shadow.disagreements || []).slice(-1)[0];
    const example = last ? ` · last disagreement: active ${esc(last.active)}, shadow ${esc(last.shadow)}` : "";
    rows.push(["Agreement", `<span id="agreement">${agreement}</span> <span class="muted">${esc(shadow.metric)} on ${esc(shadow.samples)} inputs · ${latency}${example}</span>`]);
  }
  if (health.drift) rows.push(["Drift", `<span id="drift">${num(health.drift.score, 3)}</span> <span class="muted">PSI over ${esc(health.drift.samples)} inputs, highest on ${esc(health.drift.feature)}</span>`]);
  return rows;
}

// Recent results: classes by name where the bundle has labels (edgekit compile --labels), else by index.
const className = (c) => esc(c.name ?? `class ${c.label}`);
function resultText(summary) {
  if (summary.top) return summary.top.map((s) => `${className(s)} <span class="muted">${num(s.score * 100)}%</span>`).join(" · ");
  if (summary.detections) {
    return summary.detections.map((d) => `${className(d)} <span class="muted">${num(d.score, 2)}</span>`).join(" · ") || "no detections";
  }
  return `<span class="muted">${(summary.values || []).length} values</span>`;
}
const resultRow = (r) => `<tr data-seq="${esc(r.seq)}"><td>${when(r.ts)}</td><td>${esc(r.bundle)}</td>
  <td class="num">${num(r.latency_ms, 3)}</td><td>${resultText(r.summary || {})}</td></tr>`;

/** A table of the device's newest results at the end of the page, reloaded every 5 s. */
function recentResults(main, id) {
  main.insertAdjacentHTML("beforeend", `<h2>Recent results</h2><div class="table-wrap"><table id="results">
    <thead><tr><th>Time</th><th>Bundle</th><th class="num">Latency ms</th><th>Result</th></tr></thead><tbody></tbody></table></div>`);
  const body = main.querySelector("#results tbody");
  const load = async () => {
    const rows = await api(`/api/devices/${encodeURIComponent(id)}/results?limit=20`);
    body.innerHTML = listOf(rows).map(resultRow).join("") || '<tr><td colspan="4" class="muted">No results yet.</td></tr>';
  };
  const reload = () => load().catch((error) => console.warn("results:", error));
  reload();
  setInterval(reload, 5000);
}

// Input drift: PSI of the device's last inputs against its bundle's calibration data (docs/health.md). Conventional
// bands; the hub's alert threshold is its own setting (edgekit hub --drift-threshold).
const driftBand = (score) => (score < 0.1 ? "stable" : score < 0.25 ? "moderate shift" : "large shift");

/** A chart of the device's drift score over the chosen window and its current value, polled every 5 s. */
function driftChart(main, id, uPlot, windowSelect) {
  main.querySelector(".grid").insertAdjacentHTML("afterend", `<div class="card chart" id="chart-drift" data-points="0">
    <h3>Input drift (PSI) <span id="drift-now" class="muted">no figure yet</span></h3></div>`);
  const el = main.querySelector("#chart-drift");
  const now = el.querySelector("#drift-now");
  const plot = new uPlot({
    width: Math.max(300, el.clientWidth - 32), height: 180, scales: { x: { time: true }, y: { range: (_, min, max) => [0, Math.max(0.3, max)] } },
    series: [{}, { label: "drift", stroke: "#7c3aed", width: 1.5, spanGaps: true }], axes: [{}, { size: 50 }], legend: { live: false },
  }, [[], []], el);
  window.__driftChart = plot;
  new ResizeObserver(() => plot.setSize({ width: Math.max(300, el.clientWidth - 32), height: 180 })).observe(el);
  let points = [];
  const load = async (since) => {
    const rows = listOf(await api(`/api/devices/${encodeURIComponent(id)}/telemetry?since=${since.toFixed(3)}&limit=${MAX_POINTS}`));
    const horizon = Date.now() / 1000 - Number(windowSelect.value);
    points = points.concat(rows.filter((r) => r.drift_score !== null && r.drift_score !== undefined).map((r) => [r.ts, r.drift_score]))
      .filter(([ts]) => ts >= horizon).slice(-MAX_POINTS);
    plot.setData([points.map((p) => p[0]), points.map((p) => p[1])]);
    el.dataset.points = points.length;
    const newest = points[points.length - 1];
    if (newest) now.textContent = `now ${num(newest[1], 3)}: ${driftBand(newest[1])}`;
    return rows.length ? rows[rows.length - 1].ts : since;
  };
  let last = 0;
  const reload = (since) => load(since).then((ts) => (last = ts)).catch((error) => console.warn("drift:", error));
  const fromWindowStart = () => { points = []; return reload(Date.now() / 1000 - Number(windowSelect.value)); };
  windowSelect.addEventListener("change", fromWindowStart);
  setInterval(() => reload(last), 5000);
  return fromWindowStart();
}

const eventRow = (e) =>
  `<tr><td>${when(e.ts)}</td><td>${state(e.level)}</td><td><code>${esc(e.type)}</code></td><td>${esc(e.message)}</td></tr>`;

export async function render(main, id) {
  setTitle(id);
  main.innerHTML = `
    <div class="toolbar">
      <h1 class="grow"><a href="/">Fleet</a> / ${esc(id)}</h1>
      <label class="muted">window <select id="window">${WINDOWS.map(([s, t]) => `<option value="${s}"${s === 900 ? " selected" : ""}>${t}</option>`).join("")}</select></label>
    </div>
    <dl id="facts" class="card facts"></dl>
    <h2>Telemetry</h2>
    <div class="grid">${CHARTS.map((c) => `<div class="card chart" id="chart-${c.id}" data-points="0"><h3>${c.title}</h3></div>`).join("")}</div>
    <h2>Events</h2>
    <div class="table-wrap"><table id="events"><thead><tr><th>Time</th><th>Level</th><th>Type</th><th>Message</th></tr></thead><tbody></tbody></table></div>`;
  const factsEl = main.querySelector("#facts");
  const windowSelect = main.querySelector("#window");
  const events = main.querySelector("#events tbody");
  const path = `/api/devices/${encodeURIComponent(id)}`;

  const [device, uPlot] = await Promise.all([api(path), loadUPlot()]);
  factsEl.innerHTML = facts(device);
  tickAges(factsEl);
  const config = configPanel(factsEl, id, device.labels).catch((error) => console.warn("config:", error));

  let rows = [];
  const charts = CHARTS.map((c) => {
    const el = main.querySelector(`#chart-${c.id}`);
    const options = {
      width: Math.max(300, el.clientWidth - 32), height: 180,
      scales: { x: { time: true } },
      series: [{}, ...c.series.map(([, label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: true }))],
      axes: [{}, { size: 50 }],
      legend: { live: false },
    };
    return { spec: c, el, plot: new uPlot(options, [[], ...c.series.map(() => [])], el) };
  });
  window.__charts = charts.map((c) => c.plot);
  new ResizeObserver(() => {
    for (const c of charts) c.plot.setSize({ width: Math.max(300, c.el.clientWidth - 32), height: 180 });
  }).observe(main.querySelector(".grid"));

  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const horizon = Date.now() / 1000 - Number(windowSelect.value);
      rows = rows.filter((r) => r[0] >= horizon).slice(-MAX_POINTS);
      const xs = rows.map((r) => r[0]);
      for (const c of charts) {
        const columns = c.spec.series.map(([col]) => rows.map((r) => r[col]));
        // Many devices have no temperature sensor: no empty chart for them.
        if (c.spec.optional) c.el.hidden = !columns.some((values) => values.some((v) => v !== null));
        c.plot.setData([xs, ...columns]);
        c.el.dataset.points = xs.length;
      }
    });
  };

  const loadWindow = async () => {
    const since = Date.now() / 1000 - Number(windowSelect.value);
    const data = await api(`${path}/telemetry?since=${since.toFixed(3)}&limit=${MAX_POINTS}`);
    const fetched = toRows(data).sort((a, b) => a[0] - b[0]);
    // Keep live samples that arrived while the window loaded.
    const last = fetched.length ? fetched[fetched.length - 1][0] : 0;
    rows = fetched.concat(rows.filter((r) => r[0] > last));
    redraw();
  };
  windowSelect.addEventListener("change", loadWindow);

  const loadEvents = async () => {
    const data = await api(`/api/events?device=${encodeURIComponent(id)}&limit=100`);
    events.innerHTML = listOf(data, "events").map(eventRow).join("");
  };

  live((message) => {
    const delta = (message.devices || {})[id];
    if (delta) {
      Object.assign(device, delta);
      if (delta.update_state) device.reported = { ...(device.reported || {}), update: { state: delta.update_state } };
      factsEl.innerHTML = facts(device);
    }
    const samples = (message.samples || {})[id];
    if (samples && samples.length) {
      rows.push(...samples);
      redraw();
    }
    for (const e of message.events || []) {
      if (e.device_id === id) events.insertAdjacentHTML("afterbegin", eventRow(e));
    }
  }, { device: id });
  recentResults(main, id);
  await Promise.all([config, loadWindow(), loadEvents().catch((error) => console.warn("events:", error)), driftChart(main, id, uPlot, windowSelect)]);
  document.body.dataset.ready = "device";
}
