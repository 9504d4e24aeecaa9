// Sign in, first-run admin creation and registration.
import { api, describe } from "./api.js";
import { $, busy, formError } from "./ui.js";

const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;

export function initAuth({ onSignedIn }) {
  const signin = $("#signin-form");
  signin.addEventListener("submit", (e) => {
    e.preventDefault();
    const { username, password } = signin.elements;
    if (!username.value.trim() || !password.value) {
      formError(signin, "Enter your user name and password.");
      (username.value.trim() ? password : username).focus();
      return;
    }
    formError(signin, "");
    busy($("button[type=submit]", signin), async () => {
      const user = await api("POST", "/v1/auth/login", { username: username.value.trim(), password: password.value }, { auth: false });
      password.value = "";
      onSignedIn(user);
    }, (error) => { formError(signin, describe(error)); password.select(); });
  });

  const setup = $("#setup-form");
  setup.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = setup.elements;
    const problem = checkNewAccount(f);
    const credits = Number(f.credits.value);
    if (problem) { formError(setup, problem); return; }
    if (!Number.isInteger(credits) || credits < 0) { formError(setup, "Starting credits must be a whole number, 0 or more."); f.credits.focus(); return; }
    formError(setup, "");
    busy($("button[type=submit]", setup), async () => {
      const user = await api("POST", "/v1/web/setup", { name: f.name.value.trim(), password: f.password.value, credits }, { auth: false });
      setup.reset();
      onSignedIn(user);
    }, (error) => formError(setup, describe(error)));
  });

  const register = $("#register-form");
  register.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = register.elements;
    const problem = checkNewAccount(f);
    if (problem) { formError(register, problem); return; }
    formError(register, "");
    busy($("button[type=submit]", register), async () => {
      const user = await api("POST", "/v1/web/register", { name: f.name.value.trim(), password: f.password.value }, { auth: false });
      register.reset();
      onSignedIn(user);
    }, (error) => formError(register, describe(error)));
  });
}

function checkNewAccount(f) {
  if (!NAME_RE.test(f.name.value.trim())) { f.name.focus(); return "User name: 1 to 64 letters, digits, '_', '.' or '-'."; }
  if (f.password.value.length < 8) { f.password.focus(); return "The password must have at least 8 characters."; }
  if (f.password.value !== f.password2.value) { f.password2.focus(); return "The two passwords differ."; }
  return null;
}
