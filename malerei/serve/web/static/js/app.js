// Boot and routing: asks the server who we are, shows the right view for the #/route, keeps the
// header (user, credits, admin link) current.
import { api, onUnauthorized } from "./api.js";
import { initAccount, showAccount } from "./account.js";
import { initAdmin, showAdmin } from "./admin.js";
import { initAuth } from "./auth.js";
import { initGallery, showGallery } from "./gallery.js";
import { initGenerate, loadCatalog } from "./generate.js";
import { events, navigate, refreshAccount, setUser, state } from "./state.js";
import { $, $$, clearNotices, notify, notifyError } from "./ui.js";

const PUBLIC = ["signin", "setup", "register"];
const PRIVATE = { generate: null, gallery: showGallery, account: showAccount, admin: showAdmin };
let catalogLoaded = false;

function currentRoute() {
  const name = location.hash.replace(/^#\/?/, "").split("?")[0];
  return name || (state.user ? "generate" : "signin");
}

function show(view) {
  for (const section of $$("main > .view")) section.hidden = section.id !== `view-${view}`;
  for (const link of $$("#topbar nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("#booting").hidden = true;
  document.title = `${view[0].toUpperCase()}${view.slice(1)} · malerei`;
}

async function route() {
  let name = currentRoute();
  const web = state.web;
  if (!state.user) {
    if (web && web.setup_needed) name = "setup";
    else if (name === "register" && !(web && web.registration_open)) name = "signin";
    else if (!PUBLIC.includes(name)) name = "signin";
    if (`#/${name}` !== location.hash) history.replaceState(null, "", `#/${name}`);
    $("#topbar").hidden = true;
    $("#register-link").hidden = !(web && web.registration_open);
    show(name);
    const first = $(`#view-${name} input`);
    if (first) first.focus();
    return;
  }
  if (PUBLIC.includes(name) || !(name in PRIVATE) || (name === "admin" && !state.user.is_admin)) {
    name = "generate";
    history.replaceState(null, "", "#/generate");
  }
  $("#topbar").hidden = false;
  show(name);
  if (!catalogLoaded) {
    try {
      await loadCatalog();
      catalogLoaded = true;
    } catch (error) {
      notifyError(error);
    }
  }
  const onShow = PRIVATE[name];
  if (onShow) await onShow();
}

function renderHeader(user) {
  if (!user) return;
  $("#username").textContent = user.name;
  $("#nav-admin").hidden = !user.is_admin;
  const showCredits = state.web ? state.web.credits_enabled : true;
  $("#credits").hidden = !showCredits;
  $("#credits-value").textContent = String(user.balance);
  $("#credits").classList.toggle("low", user.balance <= 0);
  $("#signout").hidden = state.web ? !state.web.auth : false;
}

async function loadWebState() {
  state.web = await api("GET", "/v1/web/session", undefined, { auth: false });
  setUser(state.web.signed_in ? state.web.user : null);
}

async function signedIn(user) {
  clearNotices();
  await loadWebState();
  if (!state.user) setUser(user);
  navigate("generate");
}

async function signOut() {
  try {
    await api("POST", "/v1/auth/logout", undefined, { auth: false });
  } catch (error) {
    notifyError(error);
    return;
  }
  setUser(null);
  catalogLoaded = false;
  await loadWebState().catch(notifyError);
  navigate("signin");
}

async function boot() {
  events.addEventListener("user", (e) => renderHeader(e.detail));
  initAuth({ onSignedIn: signedIn });
  initGenerate();
  initGallery();
  initAccount();
  initAdmin();
  $("#signout").addEventListener("click", signOut);
  onUnauthorized(async () => {
    if (!state.user) return;
    setUser(null);
    catalogLoaded = false;
    await loadWebState().catch(() => {});
    notify("Your session has ended. Please sign in again.");
    navigate("signin");
  });
  window.addEventListener("hashchange", () => { route().catch(notifyError); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshAccount(); });
  setInterval(() => { if (!document.hidden) refreshAccount(); }, 30000);
  try {
    await loadWebState();
  } catch (error) {
    $("#booting").textContent = "The server cannot be reached.";
    notifyError(error);
    return;
  }
  await route();
}

boot();
