// Datasets: inputs captured on devices (docs/datasets.md). The list, then one dataset's gallery: images as
// thumbnails, sensor windows as small plots, each with the model's answer, why it was captured, and its label.
import { api, bytes, esc, listOf, setTitle, short, when } from "./common.js";

const path = (name) => `/api/datasets/${encodeURIComponent(name)}`;

export async function render(main, name) {
  if (name) return renderDataset(main, name);
  setTitle("Datasets");
  const sets = listOf(await api("/api/datasets"), "datasets");
  const row = (d) => `<tr><td><a href="/datasets/${encodeURIComponent(d.name)}">${esc(d.name)}</a></td>
    <td>${d.samples}</td><td>${d.labelled}</td><td>${bytes(d.stored_bytes)}</td><td>${d.dropped}</td>
    <td>${when(d.created)}</td></tr>`;
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Datasets</h1><span class="muted">captured on devices by their capture
      policy (device configuration)</span></div>
    <div class="table-wrap"><table id="datasets">
      <thead><tr><th>Dataset</th><th>Samples</th><th>Labelled</th><th>Size</th><th>Dropped (retention)</th>
        <th>Created</th></tr></thead>
      <tbody>${sets.map(row).join("") || '<tr><td colspan="6" class="muted">No samples captured yet.</td></tr>'}</tbody>
    </table></div>`;
  document.body.dataset.ready = "datasets";
}

async function renderDataset(main, name) {
  setTitle(`Dataset ${name}`);
  const samples = listOf(await api(`${path(name)}/samples?limit=500`), "samples");
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Dataset ${esc(name)}</h1>
      <span class="muted">${samples.length} samples</span>
      <a class="button" href="${path(name)}/export" download="${esc(name)}.npz">Export .npz</a></div>
    <div class="gallery" id="gallery">${samples.map((s) => card(name, s)).join("")
      || '<p class="muted">No samples.</p>'}</div>`;
  await Promise.all(samples.filter((s) => s.format === "npy").map((s) => plot(name, s.sha256)));
  main.querySelectorAll("form.label").forEach((form) => form.addEventListener("submit", (event) => {
    event.preventDefault();
    saveLabel(name, form);
  }));
  document.body.dataset.ready = "dataset";
}

function card(name, s) {
  const top = (s.output.top || s.output.detections || [])[0];
  const answer = top ? `${esc(top.name ?? top.label)} ${(top.score * 100).toFixed(0)}%` : "–";
  const preview = s.format === "png"
    ? `<img class="thumb" alt="sample ${esc(short(s.sha256))}" src="${path(name)}/samples/${s.sha256}/data">`
    : `<svg class="thumb plot" data-sample="${s.sha256}" viewBox="0 0 100 40" preserveAspectRatio="none"></svg>`;
  return `<figure class="sample" data-sample="${s.sha256}">${preview}
    <figcaption><span title="${esc(s.bundle)}">${answer}</span> · ${esc(s.reason.replace("_", " "))}<br>
      <span class="muted">${esc(s.device_id)} · ${when(s.ts)}</span>
      <form class="label"><input name="label" type="number" min="0" step="1" placeholder="label"
        value="${s.label ?? ""}" aria-label="label of ${esc(short(s.sha256))}"><button>Save</button>
        <span class="saved muted">${s.label !== null ? `labelled by ${esc(s.labelled_by)}` : ""}</span></form>
    </figcaption></figure>`;
}

async function plot(name, sha256) {
  const values = await api(`${path(name)}/samples/${sha256}/values`);
  const svg = document.querySelector(`svg[data-sample="${sha256}"]`);
  if (!svg || !values.length) return;
  const low = Math.min(...values), span = Math.max(...values) - low || 1;
  const points = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * 100},${40 - ((v - low) / span) * 38 - 1}`);
  svg.innerHTML = `<polyline fill="none" stroke="currentColor" stroke-width="0.8" points="${points.join(" ")}"/>`;
}

async function saveLabel(name, form) {
  const sha256 = form.closest("figure").dataset.sample;
  const text = form.elements.label.value.trim();
  const status = form.querySelector(".saved");
  try {
    const saved = await api(`${path(name)}/samples/${sha256}/label`, {
      method: "PUT", body: { label: text === "" ? null : Number(text) },
    });
    status.textContent = saved.label !== null ? `labelled by ${saved.labelled_by}` : "no label";
    form.dataset.saved = String(saved.label);
  } catch (error) {
    status.textContent = error.status === 403 ? "labelling needs the operate scope" : error.message;
  }
}
