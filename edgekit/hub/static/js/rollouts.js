// Rollouts: each deployment's waves with per-state progress bars, and a Halt button while it runs.
import { api, applySizes, esc, listOf, live, setTitle, short, state, when } from "./common.js";
import { deployForm } from "./deploy.js";

const STATES = ["healthy", "sent", "failed", "timed_out", "rolled_back", "pending"];

/** Per-wave counts [[wave, {state: n}], …] from a deployment's `wave_progress`, else its `devices` rows. */
function waves(d) {
  const out = new Map();
  if (Array.isArray(d.wave_progress)) {
    for (const w of d.wave_progress) out.set(w.wave, { ...w.states });
  } else {
    for (const device of listOf(d.devices)) {
      const counts = out.get(device.wave) || {};
      counts[device.state] = (counts[device.state] || 0) + 1;
      out.set(device.wave, counts);
    }
  }
  return [...out.entries()].sort((a, b) => a[0] - b[0]);
}

function waveRow(d, [wave, counts]) {
  const total = STATES.reduce((n, s) => n + (Number(counts[s]) || 0), 0) || 1;
  const bar = STATES.filter((s) => s !== "pending" && counts[s])
    .map((s) => `<span class="${s}" data-width="${(100 * counts[s]) / total}%" title="${s}: ${counts[s]}"></span>`).join("");
  const text = STATES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s.replace("_", " ")}`).join(" · ");
  const name = wave === 0 && d.canary_percent ? "canary" : `wave ${wave}`;
  const current = d.state === "running" && wave === d.current_wave ? " ◀" : "";
  return `<div class="wave" data-wave="${wave}"><span>${name}${current}</span><div class="bar">${bar}</div><span class="muted">${text || "no devices"}</span></div>`;
}

/** Each gate with what it measured: the threshold, the value, passed or failed, and where (shadow or wave N). */
function gates(d) {
  if (!listOf(d.gates).length) return "";
  const results = listOf(d.gate_results);
  const rows = results.map((r) => {
    const where = r.phase === "shadow" ? "shadow" : r.wave === 0 ? "canary" : `wave ${r.wave}`;
    const value = r.value === null || r.value === undefined ? "not measured" : `${r.value}${r.metric === "p95" ? "×" : ""}`;
    return `<tr class="${r.passed ? "passed" : "failed"}" data-gate="${esc(r.gate)}"><td><code>${esc(r.gate)}</code></td><td>${esc(where)}</td>
      <td class="value">${esc(value)}</td><td>${r.passed ? state("passed") : state("failed")}</td><td class="muted">${esc(r.devices)} devices ${esc(r.note || "")}</td></tr>`;
  }).join("");
  const waiting = d.state === "running" ? `<p class="muted">waiting for ${esc(d.min_samples)} measured inputs per device</p>` : "";
  const phase = d.shadow ? `<span class="muted">${d.phase === "shadow" ? "shadow phase: the canary compares the bundle on live input" : "shadow passed: installing"}</span>` : "";
  return `<div class="gates">${phase}<table><thead><tr><th>gate</th><th>where</th><th>measured</th><th></th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="5" class="muted">${listOf(d.gates).map((g) => `<code>${esc(g.text)}</code>`).join(" ")}: not evaluated yet</td></tr>`}</tbody></table>${waiting}</div>`;
}

function card(d) {
  const bundle = d.bundle_label || (d.bundle ? `${d.bundle.name}@${d.bundle.version}` : short(d.bundle_id));
  const halt = d.state === "running" ? `<button class="danger" data-halt="${d.id}">Halt</button>` : "";
  return `<section class="card rollout" data-id="${d.id}">
    <header><strong>#${d.id}</strong> ${state(d.state)} <span class="grow">${esc(bundle)} → <code>${esc(d.target)}</code>
      <span class="muted">canary ${esc(d.canary_percent)}% · waves of ${esc(d.wave_percent)}% · halt past ${esc(Math.round((d.failure_threshold || 0) * 100))}% failed</span></span>
      <span class="muted">${esc(d.created_by)} · ${when(d.created)}</span> ${halt}</header>
    ${waves(d).map((w) => waveRow(d, w)).join("")}
    ${gates(d)}
    ${d.reason ? `<p class="muted">${esc(d.reason)}</p>` : ""}
  </section>`;
}

export async function render(main) {
  setTitle("Rollouts");
  main.innerHTML = `<div class="toolbar"><h1 class="grow">Rollouts</h1><span class="muted">start one with <code>edgekit deploy BUNDLE --to TARGET</code></span></div><div id="rollouts"></div>`;
  const list = main.querySelector("#rollouts");
  const load = async () => {
    const deployments = listOf(await api("/api/deployments?limit=50"), "deployments").sort((a, b) => b.id - a.id);
    // The list has totals only; per-wave progress is in each deployment's detail.
    const full = await Promise.all(deployments.map((d) => (d.wave_progress ? d : api(`/api/deployments/${d.id}`))));
    list.innerHTML = full.map(card).join("") || '<p class="muted card">No rollouts yet.</p>';
    applySizes(list);
    return full;
  };
  list.addEventListener("click", async (event) => {
    const id = event.target.dataset.halt;
    if (!id || !confirm(`Halt rollout #${id} and roll its devices back?`)) return;
    event.target.disabled = true;
    try {
      await api(`/api/deployments/${id}/halt`, { method: "POST", body: { reason: "halted from the dashboard" } });
    } catch (error) {
      alert(error.message);
    }
    await load();
  });

  await Promise.all([load(), deployForm(main.querySelector(".toolbar"), load)]);
  document.body.dataset.ready = "rollouts";
  // Update events move rollouts forward: reload soon after one arrives, and every few seconds regardless.
  let due = null;
  const soon = () => (due ||= setTimeout(() => load().finally(() => (due = null)), 500));
  live((message) => {
    if ((message.events || []).some((e) => e.type.startsWith("update.")) || Object.values(message.devices || {}).some((d) => d.update_state)) soon();
  });
  setInterval(soon, 3000);
}
