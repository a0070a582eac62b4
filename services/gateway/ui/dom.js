// Building the page: every text from the server (model names, descriptions, errors) goes in as text, never as
// HTML; there is no innerHTML anywhere in the UI.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function table(headers, rows, emptyText) {
  if (!rows.length) return el("div", { class: "table-wrap" }, el("p", { class: "empty" }, emptyText));
  return el("div", { class: "table-wrap" },
    el("table", {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
}

export function message(kind = "info") {
  return el("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", "aria-live": "polite" });
}

export function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function list(values) {
  return Array.isArray(values) ? values.join(", ") : (values ?? "");
}
