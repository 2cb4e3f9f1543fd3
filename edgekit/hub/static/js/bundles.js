// Bundles: what the registry holds, how many devices run each, which signing keys devices trust now, and each
// bundle's compile report (every candidate tried, how it measured) with its class names.
import { api, bytes, esc, listOf, num, setTitle, short, state, when } from "./common.js";

const percent = (value) => (value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`);

/** The float layers mixed precision kept to bring an int8 candidate within the accuracy budget. */
function mixedPrecision(details) {
  const mixed = (details || {}).mixed_precision;
  if (!mixed) return "–";
  return `<details><summary>${esc(mixed.float_layers)} of ${esc(mixed.quantized_layers)} layers in float</summary>
    ${(mixed.keep_float || []).map((layer) => `<code>${esc(layer)}</code>`).join("<br>")}</details>`;
}

function candidateRow(c) {
  const m = c.metrics || {};
  return `<tr><td>${esc(c.backend)}</td><td>${esc(c.precision)}</td><td>${state(c.status)}</td>
    <td class="num">${percent(m.accuracy)}</td><td class="num">${percent(m.top1_agreement)}</td>
    <td class="num">${num(m.cosine, 5)}</td><td class="num">${num(m.latency_p50_ms, 3)}</td>
    <td class="num">${num(m.latency_p95_ms, 3)}</td><td class="num">${m.model_bytes === undefined ? "–" : bytes(m.model_bytes)}</td>
    <td>${mixedPrecision(c.details)}</td><td class="muted">${esc(c.reason)}</td></tr>`;
}

function classNames(labels) {
  if (!labels || !labels.length) {
    return '<p id="class-names" class="muted">No class names: results carry class indices (compile with --labels to name them).</p>';
  }
  return `<h3>Class names (${labels.length})</h3>
    <div class="table-wrap tall"><ol id="class-names" start="0">${labels.map((name) => `<li>${esc(name)}</li>`).join("")}</ol></div>`;
}

function reportHtml(bundle, report) {
  const ref = report.reference || {};
  const facts = [
    ["Model", esc(report.model)],
    ["Profile", esc(report.profile)],
    ["Verified on", `${esc(report.host)} · ${esc(report.data)}`],
    ["Ranking", esc(report.ranking || "–")],
    ["fp32 reference", `p50 ${num(ref.latency_p50_ms, 3)} ms · ${bytes(ref.model_bytes)} · accuracy ${percent(ref.accuracy)}`],
  ];
  const warnings = (report.warnings || []).map((w) => `<li>${esc(w)}</li>`).join("");
  return `<div class="toolbar"><h2 class="grow">${esc(bundle.name)} ${esc(bundle.version)}: compile report</h2>
      <button data-close>Close</button></div>
    <dl class="facts">${facts.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>
    ${warnings ? `<ul class="muted">${warnings}</ul>` : ""}
    <div class="table-wrap"><table id="candidates">
      <thead><tr><th>Backend</th><th>Precision</th><th>Status</th><th class="num">Accuracy</th><th class="num">Top-1 agreement</th>
        <th class="num">Cosine</th><th class="num">p50 ms</th><th class="num">p95 ms</th><th class="num">Size</th>
        <th>Mixed precision</th><th>Reason</th></tr></thead>
      <tbody>${(report.candidates || []).map(candidateRow).join("")}</tbody>
    </table></div>
    ${classNames((bundle.manifest || {}).labels)}`;
}

/** Open one bundle's report in the panel; a later click wins over a report still loading. */
async function showReport(panel, id) {
  panel.hidden = false;
  panel.dataset.want = id;
  delete panel.dataset.ready;
  panel.innerHTML = '<p class="muted">Loading the compile report…</p>';
  history.replaceState(null, "", `#${id}`);
  const path = `/api/bundles/${encodeURIComponent(id)}`;
  let html;
  try {
    const [bundle, report] = await Promise.all([api(path), api(`${path}/report`)]);
    html = reportHtml(bundle, report);
  } catch (error) {
    html = `<p class="error">${esc(error.message)}</p>`;
  }
  if (panel.dataset.want !== id) return;
  panel.innerHTML = html;
  panel.dataset.ready = id;
  panel.scrollIntoView({ block: "start" });
}

export async function render(main) {
  setTitle("Bundles");
  const [bundleData, deviceData, trust] = await Promise.all([api("/api/bundles"), api("/api/devices"), api("/api/trust")]);
  const trusted = new Set(trust.bundle_keys);
  const running = new Map();
  for (const d of listOf(deviceData, "devices")) if (d.bundle_id) running.set(d.bundle_id, (running.get(d.bundle_id) || 0) + 1);
  const bundles = listOf(bundleData, "bundles").sort((a, b) => (b.uploaded || 0) - (a.uploaded || 0));
  const row = (b) => `<tr data-id="${esc(b.id)}">
      <td>${esc(b.name)}</td><td>${esc(b.version)}</td><td><code title="${esc(b.id)}">${esc(short(b.id))}</code></td>
      <td class="num">${bytes(b.size)}</td><td>${esc(b.profile)}</td><td>${esc(b.backend)}</td><td>${esc(b.precision)}</td>
      <td><code>${esc(short(b.signing_key_id, 16))}</code>${trusted.has(b.signing_key_id) || !trusted.size ? "" :
        ' <span class="state failed" title="Not a bundle key of the trust root: devices refuse this bundle">retired key</span>'}</td>
      <td class="num">${running.get(b.id) || 0}</td>
      <td>${when(b.uploaded)}</td><td>${esc(b.uploaded_by)}</td>
      <td><button data-report="${esc(b.id)}">Report</button></td></tr>`;
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Bundles</h1><span class="muted">${bundles.length} bundles · push with <code>edgekit push BUNDLE</code></span></div>
    <p id="trust" class="muted">Trust root v${esc(trust.version)}: devices take bundles signed by
      ${trust.bundle_keys.map((k) => `<code>${esc(k)}</code>`).join(", ") || "no key (they refuse every update)"} and desired states
      signed by hub key ${trust.hub_keys.map((k) => `<code>${esc(k)}</code>`).join(", ")} · rotate with <code>edgekit hub rotate-keys</code></p>
    <div class="table-wrap"><table id="bundles">
      <thead><tr><th>Name</th><th>Version</th><th>Id</th><th class="num">Size</th><th>Profile</th><th>Backend</th>
        <th>Precision</th><th>Signing key</th><th class="num">Devices</th><th>Uploaded</th><th>By</th><th></th></tr></thead>
      <tbody>${bundles.map(row).join("") || '<tr><td colspan="12" class="muted">No bundles yet.</td></tr>'}</tbody>
    </table></div>
    <section id="bundle-report" class="card" hidden></section>`;
  const panel = main.querySelector("#bundle-report");
  main.addEventListener("click", (event) => {
    const open = event.target.closest("[data-report]");
    if (open) showReport(panel, open.dataset.report);
    if (event.target.closest("[data-close]")) {
      panel.hidden = true;
      history.replaceState(null, "", location.pathname);
    }
  });
  const linked = location.hash.slice(1); // /bundles#ID opens that bundle's report
  if (linked) showReport(panel, linked);
  document.body.dataset.ready = "bundles";
}
