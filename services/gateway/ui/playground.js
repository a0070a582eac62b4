// Try a running model: chat (streamed, with a system prompt, sampling settings, history, images for a model that
// sees them, and a stop button that cancels the generation), generate, embeddings (dimensions, and the cosine
// similarity of two texts), rerank (documents ordered by their relevance to a query, with their scores),
// transcribe (an audio file or a microphone recording to text or subtitles, with a player for it), and speak
// (text to an audio player and a download link).

import { api, session } from "./api.js";
import { el, message, table } from "./dom.js";
import { micAvailable, record } from "./recorder.js";

const TABS = { chat: "Chat", generate: "Generate", embed: "Embeddings", rerank: "Rerank", transcribe: "Transcribe",
               speak: "Speak" };

function canDo(m, tab) {
  const abilities = m.model_ability || [];
  if (tab === "rerank") return m.model_type === "rerank";
  if (tab === "transcribe") return m.model_type === "audio" && abilities.includes("audio2text");
  if (tab === "speak") return m.model_type === "audio" && abilities.includes("text2audio");
  if (tab === "embed") return m.model_type === "embedding" || (abilities.includes("embed") && !m.parent);
  if (tab === "chat") return m.model_type === "LLM" && abilities.includes("chat");
  return m.model_type === "LLM";
}

// One streamed completion: calls onText with each piece of text (and onDelta, when given, with each chat delta:
// reasoning_content, tool_calls); resolves with why it ended.
async function stream(path, body, signal, onText, onDelta) {
  const headers = { "Content-Type": "application/json" };
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify({ ...body, stream: true }), signal });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(data.error?.message || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data:")) continue;
      const data = event.slice(5).trim();
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const piece = choice.delta ? choice.delta.content : choice.text;
        if (piece) onText(piece);
        if (choice.delta && onDelta) onDelta(choice.delta);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}

function settings(prefix) {
  const temperature = el("input", { id: `${prefix}-temperature`, type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const maxTokens = el("input", { id: `${prefix}-max-tokens`, type: "number", min: 1, value: 256 });
  const stop = el("input", { id: `${prefix}-stop`, type: "text", placeholder: "comma-separated" });
  const node = el("div", { class: "grid" },
    el("div", {}, el("label", { for: `${prefix}-temperature` }, "Temperature"), temperature),
    el("div", {}, el("label", { for: `${prefix}-max-tokens` }, "Max tokens"), maxTokens),
    el("div", {}, el("label", { for: `${prefix}-stop` }, "Stop words"), stop));
  node.values = () => {
    const out = { temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    const words = stop.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (words.length) out.stop = words;
    return out;
  };
  return node;
}

function modelSelect(models, tab, wanted) {
  const usable = models.filter((m) => (m.state === "ready" || m.state === "idle-unloaded") && canDo(m, tab));
  // A LoRA adapter is listed under its own name (the request's model), after its model: "A (LoRA of hf)".
  return el("select", { id: `${tab}-model` }, usable.length ? usable.map((m) => el("option", { value: m.id,
    selected: m.id === wanted }, m.parent ? `${m.id} (LoRA of ${m.parent})` : m.id))
    : el("option", { value: "" }, "no running model can do this"));
}

// Tools pasted as JSON (OpenAI's list of {type: "function", function: {...}}), or nothing.
function parseTools(text) {
  if (!text.trim()) return null;
  const tools = JSON.parse(text);
  return Array.isArray(tools) ? tools : [tools];
}

function chat(panel, models, wanted) {
  const model = modelSelect(models, "chat", wanted);
  const system = el("textarea", { id: "chat-system", rows: 2, placeholder: "You are a helpful assistant." });
  const knobs = settings("chat");
  const tools = el("textarea", { id: "chat-tools", rows: 4, spellcheck: "false",
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]' });
  const toolChoice = el("select", { id: "chat-tool-choice" }, ["auto", "none", "required"].map((c) => el("option", { value: c }, c)));
  const thinking = el("select", { id: "chat-thinking" }, el("option", { value: "" }, "the template's default"),
    el("option", { value: "true" }, "on"), el("option", { value: "false" }, "off"));
  const extras = el("details", { class: "chat-extras" }, el("summary", {}, "Tools and thinking"),
    el("label", { for: "chat-tools" }, "Tools (JSON)"), tools,
    el("div", { class: "grid" }, el("div", {}, el("label", { for: "chat-tool-choice" }, "Tool choice"), toolChoice),
      el("div", {}, el("label", { for: "chat-thinking" }, "Thinking (enable_thinking)"), thinking)));
  const log = el("div", { id: "chat-log", class: "chat-log", role: "log", "aria-live": "polite" });
  const input = el("textarea", { id: "chat-input", rows: 3, required: true });
  // Images for a model with the vision ability: sent as data URIs in image_url parts, after the message's text.
  const picker = el("input", { id: "chat-images", type: "file", accept: "image/*", multiple: true });
  const previews = el("div", { id: "chat-image-previews", class: "image-previews" });
  const attach = el("div", { class: "attach" }, el("label", { for: "chat-images" }, "Images"), picker, previews);
  let attached = [];
  const sees = () => (models.find((m) => m.id === model.value)?.model_ability || []).includes("vision");
  const showAttach = () => { attach.hidden = !sees(); if (attach.hidden) { attached = []; picker.value = ""; previews.replaceChildren(); } };
  const thumbs = (urls) => urls.map((url, i) => el("img", { src: url, class: "thumb", alt: `image ${i + 1}` }));
  picker.addEventListener("change", async () => {
    attached = await Promise.all([...picker.files].map((file) => new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    })));
    previews.replaceChildren(...thumbs(attached));
  });
  model.addEventListener("change", showAttach);
  showAttach();
  const send = el("button", { type: "submit" }, "Send");
  const stop = el("button", { type: "button", class: "danger", disabled: true }, "Stop");
  const clear = el("button", { type: "button", class: "secondary" }, "Clear the history");
  const status = message("error");
  const history = [];
  let controller = null;
  const form = el("form", {}, el("label", { for: "chat-input" }, "Message"), input, attach,
                  el("div", { class: "actions" }, send, stop, clear));
  panel.replaceChildren(el("div", { class: "grid" }, el("div", {}, el("label", { for: "chat-model" }, "Model"), model)),
    el("label", { for: "chat-system" }, "System prompt"), system, knobs, extras, log, status, form);
  stop.addEventListener("click", () => controller?.abort());
  clear.addEventListener("click", () => { history.length = 0; log.replaceChildren(); });
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); } });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || !model.value) return;
    status.textContent = "";
    let toolList;
    try {
      toolList = parseTools(tools.value);
    } catch (error) {
      status.textContent = `Tools: not valid JSON (${error.message})`;
      return;
    }
    input.value = "";
    const images = sees() ? attached : [];
    history.push({ role: "user", content: images.length ? [{ type: "text", text },
      ...images.map((url) => ({ type: "image_url", image_url: { url } }))] : text });
    log.append(el("div", { class: "turn user" }, el("span", { class: "who" }, "You"), el("p", {}, text),
      ...(images.length ? [el("div", { class: "image-previews" }, ...thumbs(images))] : [])));
    attached = [];
    picker.value = "";
    previews.replaceChildren();
    const reasoningText = el("p", { class: "reasoning-text" });
    const reasoning = el("details", { class: "reasoning", open: true, hidden: true }, el("summary", {}, "Thinking"), reasoningText);
    const answer = el("p", { class: "answer" });
    const calls = el("div", { class: "tool-calls" });
    const note = el("span", { class: "note" });
    log.append(el("div", { class: "turn assistant" }, el("span", { class: "who" }, model.value), reasoning, answer, calls, note));
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history];
    const body = { model: model.value, messages, ...knobs.values() };
    if (toolList) Object.assign(body, { tools: toolList, tool_choice: toolChoice.value });
    if (thinking.value) body.chat_template_kwargs = { enable_thinking: thinking.value === "true" };
    const pending = [];
    const onDelta = (delta) => {
      if (delta.reasoning_content) {
        reasoning.hidden = false;
        reasoningText.append(delta.reasoning_content);
      }
      for (const piece of delta.tool_calls || []) {
        const call = pending[piece.index] ||= { id: piece.id, type: "function", function: { name: piece.function.name, arguments: "" } };
        call.function.arguments += piece.function.arguments || "";
      }
      log.scrollTop = log.scrollHeight;
    };
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    try {
      const finish = await stream("/v1/chat/completions", body, controller.signal,
                                  (piece) => { if (answer.textContent || piece.trim()) reasoning.open = false; answer.append(piece); log.scrollTop = log.scrollHeight; },
                                  onDelta);
      note.textContent = finish === "length" ? "(max tokens reached)" : "";
    } catch (error) {
      if (error.name === "AbortError") note.textContent = "(stopped)";
      else status.textContent = error.message;
    } finally {
      for (const call of pending.filter(Boolean)) {
        let args = call.function.arguments;
        try { args = JSON.parse(args); } catch { /* shown as it came */ }
        calls.append(el("div", { class: "tool-call" }, el("span", { class: "tool-name" }, `Tool call: ${call.function.name}`),
          el("pre", {}, JSON.stringify(args, null, 2))));
      }
      const said = { role: "assistant", content: answer.textContent || null };
      if (pending.length) said.tool_calls = pending.filter(Boolean);
      history.push(said);
      controller = null;
      send.disabled = false;
      stop.disabled = true;
      note.closest(".turn").setAttribute("data-done", "true");
    }
  });
}

function generate(panel, models, wanted) {
  const model = modelSelect(models, "generate", wanted);
  const prompt = el("textarea", { id: "generate-prompt", rows: 4 });
  const knobs = settings("generate");
  const output = el("pre", { id: "generate-output", class: "output", "aria-live": "polite" });
  const status = message("error");
  const run = el("button", { type: "submit" }, "Generate");
  const stop = el("button", { type: "button", class: "danger", disabled: true }, "Stop");
  let controller = null;
  const form = el("form", {}, el("div", { class: "grid" }, el("div", {}, el("label", { for: "generate-model" }, "Model"), model)),
    el("label", { for: "generate-prompt" }, "Prompt"), prompt, knobs, el("div", { class: "actions" }, run, stop));
  panel.replaceChildren(form, status, output);
  stop.addEventListener("click", () => controller?.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!model.value) return;
    status.textContent = "";
    output.textContent = "";
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    try {
      await stream("/v1/completions", { model: model.value, prompt: prompt.value, ...knobs.values() },
                   controller.signal, (piece) => output.append(piece));
    } catch (error) {
      if (error.name !== "AbortError") status.textContent = error.message;
    } finally {
      controller = null;
      run.disabled = false;
      stop.disabled = true;
    }
  });
}

function embed(panel, models, wanted) {
  const model = modelSelect(models, "embed", wanted);
  const a = el("textarea", { id: "embed-a", rows: 2 });
  const b = el("textarea", { id: "embed-b", rows: 2 });
  const result = el("dl", { id: "embed-result", class: "facts card", hidden: true });
  const status = message("error");
  const form = el("form", {}, el("div", { class: "grid" }, el("div", {}, el("label", { for: "embed-model" }, "Model"), model)),
    el("label", { for: "embed-a" }, "First text"), a, el("label", { for: "embed-b" }, "Second text"), b,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Embed")));
  panel.replaceChildren(form, status, result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    try {
      const { data, usage } = await api("/v1/embeddings", { method: "POST", body: { model: model.value, input: [a.value, b.value] } });
      const [x, y] = data.map((d) => d.embedding);
      const dot = x.reduce((s, v, i) => s + v * y[i], 0);
      const norm = (v) => Math.sqrt(v.reduce((s, t) => s + t * t, 0));
      const cosine = dot / (norm(x) * norm(y));
      result.hidden = false;
      result.replaceChildren(el("dt", {}, "Dimensions"), el("dd", { id: "embed-dimensions" }, x.length),
        el("dt", {}, "Cosine similarity"), el("dd", { id: "embed-similarity" }, cosine.toFixed(4)),
        el("dt", {}, "Tokens"), el("dd", {}, usage?.prompt_tokens ?? ""),
        el("dt", {}, "First values"), el("dd", {}, x.slice(0, 6).map((v) => v.toFixed(4)).join(", ") + " …"));
    } catch (error) {
      status.textContent = error.message;
    }
  });
}

function rerank(panel, models, wanted) {
  const model = modelSelect(models, "rerank", wanted);
  const query = el("input", { id: "rerank-query", type: "text", placeholder: "What the documents are ranked against" });
  const documents = el("textarea", { id: "rerank-documents", rows: 6, placeholder: "One document per line" });
  const topN = el("input", { id: "rerank-top-n", type: "number", min: 1, placeholder: "all" });
  const result = el("div", { id: "rerank-result" });
  const status = message("error");
  const form = el("form", {}, el("div", { class: "grid" },
      el("div", {}, el("label", { for: "rerank-model" }, "Model"), model),
      el("div", {}, el("label", { for: "rerank-top-n" }, "Top n"), topN)),
    el("label", { for: "rerank-query" }, "Query"), query,
    el("label", { for: "rerank-documents" }, "Documents"), documents,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Rerank")));
  panel.replaceChildren(form, status, result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    const docs = documents.value.split("\n").map((d) => d.trim()).filter(Boolean);
    try {
      const body = { model: model.value, query: query.value, documents: docs, return_documents: true, return_len: true };
      if (topN.value) body.top_n = Number(topN.value);
      const data = await api("/v1/rerank", { method: "POST", body });
      const rows = data.results.map((r, rank) => el("tr", {}, el("td", { class: "num" }, rank + 1),
        el("td", { class: "num" }, r.relevance_score.toFixed(6)), el("td", { class: "num" }, r.index),
        el("td", {}, r.document?.text ?? "")));
      result.replaceChildren(table(["Rank", "Score", "Index", "Document"], rows, "No documents."),
        el("p", { class: "hint" }, `${data.meta?.tokens?.input_tokens ?? ""} tokens`));
    } catch (error) {
      status.textContent = error.message;
    }
  });
}

function transcribe(panel, models, wanted) {
  const model = modelSelect(models, "transcribe", wanted);
  const file = el("input", { id: "transcribe-file", type: "file", accept: "audio/*,.wav,.flac,.mp3,.ogg" });
  const language = el("input", { id: "transcribe-language", type: "text", placeholder: "the model tells" });
  const format = el("select", { id: "transcribe-format" }, ["text", "srt", "vtt", "verbose_json", "json"]
    .map((f) => el("option", { value: f }, f)));
  const translate = el("input", { id: "transcribe-translate", type: "checkbox" });
  const player = el("audio", { id: "transcribe-player", controls: true, hidden: true });
  const mic = el("button", { id: "transcribe-record", type: "button", class: "secondary" }, "Record");
  const result = el("pre", { id: "transcribe-result" });
  const status = message("error");
  let recording = null;
  const form = el("form", {}, el("div", { class: "grid" },
      el("div", {}, el("label", { for: "transcribe-model" }, "Model"), model),
      el("div", {}, el("label", { for: "transcribe-language" }, "Language"), language),
      el("div", {}, el("label", { for: "transcribe-format" }, "Format"), format)),
    el("label", { for: "transcribe-file" }, "Audio file (WAV, FLAC, MP3, OGG), or the microphone"),
    el("div", { class: "inline file-row" }, file, mic, player),
    el("label", { class: "inline" }, translate, " Translate into English"),
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Transcribe")));
  panel.replaceChildren(form, status, result);
  const play = (blob) => {  // the player holds what Transcribe sends: the chosen file, or the last recording
    if (player.src) URL.revokeObjectURL(player.src);
    player.audio = blob;
    player.hidden = !blob;
    if (blob) { player.src = URL.createObjectURL(blob); player.dataset.bytes = String(blob.size); }
  };
  file.addEventListener("change", () => play(file.files[0] || null));
  mic.addEventListener("click", async () => {
    status.textContent = "";
    if (recording) {
      const stopping = recording;
      recording = null;
      mic.textContent = "Record";
      play(await stopping.stop());
      file.value = "";
      return;
    }
    if (!micAvailable()) {
      status.textContent = "The microphone needs a secure page: open the UI over https or on localhost.";
      return;
    }
    mic.disabled = true;  // until the microphone answers: a second click would open a second, orphaned recording
    try {
      recording = await record((seconds) => { mic.textContent = `Stop (${seconds.toFixed(1)} s)`; mic.dataset.seconds = seconds; });
      mic.textContent = "Stop";
    } catch (error) {
      status.textContent = `Microphone: ${error.message}`;
    } finally {
      mic.disabled = false;
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    result.textContent = "";
    const audio = player.audio;
    if (!audio) { status.textContent = "Choose an audio file or record one first."; return; }
    const body = new FormData();
    body.append("model", model.value);
    body.append("file", audio, audio.name || "recording.wav");
    body.append("response_format", format.value);
    if (language.value.trim()) body.append("language", language.value.trim());
    const headers = session.key ? { Authorization: `Bearer ${session.key}` } : {};
    const path = translate.checked ? "/v1/audio/translations" : "/v1/audio/transcriptions";
    try {
      const response = await fetch(path, { method: "POST", headers, body });
      const text = await response.text();
      if (!response.ok) {
        let data = {};
        try { data = JSON.parse(text); } catch { /* not JSON */ }
        throw new Error(data.error?.message || `HTTP ${response.status}`);
      }
      result.textContent = format.value.endsWith("json") ? JSON.stringify(JSON.parse(text), null, 2) : text;
    } catch (error) {
      status.textContent = error.message;
    }
  });
}

function speak(panel, models, wanted) {
  const model = modelSelect(models, "speak", wanted);
  const text = el("textarea", { id: "speak-input", rows: 4, placeholder: "What to say" });
  const format = el("select", { id: "speak-format" }, ["wav", "mp3", "flac"].map((f) => el("option", { value: f }, f)));
  const speed = el("input", { id: "speak-speed", type: "number", min: 0.25, max: 4, step: 0.25, value: 1 });
  const player = el("audio", { id: "speak-player", controls: true, hidden: true });
  const download = el("a", { id: "speak-download", hidden: true }, "Download");
  const status = message("error");
  const form = el("form", {}, el("div", { class: "grid" },
      el("div", {}, el("label", { for: "speak-model" }, "Model"), model),
      el("div", {}, el("label", { for: "speak-format" }, "Format"), format),
      el("div", {}, el("label", { for: "speak-speed" }, "Speed"), speed)),
    el("label", { for: "speak-input" }, "Text"), text,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Speak")));
  panel.replaceChildren(form, status, el("div", { class: "inline file-row" }, player, download));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "";
    const headers = { "Content-Type": "application/json" };
    if (session.key) headers.Authorization = `Bearer ${session.key}`;
    const body = { model: model.value, input: text.value, response_format: format.value, speed: Number(speed.value) };
    try {
      const response = await fetch("/v1/audio/speech", { method: "POST", headers, body: JSON.stringify(body) });
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error(data.error?.message || `HTTP ${response.status}`);
      }
      const blob = await response.blob();
      if (player.src) URL.revokeObjectURL(player.src);
      player.src = URL.createObjectURL(blob);
      download.href = player.src;
      download.download = `speech.${format.value}`;
      player.hidden = download.hidden = false;
      player.dataset.bytes = String(blob.size);
    } catch (error) {
      status.textContent = error.message;
    }
  });
}

export function playground(main, params) {
  const tab = TABS[params.get("tab")] ? params.get("tab") : null;
  const wanted = params.get("model");
  const panel = el("div", { id: "playground-panel", role: "tabpanel" });
  const status = message("error");
  main.replaceChildren(el("h1", {}, "Playground"), status);
  let left = false;  // another page (or this one for another model) was opened before the list came
  api("/v1/models").then(({ data }) => {
    if (left) return;
    const model = data.find((m) => m.id === wanted);
    const chosen = tab || (model ? (canDo(model, "chat") ? "chat" : canDo(model, "embed") ? "embed"
      : canDo(model, "rerank") ? "rerank" : canDo(model, "transcribe") ? "transcribe"
      : canDo(model, "speak") ? "speak" : "generate") : "chat");
    const query = wanted ? `&model=${encodeURIComponent(wanted)}` : "";
    main.append(el("nav", { class: "tabs", "aria-label": "Playgrounds" }, Object.entries(TABS).map(([key, label]) =>
      el("a", { href: `#/playground?tab=${key}${query}`, "aria-current": key === chosen ? "page" : null }, label))), panel);
    ({ chat, generate, embed, rerank, transcribe, speak })[chosen](panel, data, wanted);
  }).catch((error) => { status.textContent = error.message; });
  return () => { left = true; };
}
