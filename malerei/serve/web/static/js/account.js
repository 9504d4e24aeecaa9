// The Account view: balance and recent ledger entries; API keys (created, shown once, revoked).
import { api } from "./api.js";
import { setUser, state } from "./state.js";
import { $, busy, h, notify, notifyError, when } from "./ui.js";

const REASONS = { grant: "granted", charge: "job", refund: "refund" };

export function initAccount() {
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    busy($("#key-form button[type=submit]"), createKey);
  });
  $("#new-key-copy").addEventListener("click", async () => {
    const value = $("#new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
      notify("Key copied.", { kind: "info" });
    } catch {
      const range = document.createRange();
      range.selectNodeContents($("#new-key-value"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      notify("Copying is not allowed here: the key is selected, copy it with Ctrl+C.", { kind: "warning" });
    }
  });
}

export async function showAccount() {
  $("#new-key").hidden = true;
  $("#new-key-value").textContent = "";
  try {
    const [credits, keys] = await Promise.all([api("GET", "/v1/account/credits"), api("GET", "/v1/account/keys")]);
    $("#acct-balance").textContent = credits.balance;
    if (state.user) setUser({ ...state.user, balance: credits.balance });
    renderLedger(credits.entries);
    renderKeys(keys.keys);
  } catch (error) {
    notifyError(error);
  }
}

function renderLedger(entries) {
  const rows = entries.slice(0, 20).map((e) => h("tr", {},
    h("td", {}, when(e.created_at)),
    h("td", { class: e.delta < 0 ? "neg" : "pos" }, e.delta > 0 ? `+${e.delta}` : String(e.delta)),
    h("td", {}, [REASONS[e.reason] || e.reason, e.note ? ` (${e.note})` : ""].join(""))));
  $("#ledger-rows").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 3 }, "No changes yet."))]));
}

function renderKeys(keys) {
  const live = keys.filter((k) => !k.revoked);
  const rows = live.map((k) => h("tr", {},
    h("td", {}, k.name || "(no name)"),
    h("td", {}, h("code", {}, k.id)),
    h("td", {}, when(k.created_at)),
    h("td", {}, h("button", {
      type: "button", class: "danger", "aria-label": `Revoke key ${k.name || k.id}`,
      onclick: (e) => busy(e.currentTarget, () => revokeKey(k)),
    }, "Revoke"))));
  $("#key-rows").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 4 }, "No API keys."))]));
}

async function createKey() {
  const created = await api("POST", "/v1/account/keys", { name: $("#key-name").value.trim() });
  $("#key-name").value = "";
  $("#new-key-value").textContent = created.key;
  $("#new-key").hidden = false;
  const keys = await api("GET", "/v1/account/keys");
  renderKeys(keys.keys);
}

async function revokeKey(key) {
  try {
    await api("DELETE", `/v1/account/keys/${encodeURIComponent(key.id)}`);
  } catch (error) {
    notifyError(error);
    return;
  }
  notify(`Key ${key.name || key.id} revoked.`, { kind: "info" });
  const keys = await api("GET", "/v1/account/keys");
  renderKeys(keys.keys);
}
