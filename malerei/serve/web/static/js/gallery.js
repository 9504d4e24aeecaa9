// The gallery: the user's own images, newest first, searchable by prompt, paged; a viewer with
// the recipe, "use these settings", download, send-to and delete.
import { api } from "./api.js";
import { handlers as generateHandlers } from "./generate.js";
import { renderDetail } from "./recipe.js";
import { $, h, notify, notifyError } from "./ui.js";

const PAGE = 24;
let cursor = null;
let query = "";
let loading = false;

export function initGallery() {
  $("#gallery-search").addEventListener("submit", (e) => {
    e.preventDefault();
    query = $("#gallery-q").value.trim();
    reload();
  });
  $("#gallery-more").addEventListener("click", () => loadPage());
  $("#viewer-close").addEventListener("click", () => $("#viewer").close());
  $("#viewer").addEventListener("click", (e) => { if (e.target === $("#viewer")) $("#viewer").close(); });
}

export function showGallery() { reload(); }

function reload() {
  cursor = null;
  $("#gallery-grid").replaceChildren();
  loadPage();
}

async function loadPage() {
  if (loading) return;
  loading = true;
  const more = $("#gallery-more");
  more.disabled = true;
  try {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (query) params.set("q", query);
    if (cursor) params.set("cursor", cursor);
    const page = await api("GET", `/v1/images?${params}`);
    cursor = page.next_cursor;
    const grid = $("#gallery-grid");
    grid.append(...page.images.map(tile));
    $("#gallery-empty").hidden = grid.children.length > 0;
    $("#gallery-empty").textContent = query ? `No images whose prompt has “${query}”.` : "No images yet: make some on the Generate page.";
    more.hidden = !cursor;
  } catch (error) {
    notifyError(error);
  } finally {
    loading = false;
    more.disabled = false;
  }
}

function tile(image) {
  const label = image.prompt ? image.prompt : "(no prompt)";
  return h("li", { class: "tile", dataset: { id: image.id } },
    h("button", { type: "button", class: "tile-button", onclick: () => open(image), "aria-label": `Open: ${label}` },
      h("img", { src: image.url, alt: "", loading: "lazy", width: image.width, height: image.height }),
      h("span", { class: "tile-caption" }, label)));
}

async function open(image) {
  const dialog = $("#viewer");
  $("#viewer-title").textContent = image.prompt ? `“${truncate(image.prompt, 80)}”` : "Image";
  let job = null;
  try {
    job = await api("GET", `/v1/jobs/${encodeURIComponent(image.job_id)}`);
  } catch (error) {
    if (error.status !== 404) notifyError(error);
  }
  const base = generateHandlers();
  renderDetail($("#viewer-detail"), { image, job }, {
    useSettings: (j, img) => { dialog.close(); base.useSettings(j, img); },
    sendTo: (mode, img) => { dialog.close(); base.sendTo(mode, img); },
    remove: (img) => confirmDelete(img),
  });
  if (!dialog.open) dialog.showModal();
}

function confirmDelete(image) {
  const actions = $("#viewer-detail .image-actions");
  const existing = $(".confirm", actions);
  if (existing) { existing.querySelector("button").focus(); return; }
  const yes = h("button", { type: "button", class: "danger", onclick: () => remove(image) }, "Yes, delete it");
  const no = h("button", { type: "button", class: "ghost", onclick: () => box.remove() }, "Keep it");
  const box = h("span", { class: "confirm", role: "group", "aria-label": "Confirm delete" }, "Delete this image for good? ", yes, no);
  actions.append(box);
  yes.focus();
}

async function remove(image) {
  try {
    await api("DELETE", `/v1/images/${encodeURIComponent(image.id)}`);
  } catch (error) {
    notifyError(error);
    return;
  }
  $("#viewer").close();
  const tileEl = $(`#gallery-grid li[data-id="${CSS.escape(image.id)}"]`);
  if (tileEl) tileEl.remove();
  $("#gallery-empty").hidden = $("#gallery-grid").children.length > 0;
  notify("Image deleted.", { kind: "info" });
}

function truncate(text, n) { return text.length > n ? `${text.slice(0, n - 1)}…` : text; }
