// WebAuthn glue: JSON options from the server (base64url fields) <-> navigator.credentials.
export const b64u = {
  decode(s) {
    const pad = "=".repeat((4 - (s.length % 4)) % 4);
    const bin = atob((s + pad).replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(bin, (c) => c.charCodeAt(0)).buffer;
  },
  encode(buf) {
    const bytes = new Uint8Array(buf);
    let bin = "";
    for (const b of bytes) bin += String.fromCharCode(b);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  },
};

export function supported() {
  return !!(window.PublicKeyCredential && navigator.credentials);
}

export async function create(options) {
  const publicKey = {
    ...options,
    challenge: b64u.decode(options.challenge),
    user: { ...options.user, id: b64u.decode(options.user.id) },
    excludeCredentials: (options.excludeCredentials || []).map((c) => ({ ...c, id: b64u.decode(c.id) })),
  };
  const cred = await navigator.credentials.create({ publicKey });
  return {
    credential_id: b64u.encode(cred.rawId),
    client_data_json: b64u.encode(cred.response.clientDataJSON),
    attestation_object: b64u.encode(cred.response.attestationObject),
    authenticator_data: cred.response.getAuthenticatorData
      ? b64u.encode(cred.response.getAuthenticatorData())
      : "",
  };
}

export async function get(options) {
  const publicKey = {
    ...options,
    challenge: b64u.decode(options.challenge),
    allowCredentials: (options.allowCredentials || []).map((c) => ({ ...c, id: b64u.decode(c.id) })),
  };
  const cred = await navigator.credentials.get({ publicKey });
  return {
    credential_id: b64u.encode(cred.rawId),
    authenticator_data: b64u.encode(cred.response.authenticatorData),
    client_data_json: b64u.encode(cred.response.clientDataJSON),
    signature: b64u.encode(cred.response.signature),
    user_handle: cred.response.userHandle ? b64u.encode(cred.response.userHandle) : "",
  };
}

// A human sentence for what the browser or the server said.
export function explain(err) {
  if (err && err.name === "NotAllowedError") return "The passkey prompt was cancelled or timed out. Try again.";
  if (err && err.name === "InvalidStateError") return "This passkey is already registered.";
  if (err && err.name === "SecurityError") return "This address cannot use passkeys for this server (check rp_id and the URL you opened).";
  return (err && err.message) || "Something went wrong.";
}
