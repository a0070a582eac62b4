// Registered models: the list (search and filters), one registration (facts, specs, JSON, and for admins Edit,
// Launch and Unregister), and the prompt styles a registration may name.

import { api, session } from "./api.js";
import { el, list, message, table } from "./dom.js";

export const TYPES = ["LLM", "embedding"];  // the types the register form builds
const LISTED = [...TYPES, "rerank", "audio"];  // rerank and audio: listed, viewed and launched; registered as JSON
const path = (type, name) => `${encodeURIComponent(type)}/${encodeURIComponent(name)}`;

function select(id, options, selected) {
  return el("select", { id }, options.map(([value, text]) => el("option", { value, selected: value === selected },
                                                                 text)));
}

export function models(main, params) {
  const type = LISTED.includes(params.get("type")) ? params.get("type") : "LLM";
  const typeSelect = select("model-type", LISTED.map((t) => [t, t]), type);
  const search = el("input", { id: "model-search", type: "search", placeholder: "name, family, language" });
  const format = select("model-format", [["", "any"], ["pytorch", "pytorch"], ["ggufv2", "ggufv2"],
                                         ["ggmlv3", "ggmlv3"]], "");
  const ability = select("model-ability", [["", "any"], ...["generate", "chat", "embed", "tools", "vision"]
    .map((a) => [a, a])], "");
  const customOnly = el("input", { id: "custom-only", type: "checkbox" });
  const status = message("error");
  const body = el("div", {}, el("p", { class: "empty" }, "Loading…"));
  main.replaceChildren(
    el("div", { class: "title-row" }, el("h1", {}, "Models"),
      el("div", { class: "actions" },
        session.admin ? el("a", { class: "button", href: `#/register?type=${type}` }, "Register a model") : null,
        el("a", { href: "#/prompt-styles" }, "Prompt styles"))),
    el("div", { class: "inline" },
      el("div", {}, el("label", { for: "model-type" }, "Type"), typeSelect),
      el("div", {}, el("label", { for: "model-search" }, "Search"), search),
      type === "LLM" ? el("div", {}, el("label", { for: "model-format" }, "Format"), format) : null,
      type === "LLM" ? el("div", {}, el("label", { for: "model-ability" }, "Ability"), ability) : null,
      el("label", { class: "check", for: "custom-only" }, customOnly, "Custom only")),
    status, body);
  let items = [];
  function render() {
    const words = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const shown = items.filter((r) => (!customOnly.checked || !r.is_builtin)
      && (!format.value || (r.model_format || []).includes(format.value))
      && (!ability.value || (r.model_ability || []).includes(ability.value))
      && words.every((w) => [r.model_name, r.model_family, ...(r.model_lang || [])]
        .some((v) => (v || "").toLowerCase().includes(w))));
    const rows = shown.map((r) => el("tr", {},
      el("td", {}, el("a", { href: `#/models/${path(type, r.model_name)}` }, r.model_name)),
      el("td", {}, r.is_builtin ? "built-in" : "custom"),
      el("td", {}, type === "LLM" ? list(r.model_format) : type === "rerank" ? r.rerank_type ?? ""
        : type === "audio" ? r.model_family ?? "" : `${r.dimensions}`),
      el("td", {}, list(r.model_ability)),
      el("td", { class: "num" }, type === "LLM" ? r.context_length ?? "" : r.max_tokens ?? ""),
      el("td", {}, list(r.model_lang))));
    body.replaceChildren(table(["Name", "Kind", { LLM: "Formats", rerank: "Rerank type", audio: "Family" }[type] ?? "Dimensions", "Abilities",
                                type === "LLM" ? "Context" : "Max tokens", "Languages"], rows,
                               "No registration matches."));
  }
  typeSelect.addEventListener("change", () => { location.hash = `#/models?type=${typeSelect.value}`; });
  for (const input of [search, format, ability, customOnly]) input.addEventListener("input", render);
  api(`/v1/model_registrations/${type}`).then((data) => { items = data; render(); })
    .catch((error) => { status.textContent = error.message; });
}

function specRows(definition) {
  return (definition.model_specs || []).map((s) => el("tr", {},
    el("td", {}, s.model_format), el("td", {}, s.model_size_in_billions ?? ""),
    el("td", {}, list(s.quantizations ?? s.quantization)), el("td", {}, s.model_id ?? ""),
    el("td", {}, s.model_uri ?? ""), el("td", {}, s.model_file_name_template ?? ""),
    el("td", {}, list(s.multimodal_projectors ?? []))));
}

export async function loadRegistration(type, name) {
  const [definition, all] = await Promise.all([api(`/v1/model_registrations/${path(type, name)}`),
                                               api(`/v1/model_registrations/${encodeURIComponent(type)}`)]);
  return { definition, builtin: Boolean(all.find((r) => r.model_name === name)?.is_builtin) };
}

export function registration(main, type, name) {
  const status = message("error");
  main.replaceChildren(el("p", {}, el("a", { href: `#/models?type=${type}` }, "← Models")),
    el("h1", {}, name), status);
  loadRegistration(type, name).then(({ definition, builtin }) => {
    const facts = type === "LLM"
      ? [["Kind", builtin ? "built-in" : "custom"], ["Family", definition.model_family],
         ["Abilities", list(definition.model_ability)], ["Languages", list(definition.model_lang)],
         ["Context length", definition.context_length],
         ["Prompt style", typeof definition.prompt_style === "object" && definition.prompt_style
           ? definition.prompt_style.style_name : definition.prompt_style]]
      : type === "audio"
      ? [["Kind", builtin ? "built-in" : "custom"], ["Family", definition.model_family],
         ["Abilities", list(definition.model_ability)], ["Languages", list(definition.language)],
         ["Multilingual", definition.multilingual === false ? "no (English only)" : "yes"],
         ["model_id", definition.model_id], ["model_uri", definition.model_uri]]
      : type === "rerank"
      ? [["Kind", builtin ? "built-in" : "custom"], ["Rerank type", definition.type],
         ["Max tokens", definition.max_tokens], ["Languages", list(definition.language)],
         ...(definition.model_specs || [definition]).flatMap((s) => [["model_id", s.model_id], ["model_uri", s.model_uri]])]
      : [["Kind", builtin ? "built-in" : "custom"], ["Dimensions", definition.dimensions],
         ["Max tokens", definition.max_tokens], ["Languages", list(definition.language)],
         ["model_id", definition.model_id], ["model_uri", definition.model_uri]];
    const actions = el("div", { class: "actions" });
    if (session.admin) {
      actions.append(el("a", { class: "button", href: `#/launch/${path(type, name)}` }, "Launch"));
      if (!builtin) {
        actions.append(TYPES.includes(type)
          ? el("a", { class: "button secondary", href: `#/register?type=${type}&edit=${encodeURIComponent(name)}` }, "Edit")
          : "",
          el("button", { type: "button", class: "danger", onclick: async () => {
            if (!confirm(`Unregister ${name}?`)) return;
            try {
              await api(`/v1/model_registrations/${path(type, name)}`, { method: "DELETE" });
              location.hash = `#/models?type=${type}`;
            } catch (error) { status.textContent = error.message; }
          } }, "Unregister"));
      }
    }
    main.append(
      el("p", { class: "description", id: "description" }, definition.model_description || ""),
      el("div", { class: "card" }, el("dl", { class: "facts" },
        facts.filter(([, v]) => v !== undefined && v !== null && v !== "")
          .map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]))),
      actions,
      ...(type === "LLM" ? [el("h2", {}, "Specs"),
        table(["Format", "Size (B)", "Quantizations", "model_id", "model_uri", "File name template", "Projectors"],
              specRows(definition), "No specs.")] : []),
      el("h2", {}, "JSON"),
      el("pre", { class: "json", id: "definition-json" }, JSON.stringify(definition, null, 2)));
  }).catch((error) => { status.textContent = error.message; });
}

export function promptStyles(main) {
  const status = message("error");
  const body = el("div", {});
  main.replaceChildren(el("p", {}, el("a", { href: "#/models" }, "← Models")), el("h1", {}, "Prompt styles"),
    el("p", {}, "A registration names one of these as its prompt_style, or gives its own in the same shape."),
    status, body);
  api("/v1/prompt_styles").then((styles) => {
    body.replaceChildren(...styles.map((s) => el("section", { class: "card style", id: `style-${s.style_name}` },
      el("h2", {}, s.style_name),
      el("pre", { class: "json" }, JSON.stringify(s, null, 2)))));
  }).catch((error) => { status.textContent = error.message; });
}
