// The device page's configuration panel: what the hub last sent and what the device runs (source, task, thresholds,
// rates, capture), whether the device refused the last change, and for operators a form that changes the device's
// configuration or that of one of its groups (docs/hub.md "Device configuration").
import { api, esc, state } from "./common.js";
import { canOperate, showProblems } from "./forms.js";

const POLL_MS = 3000; // a refusal comes back in the device's reported state, a moment after the change

function shown(value) {
  return value === undefined || value === null ? '<span class="muted">–</span>' : `<code>${esc(JSON.stringify(value))}</code>`;
}

/** desired vs reported, field by field, and the device's answer to the last change. */
function current(config) {
  const names = [...new Set([...Object.keys(config.desired), ...Object.keys(config.reported)])].sort();
  const rows = names.map((n) => `<tr data-field="${esc(n)}"><td>${esc(n)}</td><td>${shown(config.desired[n])}</td><td>${shown(config.reported[n])}</td></tr>`).join("");
  const answer = config.state
    ? `${state(config.state.state)} rev ${esc(config.state.rev)}${config.state.detail ? `: ${esc(config.state.detail)}` : ""}${config.state.state === "refused" ? " (the device keeps its previous configuration)" : ""}`
    : '<span class="muted">no answer from the device yet (agents before 0.4 send none)</span>';
  const groups = config.groups.map((g) => `<code>${esc(g.selector)}</code> v${esc(g.version)}`).join(", ") || "none";
  return `<p id="config-state" data-state="${esc(config.state ? config.state.state : "")}" data-rev="${esc(config.state ? config.state.rev : "")}">Last change: ${answer}</p>
    <table><thead><tr><th></th><th>desired (hub)</th><th>reported (device)</th></tr></thead><tbody>${rows}</tbody></table>
    <p class="muted">group configurations: ${groups}</p>`;
}

function form(labels) {
  const groups = Object.entries(labels || {}).map(([k, v]) => `<option value="group:${esc(k)}=${esc(v)}">group ${esc(k)}=${esc(v)}</option>`).join("");
  return `<form id="config-form" class="config-form">
    <label>apply to <select id="config-target"><option value="device">this device</option>${groups}</select></label>
    <label>source <input id="config-source" placeholder="camera:0, video:/path.mp4"></label>
    <label>task <select id="config-task"><option value="">unchanged</option><option>auto</option><option>classifier</option><option>detector</option><option>raw</option></select></label>
    <label>score ≥ <input id="config-score" type="number" step="any" placeholder="0.5"></label>
    <label>top-k <input id="config-top-k" type="number" placeholder="5"></label>
    <label>telemetry every <input id="config-telemetry" type="number" step="any" placeholder="s"> s</label>
    <label>capture <input id="config-capture" placeholder='off or {"random_rate": 0.01}'></label>
    <button type="submit" id="config-apply">Apply</button>
    <span id="config-sent" class="muted"></span>
    <ul id="config-errors" class="error" hidden></ul></form>`;
}

/** The request body from the form: only the fields filled in. */
function change(el) {
  const value = (name) => el.querySelector(`#config-${name}`).value.trim();
  const body = {};
  if (value("source")) body.source = value("source");
  if (value("task")) body.task = value("task");
  const thresholds = {};
  if (value("score")) thresholds.score = Number(value("score"));
  if (value("top-k")) thresholds.top_k = Number(value("top-k"));
  if (Object.keys(thresholds).length) body.thresholds = thresholds;
  if (value("telemetry")) body.rates = { telemetry_s: Number(value("telemetry")) };
  if (value("capture")) body.capture = value("capture") === "off" ? null : JSON.parse(value("capture"));
  return body;
}

async function submit(el, id) {
  const target = el.querySelector("#config-target").value;
  const path = target === "device" ? `/api/devices/${encodeURIComponent(id)}/config` : `/api/groups/${encodeURIComponent(target.slice(6))}/config`;
  const sent = el.querySelector("#config-sent");
  try {
    const result = await api(path, { method: "PUT", body: change(el) });
    showProblems(el.querySelector("#config-errors"), null);
    sent.textContent = `sent to ${result.sent.length} device(s): ${result.sent.map((s) => (s.rev ? `${s.device} rev ${s.rev}` : `${s.device}: ${s.error}`)).join(", ")}`;
    sent.dataset.revs = result.sent.map((s) => s.rev).join(",");
  } catch (error) {
    sent.textContent = "";
    showProblems(el.querySelector("#config-errors"), error instanceof SyntaxError ? new Error(`capture: ${error.message}`) : error);
  }
}

/** Adds the panel after `after` and keeps it current. */
export async function configPanel(after, id, labels) {
  after.insertAdjacentHTML("afterend", '<h2>Configuration</h2><div class="card" id="config"><div id="config-now"></div></div>');
  const el = after.parentElement.querySelector("#config");
  const now = el.querySelector("#config-now");
  const load = async () => { now.innerHTML = current(await api(`/api/devices/${encodeURIComponent(id)}/config`)); };
  if (await canOperate()) {
    el.insertAdjacentHTML("beforeend", form(labels));
    el.querySelector("#config-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      await submit(el, id);
      await load();
    });
  }
  setInterval(() => load().catch((error) => console.warn("config:", error)), POLL_MS);
  await load();
}
