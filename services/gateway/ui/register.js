// Register (or edit) a custom model: a form with the fields of Xinference's custom-model documents, a live JSON
// view that can be edited, pasted or loaded from a file, and the registry's own errors beside their fields.

import { api } from "./api.js";
import { el, message } from "./dom.js";
import { loadRegistration, TYPES } from "./models.js";

const ABILITIES = ["generate", "chat", "embed", "tools", "vision", "reasoning"];
const FORMATS = ["pytorch", "ggufv2", "ggmlv3"];
const csv = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
const number = (text) => (text.trim() === "" ? undefined : /^\d+(\.\d+)?$/.test(text.trim()) ? Number(text) : text.trim());

function field(label, input, name, hint) {
  const id = input.id;
  const error = el("span", { class: "field-error", id: `${id}-error`, "data-error-for": name });
  input.setAttribute("data-field", name);
  input.setAttribute("aria-describedby", `${id}-error`);
  return el("div", { class: "field" }, el("label", { for: id }, label), input,
    hint ? el("span", { class: "hint" }, hint) : null, error);
}

const text = (id, value = "", attrs = {}) => el("input", { id, type: "text", value, ...attrs });

function specFieldset(index, spec = {}) {
  const id = (k) => `spec-${index}-${k}`;
  const at = (k) => `model_specs[${index}].${k}`;
  const format = el("select", { id: id("format") }, FORMATS.map((f) => el("option", { value: f,
    selected: f === (spec.model_format || "pytorch") }, f)));
  const set = el("fieldset", { class: "spec card", "data-spec": index },
    el("legend", {}, `Spec ${index + 1}`),
    el("div", { class: "grid" },
      field("Format", format, at("model_format")),
      field("Size in billions", text(id("size"), String(spec.model_size_in_billions ?? "")), at("model_size_in_billions"),
            "7, 1.8 or 1_8"),
      field("Quantizations", text(id("quantizations"), (spec.quantizations || []).join(", ")), at("quantizations"),
            "comma-separated: 4-bit, 8-bit, none · Q4_K_M, F16"),
      field("model_id", text(id("model_id"), spec.model_id ?? ""), at("model_id"), "a Hub repository"),
      field("model_uri", text(id("model_uri"), spec.model_uri ?? ""), at("model_uri"),
            "file:///path on the workers' hosts (optional with a model_id)"),
      field("File name template", text(id("template"), spec.model_file_name_template ?? ""),
            at("model_file_name_template"), "gguf: name-{quantization}.gguf"),
      field("Multimodal projectors", text(id("projectors"), (spec.multimodal_projectors || []).join(", ")),
            at("multimodal_projectors"), "gguf vision: mmproj files beside the model, comma-separated")),
    el("button", { type: "button", class: "secondary remove-spec", onclick: () => { set.remove(); } }, "Remove spec"));
  set.collect = () => {
    const out = { model_format: format.value, model_size_in_billions: number(set.querySelector(`#${id("size")}`).value),
                  quantizations: csv(set.querySelector(`#${id("quantizations")}`).value) };
    for (const [k, key] of [["model_id", "model_id"], ["model_uri", "model_uri"], ["template", "model_file_name_template"]]) {
      const value = set.querySelector(`#${id(k)}`).value.trim();
      if (value) out[key] = value;
    }
    const projectors = csv(set.querySelector(`#${id("projectors")}`).value);
    if (projectors.length) out.multimodal_projectors = projectors;
    return out;
  };
  return set;
}

export function register(main, params) {
  const editing = params.get("edit");
  const type = TYPES.includes(params.get("type")) ? params.get("type") : "LLM";
  const status = message("error");
  const form = el("form", { id: "register-form", novalidate: true });
  const json = el("textarea", { id: "definition-json", rows: 18, spellcheck: "false" });
  const jsonError = el("span", { class: "field-error", id: "definition-json-error" });
  const persist = el("input", { id: "persist", type: "checkbox", checked: true });
  const file = el("input", { id: "definition-file", type: "file", accept: "application/json,.json" });
  const source = text("fill-source", "", { autocomplete: "off", spellcheck: "false",
    placeholder: "/models/qwen2.5-0.5b-instruct  or  Qwen/Qwen2.5-0.5B-Instruct" });
  const fillError = el("span", { class: "field-error", id: "fill-source-error", "data-error-for": "fill-source" });
  const fillBox = editing ? null : el("section", { class: "card fill-from", "aria-labelledby": "fill-title" },
    el("h2", { id: "fill-title" }, "Fill in from a path or Hub id"),
    el("label", { for: "fill-source" }, "A model folder or .gguf file on the gateway's host, or a Hugging Face repository id"),
    el("div", { class: "inline" }, source,
      el("button", { type: "button", class: "secondary", id: "fill-from-files" }, "Fill in")),
    fillError,
    el("p", { class: "hint" }, "Reads the config, tokenizer and template files only (never the weights). Review the fields, then register."));
  main.replaceChildren(
    el("p", {}, el("a", { href: `#/models?type=${type}` }, "← Models")),
    el("h1", {}, editing ? `Edit ${editing}` : `Register a custom ${type === "LLM" ? "LLM" : "embedding model"}`),
    editing ? el("p", { class: "hint" }, "Saving replaces the registration in place (refused while an instance of it runs).")
      : el("p", { class: "type-switch" }, "Type: ", TYPES.map((t, i) => [i ? " · " : "",
          t === type ? el("strong", { "aria-current": "page" }, t) : el("a", { href: `#/register?type=${t}` }, t)])),
    fillBox, status, el("div", { class: "two-columns" }, form,
      el("section", { class: "json-view", "aria-labelledby": "json-title" },
        el("h2", { id: "json-title" }, "JSON"),
        el("label", { for: "definition-json" }, "The definition (edit, or paste one)"), json, jsonError,
        el("div", { class: "actions" },
          el("button", { type: "button", class: "secondary", id: "apply-json" }, "Fill the form from the JSON"),
          el("label", { class: "file", for: "definition-file" }, "Load a file", file)))));

  const inputs = {};
  const specs = el("div", { id: "specs" });
  let promptStyle; let customStyle;
  if (type === "LLM") {
    inputs.model_name = text("model_name", "", { required: true, autocomplete: "off" });
    inputs.model_description = el("textarea", { id: "model_description", rows: 2 });
    inputs.context_length = el("input", { id: "context_length", type: "number", min: 1, value: 2048 });
    inputs.model_lang = text("model_lang", "en");
    inputs.model_family = text("model_family", "other");
    promptStyle = el("select", { id: "prompt_style" }, el("option", { value: "" }, "(the model's own chat template)"),
                     el("option", { value: "custom" }, "custom (JSON below)"));
    customStyle = el("textarea", { id: "custom_prompt_style", rows: 4, hidden: true, spellcheck: "false",
                                   placeholder: '{"style_name": "…", "system_prompt": "…", "roles": ["…", "…"], …}' });
    api("/v1/prompt_styles").then((styles) => {
      for (const s of styles) promptStyle.insertBefore(el("option", { value: s.style_name }, s.style_name), promptStyle.lastChild);
      if (pendingStyle !== undefined) setStyle(pendingStyle);
    }).catch(() => {});
    promptStyle.addEventListener("change", () => { customStyle.hidden = promptStyle.value !== "custom"; update(); });
    form.append(
      field("Model name", inputs.model_name, "model_name", "letters, digits, - and _"),
      field("Description", inputs.model_description, "model_description"),
      field("Context length", inputs.context_length, "context_length"),
      field("Languages", inputs.model_lang, "model_lang", "comma-separated: en, zh"),
      el("fieldset", { class: "abilities", "data-field": "model_ability" }, el("legend", {}, "Abilities"),
        ABILITIES.map((a) => el("label", { class: "check" },
          el("input", { type: "checkbox", name: "ability", value: a, checked: a === "generate" || a === "chat" }), a)),
        el("span", { class: "field-error", "data-error-for": "model_ability" })),
      field("Family", inputs.model_family, "model_family", "other, or a built-in family it belongs to"),
      field("Prompt style", promptStyle, "prompt_style", "one of the prompt styles, or your own"), customStyle,
      el("h2", {}, "Specs"), specs,
      el("button", { type: "button", class: "secondary", onclick: () => { specs.append(specFieldset(nextSpec++)); update(); } },
         "Add a spec"));
  } else {
    inputs.model_name = text("model_name", "", { required: true, autocomplete: "off" });
    inputs.dimensions = el("input", { id: "dimensions", type: "number", min: 1 });
    inputs.max_tokens = el("input", { id: "max_tokens", type: "number", min: 1, value: 512 });
    inputs.language = text("language", "en");
    inputs.model_id = text("model_id");
    inputs.model_uri = text("model_uri");
    form.append(field("Model name", inputs.model_name, "model_name"), field("Dimensions", inputs.dimensions, "dimensions"),
      field("Max tokens", inputs.max_tokens, "max_tokens"), field("Languages", inputs.language, "language", "comma-separated"),
      field("model_id", inputs.model_id, "model_id", "a Hub repository"),
      field("model_uri", inputs.model_uri, "model_uri", "file:///path on the workers' hosts (optional with a model_id)"));
  }
  form.append(el("label", { class: "check", for: "persist" }, persist, "Keep it across restarts (persist)"),
    el("div", { class: "actions" }, el("button", { type: "submit" }, editing ? "Save" : "Register")));
  let nextSpec = 0;
  let pendingStyle;
  if (type === "LLM") specs.append(specFieldset(nextSpec++));

  function setStyle(style) {
    pendingStyle = style;
    if (!style) { promptStyle.value = ""; customStyle.hidden = true; return; }
    const name = typeof style === "string" ? style : null;
    if (name && [...promptStyle.options].some((o) => o.value === name)) { promptStyle.value = name; customStyle.hidden = true; }
    else { promptStyle.value = "custom"; customStyle.hidden = false; customStyle.value = JSON.stringify(style, null, 2); }
  }

  function collect() {
    if (type !== "LLM") {
      const d = { model_name: inputs.model_name.value.trim(), dimensions: Number(inputs.dimensions.value) || undefined,
                  max_tokens: Number(inputs.max_tokens.value) || undefined, language: csv(inputs.language.value) };
      for (const k of ["model_id", "model_uri"]) if (inputs[k].value.trim()) d[k] = inputs[k].value.trim();
      return d;
    }
    const d = { version: 1, context_length: Number(inputs.context_length.value) || undefined,
                model_name: inputs.model_name.value.trim(), model_lang: csv(inputs.model_lang.value),
                model_ability: [...form.querySelectorAll("input[name=ability]:checked")].map((i) => i.value),
                model_family: inputs.model_family.value.trim() || "other",
                model_specs: [...specs.querySelectorAll("fieldset.spec")].map((s) => s.collect()) };
    if (inputs.model_description.value.trim()) d.model_description = inputs.model_description.value;
    if (promptStyle.value === "custom") {
      try { d.prompt_style = JSON.parse(customStyle.value || "null"); } catch { d.prompt_style = customStyle.value; }
    } else if (promptStyle.value) d.prompt_style = promptStyle.value;
    return d;
  }

  function fill(d) {
    inputs.model_name.value = d.model_name ?? "";
    if (type !== "LLM") {
      const place = d.model_specs?.[0] || d;  // version 2 keeps the place in its first spec
      inputs.dimensions.value = d.dimensions ?? ""; inputs.max_tokens.value = d.max_tokens ?? "";
      inputs.language.value = (d.language || []).join(", ");
      inputs.model_id.value = place.model_id ?? ""; inputs.model_uri.value = place.model_uri ?? "";
      return;
    }
    inputs.model_description.value = d.model_description ?? "";
    inputs.context_length.value = d.context_length ?? 2048;
    inputs.model_lang.value = (d.model_lang || []).join(", ");
    inputs.model_family.value = d.model_family ?? "other";
    for (const box of form.querySelectorAll("input[name=ability]")) box.checked = (d.model_ability || []).includes(box.value);
    setStyle(d.prompt_style);
    specs.replaceChildren();
    nextSpec = 0;
    for (const spec of d.model_specs || []) {
      specs.append(specFieldset(nextSpec++, d.version === 2 ? { ...spec, quantizations: [spec.quantization] } : spec));
    }
  }

  let jsonEdited = false;
  function update() {
    if (!jsonEdited) json.value = JSON.stringify(collect(), null, 2);
  }
  form.addEventListener("input", () => { jsonEdited = false; update(); });
  json.addEventListener("input", () => { jsonEdited = true; });
  function applyJson() {
    jsonError.textContent = "";
    try {
      fill(JSON.parse(json.value));
      jsonEdited = false;
      update();
    } catch (error) {
      jsonError.textContent = `Not valid JSON: ${error.message}`;
    }
  }
  document.getElementById("apply-json").addEventListener("click", applyJson);
  file.addEventListener("change", async () => {
    if (!file.files.length) return;
    json.value = await file.files[0].text();
    applyJson();
  });

  // Filled in from files: the form shows the fields, and the JSON (sent as it is unless a field is edited) keeps
  // every field the files gave, Xinference's version 2 form included.
  function showFilled(model) {
    fill(model);
    json.value = JSON.stringify(model, null, 2);
    jsonEdited = true;
  }
  async function fillFromFiles() {
    fillError.textContent = "";
    source.removeAttribute("aria-invalid");
    const value = source.value.trim();
    if (!value) { fillError.textContent = "Give a path or a Hub id."; return; }
    const body = value.startsWith("/") || value.startsWith("~") ? { model_path: value } : { model_id: value };
    try {
      const { model_type: kind, model } = await api("/v1/registration_from_files", { method: "POST", body });
      if (kind === type) { showFilled(model); return; }
      if (!TYPES.includes(kind)) {
        fillError.textContent = `This is a ${kind} model: register its JSON with zinfer register --model-type ${kind}.`;
        json.value = JSON.stringify(model, null, 2); jsonEdited = true;
        return;
      }
      sessionStorage.setItem("zinfer-filled", JSON.stringify(model));
      location.hash = `#/register?type=${kind}`;
    } catch (error) {
      fillError.textContent = error.message;
      source.setAttribute("aria-invalid", "true");
    }
  }
  if (fillBox) {
    document.getElementById("fill-from-files").addEventListener("click", fillFromFiles);
    source.addEventListener("keydown", (event) => { if (event.key === "Enter") { event.preventDefault(); fillFromFiles(); } });
  }

  function showErrors(error) {
    const problems = error.problems?.length ? error.problems : [{ field: error.field, message: error.message }];
    status.textContent = error.message;
    for (const { field: name, message: text } of problems) {
      const target = name && form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
      const input = name && form.querySelector(`[data-field="${CSS.escape(name)}"]`);
      if (target) target.textContent = text;
      if (input) input.setAttribute("aria-invalid", "true");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    for (const e of main.querySelectorAll(".field-error")) e.textContent = "";
    for (const e of main.querySelectorAll("[aria-invalid]")) e.removeAttribute("aria-invalid");
    let model;
    try { model = jsonEdited ? JSON.parse(json.value) : collect(); } catch (error) {
      jsonError.textContent = `Not valid JSON: ${error.message}`;
      return;
    }
    try {
      await api(`/v1/model_registrations/${type}`, { method: "POST",
        body: { model: JSON.stringify(model), persist: persist.checked, force: Boolean(editing) } });
      location.hash = `#/models/${encodeURIComponent(type)}/${encodeURIComponent(model.model_name)}`;
    } catch (error) {
      showErrors(error);
    }
  });

  if (editing) {
    loadRegistration(type, editing).then(({ definition }) => {
      fill(definition);
      inputs.model_name.readOnly = true;
      update();
    }).catch((error) => { status.textContent = error.message; });
  } else {
    update();
    const filled = sessionStorage.getItem("zinfer-filled");
    if (filled) {
      sessionStorage.removeItem("zinfer-filled");
      showFilled(JSON.parse(filled));
    }
  }
}
