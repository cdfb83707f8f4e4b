import { POST } from "./api.js";
import { create, explain, supported } from "./webauthn.js";

const form = document.getElementById("setup-form");
const error = document.getElementById("setup-error");
const submit = document.getElementById("setup-submit");
const token = new URLSearchParams(location.search).get("token") || "";

function showError(message) {
  error.textContent = message;
  error.hidden = false;
}

if (!token) {
  showError("This page needs the setup link the server printed at start-up (…/admin/setup?token=…).");
  submit.disabled = true;
} else if (!supported()) {
  showError("This browser has no passkey support. Use a current Chrome, Edge, Safari or Firefox.");
  submit.disabled = true;
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  error.hidden = true;
  const username = form.username.value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}$/.test(username)) {
    showError("Username: 1–32 letters, digits, '_', '.' or '-', starting with a letter or digit.");
    form.username.focus();
    return;
  }
  submit.disabled = true;
  submit.textContent = "Waiting for your passkey…";
  try {
    const options = await POST("/setup/options", {
      token,
      username,
      display_name: form.display_name.value.trim(),
    });
    const attestation = await create(options);
    await POST("/setup/verify", attestation);
    // The URL held the one-time code: leave it behind.
    location.replace("/admin/#/dashboard");
  } catch (err) {
    showError(explain(err));
    submit.disabled = false;
    submit.textContent = "Create admin with a passkey";
  }
});
