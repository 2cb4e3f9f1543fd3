// What the dashboard's forms share: whether the logged-in token may change things, and a refused request's reasons.
import { api, esc } from "./common.js";

let me = null;

/** True for operate and admin tokens: read-only ones see no form that changes the fleet. */
export async function canOperate() {
  me ||= api("/api/me");
  const { scope } = await me;
  return scope === "operate" || scope === "admin";
}

/** A failed request's reasons, one line each: `field: message` for a 422's fields, else the error's text. */
export function problems(error) {
  const detail = error.detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => `${(item.loc || []).slice(1).join(".") || "request"}: ${item.msg}`);
  }
  return [typeof detail === "string" ? detail : error.message];
}

/** Show `error`'s reasons in the list `el` (a <ul>), or hide it when there is none. */
export function showProblems(el, error) {
  el.innerHTML = error ? problems(error).map((line) => `<li>${esc(line)}</li>`).join("") : "";
  el.hidden = !error;
}
