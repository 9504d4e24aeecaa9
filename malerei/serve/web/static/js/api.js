// The one door to the HTTP API: JSON in and out, every failure an ApiError with a human message.

export class ApiError extends Error {
  constructor(status, code, message, { retryAfter = null, details = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.details = details;
  }
}

// Listeners for 401 answers to calls that expected a signed-in user (the session ended).
const unauthorizedListeners = new Set();
export function onUnauthorized(fn) { unauthorizedListeners.add(fn); }

export async function api(method, path, body = undefined, { auth = true } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network", "Cannot reach the server. Check that `malerei serve` is running and try again.");
  }
  if (response.status === 204) return null;
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!response.ok) {
    const error = errorFrom(response, data);
    if (error.status === 401 && auth) unauthorizedListeners.forEach((fn) => fn(error));
    throw error;
  }
  return data;
}

export function errorFrom(response, data) {
  const detail = data && data.error && typeof data.error === "object" ? data.error : {};
  const retry = response.headers.get("Retry-After");
  return new ApiError(response.status, detail.code || `http_${response.status}`,
    detail.message || response.statusText || `HTTP ${response.status}`,
    { retryAfter: retry ? Number(retry) : null, details: detail.details || null });
}

// What to tell a person about an error: what happened and what they can do.
export function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error && error.message ? error.message : error}`;
  const msg = sentence(error.message);
  switch (error.status) {
    case 0: return error.message;
    case 401: return error.code === "invalid_login" ? "Wrong user name or password." : `You are signed out: ${msg} Please sign in again.`;
    case 402: return `Out of credits: ${msg} Ask an admin for more credits.`;
    case 403: return `Not allowed: ${msg}`;
    case 404: return `Not found: ${msg}`;
    case 409: return msg;
    case 413: return `Too large: ${msg}`;
    case 415: return `Unsupported file: ${msg}`;
    case 422: return `Invalid settings: ${msg}`;
    case 429: {
      if (error.code === "too_many_queued_jobs") return `Too many jobs waiting: ${msg}`;
      const wait = /retry|again/i.test(msg) ? "" : error.retryAfter ? ` Try again in ${error.retryAfter} s.` : " Wait a moment and try again.";
      return `Rate limited: ${msg}${wait}`;
    }
    default:
      return error.status >= 500 ? `The server failed: ${msg}` : msg;
  }
}

// The server's message as a sentence: ends with a full stop (its words are kept as they are).
function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return "";
  return /[.!?]$/.test(t) ? t : `${t}.`;
}
