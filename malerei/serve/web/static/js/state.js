// Who is signed in and what the server offers; views listen for changes.
import { api } from "./api.js";

export const state = {
  web: null,        // GET /v1/web/session: signed_in, user, auth, credits_enabled, setup_needed, ...
  user: null,       // {name, is_admin, balance}
  catalog: null,    // GET /v1/models: models, samplers, schedulers
};

export const events = new EventTarget();

export function setUser(user) {
  state.user = user;
  events.dispatchEvent(new CustomEvent("user", { detail: user }));
}

// Re-reads the balance (after a job is submitted or finishes, on focus, every half minute).
export async function refreshAccount() {
  if (!state.user) return;
  try {
    const me = await api("GET", "/v1/account");
    setUser(me);
  } catch {
    // a failed refresh is not worth a message; the next call that matters reports its error
  }
}

export function navigate(route) {
  if (location.hash !== `#/${route}`) location.hash = `#/${route}`;
  else window.dispatchEvent(new HashChangeEvent("hashchange"));
}
