// The live pages: running models (with their launch progress and restarts) and the cluster's workers.

import { api, session } from "./api.js";
import { bytes, el, list, message, table } from "./dom.js";

const POLL_MS = 2000;

export function stateCell(m) {
  const detail = m.error ? m.error.message
    : m.state === "launching" || m.state === "restarting"
      ? [m.stage, m.progress ? `${Math.round(m.progress * 100)}%` : "", m.restart_cause].filter(Boolean).join(" · ")
      : m.restarts ? `restarted ${m.restarts}x${m.restart_cause ? `, last: ${m.restart_cause}` : ""}` : "";
  return el("td", {}, el("span", { class: `state ${m.state}` }, m.state),
    detail ? el("span", { class: "detail" }, detail) : null);
}

async function terminate(uid, status) {
  if (!confirm(`Terminate ${uid}?`)) return;
  status.className = "message info";
  status.textContent = `Terminating ${uid}…`;
  try {
    await api(`/v1/models/${encodeURIComponent(uid)}`, { method: "DELETE" });
    status.textContent = `Terminated ${uid}.`;
  } catch (error) {
    status.className = "message error";
    status.textContent = `${uid}: ${error.message}`;
  }
}

// When an idle instance is unloaded (its keep_alive), or since when it is; its next request loads it again.
function expiry(m) {
  const clock = (t) => new Date(t * 1000).toLocaleTimeString();
  if (m.unloaded_at) return `unloaded ${clock(m.unloaded_at)}`;
  if (m.keep_alive === null || m.keep_alive === undefined) return "never";
  if (!m.expires_at) return `${m.keep_alive}s after idle`;
  const left = Math.round(m.expires_at - Date.now() / 1000);
  return left > 0 ? `in ${left}s` : "now";
}

export function instances(main) {
  const status = message();
  const body = el("div", { id: "instances" }, el("p", { class: "empty" }, "Loading…"));
  main.replaceChildren(el("h1", {}, "Running models"), status, body);
  const headers = ["UID", "Model", "Type", "Format", "Size", "Quantization", "State", "Devices", "Hosts", "Queue",
                   "Restarts", "Expires", ""];
  async function refresh() {
    try {
      const { data } = await api("/v1/models");
      const rows = data.filter((m) => !m.parent).map((m) => el("tr", { "data-uid": m.id },
        el("td", {}, m.id),
        el("td", {}, m.model_name, m.model_path ? el("div", { class: "hint model-path" }, `from ${m.model_path}`) : null,
          m.loras?.length ? el("div", { class: "hint loras" }, `LoRA: ${m.loras.map((x) => x.lora_name).join(", ")}`) : null),
        el("td", {}, m.model_type), el("td", {}, m.model_format),
        el("td", {}, m.model_size_in_billions ?? ""), el("td", {}, m.quantization), stateCell(m),
        el("td", {}, list(m.devices)), el("td", {}, list([...new Set(m.hosts)])),
        el("td", { class: "num" }, m.queue_depth), el("td", { class: "num" }, m.restarts), el("td", {}, expiry(m)),
        el("td", { class: "row-actions" },
          m.state === "ready" || m.state === "idle-unloaded" ? el("a", { href: `#/playground?model=${encodeURIComponent(m.id)}` }, "Try") : null,
          session.admin ? el("button", { type: "button", class: "danger", "aria-label": `Terminate ${m.id}`,
                                         onclick: () => terminate(m.id, status).then(refresh) }, "Terminate") : null)));
      body.replaceChildren(table(headers, rows, "No model is running. Launch one from Models."));
    } catch (error) {
      status.className = "message error";
      status.textContent = error.message;
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => clearInterval(timer);
}

export function cluster(main) {
  const status = message("error");
  const gateway = el("div", { id: "gateway-health" });
  const body = el("div", { id: "workers" }, el("p", { class: "empty" }, "Loading…"));
  main.replaceChildren(el("h1", {}, "Cluster"), status, el("h2", {}, "Gateway"), gateway,
                       el("h2", {}, "Workers"), body);
  async function refresh() {
    try {
      const [health, { workers }] = await Promise.all([
        api("/ready").catch((e) => ({ ready: false, detail: e.message })), api("/v1/cluster/workers")]);
      gateway.replaceChildren(el("dl", { class: "facts card" },
        Object.entries(health).map(([k, v]) => [el("dt", {}, k),
          el("dd", {}, Array.isArray(v) ? list(v) : typeof v === "object" ? JSON.stringify(v) : v)])));
      body.replaceChildren(table(["Worker", "Device", "Host", "Address", "GPU", "Free memory", "Total memory"],
        workers.map((w) => el("tr", { "data-worker": w.worker_id },
          el("td", {}, w.worker_id), el("td", {}, w.device), el("td", {}, w.host), el("td", {}, w.address ?? ""),
          el("td", {}, w.gpu_name ?? ""), el("td", { class: "num" }, bytes(w.free_memory)),
          el("td", { class: "num" }, bytes(w.total_memory)))),
        "No worker reports to the scheduler."));
    } catch (error) {
      status.textContent = error.message;
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS * 2);
  return () => clearInterval(timer);
}
