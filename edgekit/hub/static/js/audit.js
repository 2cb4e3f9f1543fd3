// Audit log: who pushed, deployed, halted or created tokens, and when.
import { api, esc, listOf, setTitle, when } from "./common.js";

export async function render(main) {
  setTitle("Audit");
  const entries = listOf(await api("/api/audit?limit=500"), "entries", "audit");
  const row = (e) => `<tr><td>${when(e.ts)}</td><td>${esc(e.actor)}</td><td><code>${esc(e.action)}</code></td>
    <td class="mono">${esc(JSON.stringify(e.detail || {}))}</td></tr>`;
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Audit log</h1><span class="muted">${entries.length} entries</span></div>
    <div class="table-wrap"><table id="audit">
      <thead><tr><th>Time</th><th>Actor</th><th>Action</th><th>Detail</th></tr></thead>
      <tbody>${entries.map(row).join("") || '<tr><td colspan="4" class="muted">Nothing yet.</td></tr>'}</tbody>
    </table></div>`;
  document.body.dataset.ready = "audit";
}
