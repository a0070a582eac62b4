// Launch a registered model: only the choices its registration has, the options used last time offered again,
// the same launch as a `zinfer launch` line, and its progress live (download, loading) with a cancel button.

import { api } from "./api.js";
import { el, message } from "./dom.js";
import { loadRegistration } from "./models.js";

const ENGINES = { pytorch: ["transformers"], ggufv2: ["llama.cpp"], ggmlv3: ["llama.cpp"] };
const remembered = (type, name) => `zinfer.launch.${type}.${name}`;
const quote = (s) => (/^[\w.,:/=@+-]+$/.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`);

function options(select, values, keep) {
  select.replaceChildren(...values.map((v) => el("option", { value: String(v), selected: String(v) === String(keep) }, String(v))));
}

function parseOptions(text) {
  const out = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const [key, ...rest] = line.split("=");
    const value = rest.join("=").trim();
    if (!key.trim() || !rest.length) throw new Error(`${line}: expected KEY=VALUE`);
    out[key.trim()] = /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value === "true" ? true
      : value === "false" ? false : value;
  }
  return out;
}

export function launch(main, type, name) {
  const status = message("error");
  main.replaceChildren(el("p", {}, el("a", { href: `#/models/${encodeURIComponent(type)}/${encodeURIComponent(name)}` },
                                      `← ${name}`)), el("h1", {}, `Launch ${name}`), status);
  loadRegistration(type, name).then(({ definition }) => render(main, type, name, definition, status))
    .catch((error) => { status.textContent = error.message; });
}

function render(main, type, name, definition, status) {
  const last = JSON.parse(localStorage.getItem(remembered(type, name)) || "{}");
  const specs = definition.model_specs || [];
  const format = el("select", { id: "launch-format" });
  const size = el("select", { id: "launch-size" });
  const quant = el("select", { id: "launch-quantization" });
  const engine = el("select", { id: "launch-engine" });
  const uid = el("input", { id: "launch-uid", type: "text", value: last.model_uid ?? name, autocomplete: "off" });
  const replica = el("input", { id: "launch-replica", type: "number", min: 1, value: last.replica ?? 1 });
  const device = el("input", { id: "launch-device", type: "text", value: (last.devices || []).join(", "),
                               placeholder: "any (or cpu, cuda:0, …)" });
  const host = el("input", { id: "launch-host", type: "text", value: (last.worker_ip || []).join(", "),
                             placeholder: "any" });
  const engineArgs = el("textarea", { id: "launch-options", rows: 3, spellcheck: "false", placeholder: "n_ctx=4096",
                                      value: "" });
  engineArgs.value = Object.entries(last.engine || {}).map(([k, v]) => `${k}=${v}`).join("\n");
  const command = el("code", { id: "launch-command" });
  const progress = el("div", { id: "launch-progress", "aria-live": "polite" });

  function specChoices() {
    const formats = [...new Set(specs.map((s) => s.model_format))];
    options(format, formats, format.value || last.model_format || formats[0]);
    const sizes = [...new Set(specs.filter((s) => s.model_format === format.value).map((s) => s.model_size_in_billions))];
    options(size, sizes, size.value && sizes.map(String).includes(size.value) ? size.value : last.model_size_in_billions ?? sizes[0]);
    const spec = specs.find((s) => s.model_format === format.value && String(s.model_size_in_billions) === size.value);
    const quants = spec ? (spec.quantizations ?? [spec.quantization]) : [];
    options(quant, quants, quants.includes(quant.value) ? quant.value : last.quantization ?? quants[0]);
    options(engine, ["auto", ...(ENGINES[format.value] || [])], engine.value || "auto");
  }

  function request() {
    const body = { model_name: name, model_type: type, model_uid: uid.value.trim() || name,
                   replica: Number(replica.value) || 1 };
    if (type === "LLM") {
      body.model_format = format.value;
      body.model_size_in_billions = /^\d+$/.test(size.value) ? Number(size.value) : size.value;
      body.quantization = quant.value;
      if (engine.value !== "auto") body.model_engine = engine.value;
    }
    const devices = device.value.split(",").map((s) => s.trim()).filter(Boolean);
    const hosts = host.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (devices.length) body.devices = devices;
    if (hosts.length) body.worker_ip = hosts;
    return { body, engine: parseOptions(engineArgs.value) };
  }

  function showCommand() {
    try {
      const { body, engine: args } = request();
      const parts = ["zinfer", "launch", "--model-name", name, "--model-type", type];
      if (body.model_format) parts.push("--model-format", body.model_format, "--size-in-billions",
                                        String(body.model_size_in_billions), "--quantization", body.quantization);
      if (body.model_engine) parts.push("--model-engine", body.model_engine);
      parts.push("--model-uid", body.model_uid);
      if (body.replica !== 1) parts.push("--replica", String(body.replica));
      for (const d of body.devices || []) parts.push("--device", d);
      for (const h of body.worker_ip || []) parts.push("--host", h);
      for (const [k, v] of Object.entries(args)) parts.push("--engine-arg", `${k}=${v}`);
      command.textContent = parts.map(quote).join(" ");
    } catch (error) {
      command.textContent = error.message;
    }
  }

  const form = el("form", { id: "launch-form", class: "card" },
    type === "LLM" ? el("div", { class: "grid" },
      el("div", {}, el("label", { for: "launch-format" }, "Format"), format),
      el("div", {}, el("label", { for: "launch-size" }, "Size (billions)"), size),
      el("div", {}, el("label", { for: "launch-quantization" }, "Quantization"), quant),
      el("div", {}, el("label", { for: "launch-engine" }, "Engine"), engine)) : null,
    el("div", { class: "grid" },
      el("div", {}, el("label", { for: "launch-uid" }, "Model uid"), uid),
      el("div", {}, el("label", { for: "launch-replica" }, "Replicas"), replica),
      el("div", {}, el("label", { for: "launch-device" }, "Devices"), device),
      el("div", {}, el("label", { for: "launch-host" }, "Hosts"), host)),
    el("label", { for: "launch-options" }, "Engine options (KEY=VALUE, one a line)"), engineArgs,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Launch")));
  main.append(form,
    el("h2", {}, "As a command line"),
    el("div", { class: "command" }, el("pre", {}, command),
      el("button", { type: "button", class: "secondary", onclick: () => navigator.clipboard?.writeText(command.textContent) },
         "Copy")),
    progress);
  if (type === "LLM") specChoices();
  form.addEventListener("input", () => { if (type === "LLM") specChoices(); showCommand(); });
  showCommand();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    let launchRequest;
    try { launchRequest = request(); } catch (error) { status.textContent = error.message; return; }
    const { body, engine: args } = launchRequest;
    localStorage.setItem(remembered(type, name), JSON.stringify({ ...body, engine: args }));
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await api("/v1/models?wait_ready=false", { method: "POST", body: { ...body, ...args } });
      await follow(body.model_uid, progress, status);
    } catch (error) {
      status.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });
}

async function follow(uid, progress, status) {
  let cancelled = false;
  const bar = el("progress", { max: 1, value: 0, id: "launch-bar" });
  const line = el("p", { id: "launch-state" }, "launching");
  const cancel = el("button", { type: "button", class: "danger", onclick: async () => {
    cancelled = true;
    cancel.disabled = true;
    try { await api(`/v1/models/${encodeURIComponent(uid)}`, { method: "DELETE" }); line.textContent = "cancelled"; }
    catch (error) { status.textContent = error.message; }
  } }, "Cancel the launch");
  progress.replaceChildren(el("h2", {}, `Launching ${uid}`), bar, line, cancel);
  while (!cancelled) {
    let m;
    try { m = await api(`/v1/models/${encodeURIComponent(uid)}`); } catch (error) {
      if (!cancelled) status.textContent = error.message;
      return;
    }
    bar.value = m.state === "ready" ? 1 : m.progress || 0;
    line.textContent = [m.state, m.stage, m.error?.message].filter(Boolean).join(" · ");
    if (m.state === "ready") {
      cancel.remove();
      progress.append(el("p", {}, el("a", { href: `#/playground?model=${encodeURIComponent(uid)}` }, `Try ${uid}`),
                           " · ", el("a", { href: "#/instances" }, "Running models")));
      return;
    }
    if (m.state === "failed") { cancel.remove(); status.textContent = m.error?.message || "the launch failed"; return; }
    await new Promise((resolve) => { setTimeout(resolve, 400); });
  }
}
