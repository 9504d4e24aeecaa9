// Small DOM helpers shared by the views: element building, notices, form errors, busy buttons.
import { describe } from "./api.js";

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

// h("button", {type: "button", onclick: fn, class: "ghost"}, "text", childNode, ...)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// A message at the top of the page. Errors stay until dismissed; other notices fade.
export function notify(message, { kind = "error", timeout = null } = {}) {
  const box = $("#notices");
  const text = h("span", { class: "notice-text" }, message);
  const close = h("button", { type: "button", class: "ghost", "aria-label": "Dismiss message" }, "×");
  const note = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text, close);
  close.addEventListener("click", () => note.remove());
  box.append(note);
  while (box.children.length > 3) box.firstElementChild.remove();
  const ms = timeout ?? (kind === "error" ? null : 5000);
  if (ms) setTimeout(() => note.remove(), ms);
  return note;
}

export function notifyError(error) { return notify(describe(error), { kind: "error" }); }

export function clearNotices() { $("#notices").replaceChildren(); }

export function formError(form, message) {
  const p = $(".form-error", form);
  p.textContent = message || "";
  p.hidden = !message;
}

// Runs fn with the button disabled; errors go to onError (default: a notice).
export async function busy(button, fn, onError = notifyError) {
  if (button.disabled) return undefined;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (error) {
    onError(error);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

export function showForModes(root, mode) {
  for (const el of $$("[data-modes]", root)) el.hidden = !el.dataset.modes.split(" ").includes(mode);
}

export function when(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}
