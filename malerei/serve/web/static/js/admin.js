// The Admin view: users with their credits (grant more), add a user, the registration policy.
import { api } from "./api.js";
import { refreshAccount } from "./state.js";
import { $, busy, h, notify, notifyError } from "./ui.js";

export function initAdmin() {
  const add = $("#adduser-form");
  add.addEventListener("submit", (e) => {
    e.preventDefault();
    busy($("button[type=submit]", add), () => addUser(add));
  });
  const signup = $("#signup-form");
  signup.addEventListener("submit", (e) => {
    e.preventDefault();
    busy($("button[type=submit]", signup), () => savePolicy(signup));
  });
}

export async function showAdmin() {
  try {
    const [users, policy] = await Promise.all([api("GET", "/v1/admin/users"), api("GET", "/v1/web/admin/signup")]);
    renderUsers(users);
    const form = $("#signup-form");
    form.elements.registration_open.checked = policy.registration_open;
    form.elements.signup_credits.value = policy.signup_credits;
  } catch (error) {
    notifyError(error);
  }
}

function renderUsers(users) {
  $("#user-rows").replaceChildren(...users.map((u) => {
    const amount = h("input", { type: "number", name: "amount", step: "1", value: "100", class: "short",
      "aria-label": `Credits to grant ${u.name}` });
    const grant = h("form", { class: "inline-form grant", onsubmit: (e) => {
      e.preventDefault();
      busy($("button", e.currentTarget), () => grantCredits(u.name, amount));
    } }, amount, h("button", { type: "submit" }, "Grant"));
    return h("tr", { dataset: { user: u.name } },
      h("th", { scope: "row" }, u.name),
      h("td", {}, u.is_admin ? "admin" : "user"),
      h("td", { class: "balance" }, String(u.balance)),
      h("td", {}, grant));
  }));
}

async function grantCredits(name, input) {
  const amount = Number(input.value);
  if (!Number.isInteger(amount) || amount === 0) {
    notify("Enter a whole number of credits (negative removes).");
    input.focus();
    return;
  }
  const user = await api("POST", `/v1/admin/users/${encodeURIComponent(name)}/credits`, { amount });
  const row = $(`#user-rows tr[data-user="${CSS.escape(name)}"] .balance`);
  if (row) row.textContent = String(user.balance);
  notify(`${name} now has ${user.balance} credits.`, { kind: "info" });
  refreshAccount();
}

async function addUser(form) {
  const name = form.elements.name.value.trim();
  const password = form.elements.password.value;
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
    notify("User name: 1 to 64 letters, digits, '_', '.' or '-'.");
    form.elements.name.focus();
    return;
  }
  if (password && password.length < 8) {
    notify("The password must have at least 8 characters (or leave it empty for an API-only user).");
    form.elements.password.focus();
    return;
  }
  await api("POST", "/v1/admin/users", { name, password: password || null, is_admin: form.elements.is_admin.checked });
  form.reset();
  notify(`User ${name} added.`, { kind: "info" });
  renderUsers(await api("GET", "/v1/admin/users"));
}

async function savePolicy(form) {
  const credits = Number(form.elements.signup_credits.value);
  if (!Number.isInteger(credits) || credits < 0) {
    notify("Credits for a new account must be a whole number, 0 or more.");
    return;
  }
  const policy = await api("PUT", "/v1/web/admin/signup",
    { registration_open: form.elements.registration_open.checked, signup_credits: credits });
  notify(policy.registration_open ? "Registration is open." : "Registration is closed.", { kind: "info" });
}
