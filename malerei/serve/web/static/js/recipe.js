// One image shown large with its full recipe and what can be done with it. Used by the
// Generate view (the latest result) and the gallery's viewer.
import { h } from "./ui.js";

const KIND_NAMES = {
  txt2img: "Text to image", img2img: "Image to image", inpaint: "Inpaint", outpaint: "Outpaint",
  upscale: "Upscale", restore: "Restore",
};

const DIFFUSION_FIELDS = [
  ["negative_prompt", "Negative prompt"],
  ["sampler", "Sampler"],
  ["scheduler", "Schedule type"],
  ["steps", "Steps"],
  ["cfg_scale", "CFG scale"],
  ["denoising_strength", "Strength"],
  ["mask_blur", "Mask blur"],
];
const FIELDS = {
  upscale: [["upscaler", "Upscaler"], ["scale", "Scale"]],
  restore: [["restorer", "Restorer"], ["strength", "Restore strength"]],
};

// handlers: useSettings(job, image), sendTo(mode, image), and optionally remove(image)
export function renderDetail(container, { image, job }, handlers) {
  const params = (job && job.params) || {};
  const kind = job ? job.kind : "txt2img";
  const diffusion = !FIELDS[kind];  // upscale/restore have no prompt, model or seed of their own
  const rows = [
    ...(diffusion || image.prompt ? [["Prompt", image.prompt || "—"]] : []),
    ["Kind", KIND_NAMES[kind] || kind],
    ...(diffusion ? [["Model", (job && job.model) || "default"], ["Seed", image.seed]] : []),
    ["Size", `${image.width} × ${image.height}`],
  ];
  for (const [key, label] of FIELDS[kind] || DIFFUSION_FIELDS) {
    const value = params[key];
    if (value !== undefined && value !== null && value !== "") rows.push([label, value]);
  }
  if (params.subseed_strength) rows.push(["Variation", `seed ${params.subseed}, strength ${params.subseed_strength}`]);

  const download = h("a", { class: "button", href: image.url, download: `${image.id}.png` }, "Download PNG");
  const send = (mode, label) => h("button", { type: "button", onclick: () => handlers.sendTo(mode, image) }, label);
  const actions = h("div", { class: "image-actions", role: "group", "aria-label": "Use this image" },
    job && job.params && "prompt" in job.params
      ? h("button", { type: "button", class: "primary", onclick: () => handlers.useSettings(job, image) }, "Use these settings")
      : null,
    download,
    h("span", { class: "send-label" }, "Send to:"),
    send("img2img", "Image to image"), send("inpaint", "Inpaint"), send("upscale", "Upscale"), send("restore", "Restore"),
    handlers.remove ? h("button", { type: "button", class: "danger", onclick: () => handlers.remove(image) }, "Delete") : null,
  );

  container.replaceChildren(
    h("figure", { class: "large" },
      h("img", { src: image.url, alt: `Image for: ${image.prompt || "(no prompt)"}`, width: image.width, height: image.height })),
    actions,
    h("dl", { class: "recipe" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
    image.infotext ? h("details", { class: "infotext" }, h("summary", {}, "Parameters (A1111 text, also in the PNG)"),
      h("pre", {}, image.infotext)) : null,
  );
}
