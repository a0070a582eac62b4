// zinfer's web UI: sign in with an API key, then pages by the hash: #/instances (running models, live),
// #/models (registrations), #/models/TYPE/NAME, #/register, #/launch/TYPE/NAME, #/playground, #/cluster,
// #/prompt-styles. Every page is a function that fills <main>; one that polls returns how to stop.

import { api, session } from "./api.js";
import { el, message } from "./dom.js";
import { launch } from "./launch.js";
import { models, promptStyles, registration } from "./models.js";
import { playground } from "./playground.js";
import { register } from "./register.js";
import { cluster, instances } from "./status.js";

const main = document.getElementById("main");
let stopPage = () => {};

function signIn() {
  const status = message("error");
  const input = el("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
                              spellcheck: "false", placeholder: "zk-…" });
  const form = el("form", { class: "card signin", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title" }, "Sign in"),
    el("p", {}, "Use an API key of this mesh (", el("code", {}, "zinfer keys create NAME"), " prints one). It is kept in ",
       "this tab only, and forgotten when you sign out or close the tab."),
    el("label", { for: "api-key" }, "API key"), input, status,
    el("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    session.key = input.value.trim();
    try {
      session.who = await api("/v1/whoami");
      location.hash = "#/instances";
    } catch (error) {
      session.key = null;
      status.textContent = error.status === 401 ? "This key is not accepted by the mesh." : error.message;
    }
  });
  main.replaceChildren(form);
  input.focus();
}

function signOut() {
  session.key = null;
  session.who = null;
  location.hash = "#/signin";
}

const ADMIN_PAGES = new Set(["register", "launch"]);

async function route() {
  stopPage();
  stopPage = () => {};
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (session.key && !session.who) {
    try { session.who = await api("/v1/whoami"); } catch { session.key = null; }
  }
  if (!session.key) {
    showChrome(false);
    signIn();
    return;
  }
  const page = parts[0] || "instances";
  showChrome(true, page);
  const params = new URLSearchParams(query || "");
  if (ADMIN_PAGES.has(page) && !session.admin) {
    main.replaceChildren(el("h1", {}, "Not for this key"),
      el("p", {}, `The ${session.who.role} key ${session.who.name} cannot register or launch models; sign in with an admin key.`));
    return;
  }
  const stop = page === "models" && parts.length === 3 ? registration(main, parts[1], parts[2])
    : page === "models" ? models(main, params)
      : page === "prompt-styles" ? promptStyles(main)
        : page === "register" ? register(main, params)
          : page === "launch" && parts.length === 3 ? launch(main, parts[1], parts[2])
            : page === "playground" ? playground(main, params)
              : page === "cluster" ? cluster(main)
                : instances(main);
  if (typeof stop === "function") stopPage = stop;
  main.focus({ preventScroll: true });
}

function showChrome(signedIn, page = "") {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  if (!signedIn) return;
  document.getElementById("who-name").textContent = `${session.who.name} (${session.who.role})`;
  const section = { "prompt-styles": "models", register: "models", launch: "models" }[page] || page;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#/${section}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();
