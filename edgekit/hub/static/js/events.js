// Events and alerts: offline devices, failed updates, latency regressions and input drift (from /api/alerts, computed by the
// hub), then the newest events of the whole fleet, with new ones arriving live.
import { ago, api, esc, listOf, live, setTitle, state, tickAges, when } from "./common.js";

const device = (id) => `<a href="/devices/${encodeURIComponent(id)}">${esc(id)}</a>`;
const GROUPS = [
  ["offline", "Offline devices", (a) => `${device(a.device_id)} ${state(a.level === "error" ? "offline" : "warning")} <span class="muted" data-ts="${a.ts}">${ago(a.ts)}</span>`],
  ["failed_updates", "Failed updates & errors", (a) => `${device(a.device_id)} <code>${esc(a.type)}</code> <span class="muted">${esc(a.message)}</span> <span class="muted" data-ts="${a.ts}">${ago(a.ts)}</span>`],
  ["latency_regressions", "Latency regressions", (a) => `${device(a.device_id)} <span>${esc(a.message)}</span>`],
  ["drift", "Input drift", (a) => `${device(a.device_id)} <span>${esc(a.message)}</span>`],
];
const eventRow = (e) =>
  `<tr><td>${when(e.ts)}</td><td>${device(e.device_id)}</td><td>${state(e.level)}</td><td><code>${esc(e.type)}</code></td><td>${esc(e.message)}</td></tr>`;

export async function render(main) {
  setTitle("Events & alerts");
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Alerts</h1><span id="alerts-at" class="muted"></span></div>
    <div class="alerts">${GROUPS.map(([key, title]) => `<section class="card" id="alerts-${key}"><h2>${title} <span class="count badge">0</span></h2><ul></ul></section>`).join("")}</div>
    <div class="toolbar"><h1 class="grow">Events</h1>
      <select id="level"><option value="">all levels</option><option>info</option><option>warning</option><option>error</option></select></div>
    <div class="table-wrap"><table id="events"><thead><tr><th>Time</th><th>Device</th><th>Level</th><th>Type</th><th>Message</th></tr></thead><tbody></tbody></table></div>`;
  const tbody = main.querySelector("#events tbody");
  const level = main.querySelector("#level");

  const loadAlerts = async () => {
    const alerts = await api("/api/alerts");
    for (const [key, , item] of GROUPS) {
      const list = listOf(alerts[key]);
      const section = main.querySelector(`#alerts-${key}`);
      section.querySelector(".count").textContent = list.length;
      section.querySelector(".count").classList.toggle("zero", list.length === 0);
      section.querySelector("ul").innerHTML = list.map((a) => `<li>${item(a)}</li>`).join("") || '<li class="muted">None.</li>';
    }
    main.querySelector("#alerts-at").textContent = `as of ${new Date().toLocaleTimeString()}`;
  };
  const loadEvents = async () => {
    const query = level.value ? `&level=${level.value}` : "";
    tbody.innerHTML = listOf(await api(`/api/events?limit=200${query}`), "events").map(eventRow).join("");
  };
  level.addEventListener("change", loadEvents);

  await Promise.all([loadAlerts(), loadEvents()]);
  tickAges(main.querySelector(".alerts"));
  setInterval(loadAlerts, 10000);
  let alertsDue = null;
  live((message) => {
    for (const e of message.events || []) {
      if (!level.value || e.level === level.value) tbody.insertAdjacentHTML("afterbegin", eventRow(e));
    }
    while (tbody.rows.length > 500) tbody.deleteRow(-1);
    // An error event or a device going offline changes the alerts: refresh them soon, once.
    const changed = (message.events || []).some((e) => e.level === "error" || e.type.startsWith("update."))
      || Object.values(message.devices || {}).some((d) => d.online === false);
    if (changed) alertsDue ||= setTimeout(() => loadAlerts().finally(() => (alertsDue = null)), 1000);
  });
  document.body.dataset.ready = "events";
}
