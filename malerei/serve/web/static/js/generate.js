// The Generate view: the form (all six job kinds), the source image and mask, submitting a job,
// its live progress and previews (server-sent events), cancelling, and the results.
import { api, ApiError } from "./api.js";
import { SourceCanvas, loadImageFile } from "./mask.js";
import { renderDetail } from "./recipe.js";
import { state, refreshAccount, navigate } from "./state.js";
import { $, $$, h, notify, notifyError, showForModes } from "./ui.js";

const DIFFUSION = ["txt2img", "img2img", "inpaint", "outpaint"];
const NEEDS_SOURCE = ["img2img", "inpaint", "outpaint", "upscale", "restore"];
const FINISHED = ["succeeded", "failed", "cancelled"];

let form;
let source;            // SourceCanvas
let sourceDataURL = null;
let lastSeed = null;
let active = null;     // the job being followed: {id, events, poll, finished}
let shownJob = null;

export function mode() { return $("input[name=mode]:checked", form).value; }

export function setMode(value) {
  const radio = $(`input[name=mode][value="${value}"]`, form);
  radio.checked = true;
  applyMode();
}

function applyMode() {
  const m = mode();
  showForModes(form, m);
  source.setPaintable(m === "inpaint");
  updateSourceInfo();
}

export function initGenerate() {
  form = $("#gen-form");
  source = new SourceCanvas($("#source-canvas"), { onChange: updateSourceInfo });
  for (const radio of $$("input[name=mode]", form)) radio.addEventListener("change", applyMode);
  applyMode();

  // source image: pick or drop
  $("#source-file").addEventListener("change", (e) => {
    const file = e.target.files && e.target.files[0];
    if (file) useSourceFile(file);
    e.target.value = "";
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) useSourceFile(file);
    else notify("Drop an image file (PNG, JPEG or WebP).");
  });

  // mask tools
  const brush = $("#brush-size");
  const brushOut = $("#brush-size-out");
  brush.addEventListener("input", () => { source.brush = Number(brush.value); brushOut.value = brush.value; });
  $("#mask-erase").addEventListener("change", (e) => { source.erase = e.target.checked; });
  $("#mask-undo").addEventListener("click", () => source.undo());
  $("#mask-clear").addEventListener("click", () => source.clear());

  // seed
  $("#seed-random").addEventListener("click", () => { $("#seed").value = -1; });
  $("#seed-reuse").addEventListener("click", () => { if (lastSeed !== null) $("#seed").value = lastSeed; });

  for (const el of [$("#outpaint-px"), $("#scale"), ...$$("input[name=side]", form)]) {
    el.addEventListener("input", updateSourceInfo);
    el.addEventListener("change", updateSourceInfo);
  }
  $("#model").addEventListener("change", () => applyModelDefaults($("#model").value));
  form.addEventListener("submit", (e) => { e.preventDefault(); start(); });
  form.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); start(); }
  });
  $("#cancel").addEventListener("click", cancel);
}

// --------------------------------------------------------------------------- catalog
export async function loadCatalog() {
  const [catalog, tools] = await Promise.all([api("GET", "/v1/models"), api("GET", "/v1/web/tools")]);
  state.catalog = catalog;
  const fill = (select, values, labels = values) => {
    const keep = select.value;
    select.replaceChildren(...values.map((v, i) => h("option", { value: v }, labels[i])));
    if (values.includes(keep)) select.value = keep;
  };
  fill($("#model"), catalog.models.map((m) => m.name), catalog.models.map((m) => m.title));
  fillTool($("#upscaler"), tools.upscalers, tools.default_upscaler);
  fillTool($("#restorer"), tools.restorers, tools.default_restorer);
  fill($("#sampler"), catalog.samplers);
  fill($("#scheduler"), catalog.schedulers);
  const preferred = state.web && state.web.default_model;
  if (preferred && catalog.models.some((m) => m.name === preferred)) $("#model").value = preferred;
  applyModelDefaults($("#model").value);
  const limits = state.web && state.web.limits;
  if (limits) {
    $("#steps").max = limits.max_steps;
    $("#batch").max = limits.max_batch;
    $("#width").max = limits.max_width;
    $("#height").max = limits.max_height;
  }
}

// An upscaler/restorer select; with none installed it says so (the server then explains).
function fillTool(select, names, preferred) {
  if (!names.length) {
    select.replaceChildren(h("option", { value: "" }, "none installed"));
    return;
  }
  const keep = select.value;
  select.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  select.value = names.includes(keep) ? keep : preferred || names[0];
}

function applyModelDefaults(name) {
  const info = state.catalog && state.catalog.models.find((m) => m.name === name);
  if (!info) return;
  const d = info.defaults || {};
  if (d.sampler && state.catalog.samplers.includes(d.sampler)) $("#sampler").value = d.sampler;
  if (d.scheduler && state.catalog.schedulers.includes(d.scheduler)) $("#scheduler").value = d.scheduler;
  if (d.steps) $("#steps").value = d.steps;
  if (d.cfg_scale !== undefined) $("#cfg").value = d.cfg_scale;
  if (d.width) $("#width").value = d.width;
  if (d.height) $("#height").value = d.height;
}

// --------------------------------------------------------------------------- source image
async function useSourceFile(file) {
  const limit = state.web && state.web.limits && state.web.limits.max_upload_bytes;
  try {
    const { dataURL, image } = await loadImageFile(file);
    sourceDataURL = dataURL;
    source.setImage(image);
    fitBrush(source.width, source.height);
    $("#canvas-wrap").hidden = false;
    if (limit && file.size > limit) {
      notify(`This image is ${file.size} bytes; the server accepts at most ${limit}. It will be refused unless you pick a smaller one.`,
        { kind: "warning" });
    }
  } catch (error) {
    notify(`Could not use that file: ${error.message}.`);
  }
}

async function useSourceImage(image) {
  const response = await fetch(image.url, { credentials: "same-origin" });
  if (!response.ok) throw new ApiError(response.status, "image_unavailable", `could not load image ${image.id}`);
  const blob = await response.blob();
  await useSourceFile(new File([blob], `${image.id}.png`, { type: "image/png" }));
}

// A brush that suits the image: about a twelfth of its longer side; the slider reaches half of it.
function fitBrush(width, height) {
  const side = Math.max(width, height);
  const brush = $("#brush-size");
  brush.max = String(Math.max(8, Math.round(side / 2)));
  brush.value = String(Math.max(2, Math.round(side / 12)));
  brush.dispatchEvent(new Event("input"));
}

function updateSourceInfo() {
  const info = $("#source-info");
  if (!source.image) { info.textContent = "No image chosen yet."; return; }
  const m = mode();
  const w = source.width;
  const hgt = source.height;
  let text = `Source: ${w} × ${hgt}.`;
  if (m === "inpaint") text += source.isMaskEmpty() ? " Paint the area to repaint." : " Mask painted.";
  if (m === "outpaint") {
    const s = sides();
    const px = Number($("#outpaint-px").value) || 0;
    const ow = Math.floor(w / 8) * 8 + (s.left + s.right) * px;
    const oh = Math.floor(hgt / 8) * 8 + (s.top + s.bottom) * px;
    text += ` Result: ${ow} × ${oh}.`;
  }
  if (m === "upscale") text += ` Result: ${w * Number($("#scale").value)} × ${hgt * Number($("#scale").value)}.`;
  info.textContent = text;
}

function sides() {
  const out = { left: 0, right: 0, top: 0, bottom: 0 };
  for (const box of $$("input[name=side]", form)) out[box.value] = box.checked ? 1 : 0;
  return out;
}

// --------------------------------------------------------------------------- building the job
class FormProblem extends Error {}

function number(id, label, { integer = true, multipleOf = null } = {}) {
  const input = $(`#${id}`);
  const raw = input.value.trim();
  const value = Number(raw);
  const min = input.min === "" ? -Infinity : Number(input.min);
  const max = input.max === "" ? Infinity : Number(input.max);
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    input.focus();
    throw new FormProblem(`${label} must be ${integer ? "a whole number" : "a number"} from ${min} to ${max}.`);
  }
  if (value < min || value > max) {
    input.focus();
    throw new FormProblem(`${label} must be from ${min} to ${max}; it is ${value}.`);
  }
  if (multipleOf && value % multipleOf !== 0) {
    input.focus();
    throw new FormProblem(`${label} must be a multiple of ${multipleOf}; it is ${value}.`);
  }
  return value;
}

export function buildSpec() {
  const m = mode();
  if (NEEDS_SOURCE.includes(m) && !sourceDataURL) throw new FormProblem("Choose or drop an image first.");
  if (m === "upscale") {
    return { kind: "upscale", image: sourceDataURL, scale: Number($("#scale").value), upscaler: $("#upscaler").value || null };
  }
  if (m === "restore") {
    return { kind: "restore", image: sourceDataURL, restorer: $("#restorer").value || null,
      strength: number("restore-strength", "Restore strength", { integer: false }) };
  }
  const spec = {
    kind: m,
    model: $("#model").value || null,
    prompt: $("#prompt").value,
    negative_prompt: $("#negative").value,
    sampler: $("#sampler").value || null,
    scheduler: $("#scheduler").value || "Automatic",
    steps: number("steps", "Steps"),
    cfg_scale: number("cfg", "CFG scale", { integer: false }),
    batch_size: number("batch", "Batch size"),
    seed: number("seed", "Seed"),
  };
  if (m === "txt2img") {
    spec.width = number("width", "Width", { multipleOf: 8 });
    spec.height = number("height", "Height", { multipleOf: 8 });
    return spec;
  }
  spec.init_image = sourceDataURL;
  spec.denoising_strength = number("strength", "Strength", { integer: false });
  if (m === "inpaint") {
    if (source.isMaskEmpty()) throw new FormProblem("Paint the area to repaint on the image first (the mask is empty).");
    spec.mask_image = source.maskDataURL();
    spec.mask_blur = number("mask-blur", "Mask blur");
  }
  if (m === "outpaint") {
    const s = sides();
    if (!s.left && !s.right && !s.top && !s.bottom) throw new FormProblem("Choose at least one side to extend.");
    const px = number("outpaint-px", "Outpaint pixels", { multipleOf: 8 });
    for (const side of Object.keys(s)) spec[side] = s[side] * px;
  }
  return spec;
}

// --------------------------------------------------------------------------- running a job
async function start() {
  if (active) { notify("A job is already running: wait for it or cancel it.", { kind: "warning" }); return; }
  let spec;
  try {
    spec = buildSpec();
  } catch (error) {
    if (error instanceof FormProblem) { notify(error.message); return; }
    throw error;
  }
  const button = $("#generate");
  button.disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", spec);
    refreshAccount();
    track(job);
  } catch (error) {
    notifyError(error);
    button.disabled = false;
  }
}

function track(job) {
  active = { id: job.id, events: null, poll: null, finished: false };
  $("#progress").hidden = false;
  $("#output-empty").hidden = true;
  $("#preview").hidden = true;
  $("#preview").removeAttribute("src");
  $("#cancel").disabled = false;
  showProgress(job.status, 0, job.progress ? job.progress.total : 0);
  const events = new EventSource(`/v1/jobs/${encodeURIComponent(job.id)}/events`, { withCredentials: true });
  active.events = events;
  events.addEventListener("state", (e) => {
    const data = JSON.parse(e.data);
    showProgress(data.status);
  });
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    showProgress("running", data.step, data.total);
    if (data.preview) {
      const img = $("#preview");
      img.src = data.preview;
      img.hidden = false;
    }
  });
  events.addEventListener("done", (e) => finish(JSON.parse(e.data)));
  events.addEventListener("error", () => {
    // The stream broke before "done" (network, server restart): follow the job by polling.
    if (!active || active.finished || active.id !== job.id) return;
    events.close();
    poll(job.id);
  });
}

function poll(id) {
  const tick = async () => {
    if (!active || active.id !== id || active.finished) return;
    try {
      const job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
      if (FINISHED.includes(job.status)) { finish(job); return; }
      showProgress(job.status, job.progress.step, job.progress.total);
    } catch (error) {
      if (error.status === 401 || error.status === 404) { finishWithError(error); return; }
    }
    active.poll = setTimeout(tick, 700);
  };
  tick();
}

function showProgress(status, step = null, total = null) {
  const bar = $("#progress-bar");
  const label = $("#progress-label");
  if (status === "queued") { label.textContent = "Queued…"; bar.removeAttribute("value"); return; }
  if (step !== null && total) {
    bar.max = total;
    bar.value = step;
    label.textContent = `Step ${step} of ${total}`;
  } else if (status === "running" && !bar.hasAttribute("value")) {
    label.textContent = "Running…";
  }
}

async function cancel() {
  if (!active) return;
  const button = $("#cancel");
  button.disabled = true;
  $("#progress-label").textContent = "Cancelling…";
  try {
    const job = await api("DELETE", `/v1/jobs/${encodeURIComponent(active.id)}`);
    if (FINISHED.includes(job.status)) finish(job);
  } catch (error) {
    notifyError(error);
    button.disabled = false;
  }
}

function stopTracking() {
  if (!active) return;
  active.finished = true;
  if (active.events) active.events.close();
  if (active.poll) clearTimeout(active.poll);
  active = null;
  $("#progress").hidden = true;
  $("#generate").disabled = false;
}

function finishWithError(error) {
  stopTracking();
  notifyError(error);
}

function finish(job) {
  if (!active || active.id !== job.id || active.finished) return;
  stopTracking();
  refreshAccount();
  const n = (job.images || []).length;
  $("#job-status").textContent = job.status === "succeeded" ? `Finished: ${n} image${n === 1 ? "" : "s"}.` : `Job ${job.status}.`;
  if (job.status === "succeeded") {
    showJob(job);
  } else if (job.status === "cancelled") {
    notify(`Cancelled.${job.cost ? " The credits were refunded." : ""}`, { kind: "info" });
    if (!shownJob) $("#output-empty").hidden = false;
  } else {
    const message = job.error && job.error.message ? job.error.message : "no reason was given";
    notify(`The job failed: ${message}`);
    if (!shownJob) $("#output-empty").hidden = false;
  }
}

function showJob(job, selected = 0) {
  shownJob = job;
  const images = job.images || [];
  if (!images.length) return;
  lastSeed = images[0].seed;
  $("#seed-reuse").disabled = false;
  $("#results").hidden = false;
  $("#results").dataset.job = job.id;
  $("#output-empty").hidden = true;
  const thumbs = $("#result-thumbs");
  thumbs.hidden = images.length < 2;
  thumbs.replaceChildren(...images.map((image, i) => h("button", {
    type: "button", role: "listitem", class: i === selected ? "thumb selected" : "thumb",
    "aria-label": `Image ${i + 1} of ${images.length} (seed ${image.seed})`, "aria-pressed": String(i === selected),
    onclick: () => showJob(job, i),
  }, h("img", { src: image.url, alt: "" }))));
  renderDetail($("#result-detail"), { image: images[selected], job }, handlers());
}

// --------------------------------------------------------------------------- other views use these
export function handlers() {
  return { useSettings, sendTo };
}

export function useSettings(job, image) {
  const p = job.params || {};
  const setIf = (id, value) => { if (value !== undefined && value !== null) $(`#${id}`).value = value; };
  if (!DIFFUSION.includes(mode()) || !DIFFUSION.includes(job.kind)) setMode("txt2img");
  else if (job.kind !== mode() && job.kind === "txt2img") setMode("txt2img");
  if (job.model && state.catalog && state.catalog.models.some((m) => m.name === job.model)) $("#model").value = job.model;
  setIf("prompt", p.prompt);
  setIf("negative", p.negative_prompt);
  if (p.sampler && state.catalog.samplers.includes(p.sampler)) $("#sampler").value = p.sampler;
  if (p.scheduler && state.catalog.schedulers.includes(p.scheduler)) $("#scheduler").value = p.scheduler;
  setIf("steps", p.steps);
  setIf("cfg", p.cfg_scale);
  setIf("batch", p.batch_size);
  setIf("width", p.width);
  setIf("height", p.height);
  setIf("strength", p.denoising_strength);
  setIf("seed", image ? image.seed : p.seed);
  navigate("generate");
  notify("The form now has this image's settings.", { kind: "info" });
  $("#prompt").focus();
}

export async function sendTo(target, image) {
  try {
    await useSourceImage(image);
  } catch (error) {
    notifyError(error);
    return;
  }
  setMode(target);
  navigate("generate");
  const names = { img2img: "Image to image", inpaint: "Inpaint", upscale: "Upscale", restore: "Restore" };
  notify(`Image sent to ${names[target] || target}.`, { kind: "info" });
}
