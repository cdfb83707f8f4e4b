// Passkeys with the browser's own WebAuthn (navigator.credentials). The server sends the
// options as JSON (py_webauthn's options_to_json: binary fields base64url); the answers
// go back as the protobuf messages of SPEC §3 (AuthRegisterResponse, AuthResponse).
import { b64urlDecode } from "./bytes";
import type { Msg } from "./proto";

function buf(b: ArrayBuffer | null | undefined): Uint8Array {
  return b ? new Uint8Array(b) : new Uint8Array();
}

export async function createPasskey(optionsJson: Uint8Array): Promise<Msg> {
  const o = JSON.parse(new TextDecoder().decode(optionsJson));
  const publicKey: PublicKeyCredentialCreationOptions = {
    ...o,
    challenge: b64urlDecode(o.challenge),
    user: { ...o.user, id: b64urlDecode(o.user.id) },
    excludeCredentials: (o.excludeCredentials ?? []).map((c: { id: string; type: string }) => ({
      ...c,
      id: b64urlDecode(c.id),
    })),
  };
  const cred = (await navigator.credentials.create({ publicKey })) as PublicKeyCredential | null;
  if (!cred) throw new Error("no passkey was created");
  const r = cred.response as AuthenticatorAttestationResponse;
  return {
    credential_id: buf(cred.rawId),
    authenticator_data: buf(r.getAuthenticatorData?.()),
    client_data_json: buf(r.clientDataJSON),
    attestation_object: buf(r.attestationObject),
  };
}

export async function usePasskey(optionsJson: Uint8Array): Promise<Msg> {
  const o = JSON.parse(new TextDecoder().decode(optionsJson));
  const publicKey: PublicKeyCredentialRequestOptions = {
    ...o,
    challenge: b64urlDecode(o.challenge),
    allowCredentials: (o.allowCredentials ?? []).map((c: { id: string; type: string }) => ({
      ...c,
      id: b64urlDecode(c.id),
    })),
  };
  const cred = (await navigator.credentials.get({ publicKey })) as PublicKeyCredential | null;
  if (!cred) throw new Error("no passkey was used");
  const r = cred.response as AuthenticatorAssertionResponse;
  return {
    credential_id: buf(cred.rawId),
    authenticator_data: buf(r.authenticatorData),
    client_data_json: buf(r.clientDataJSON),
    signature: buf(r.signature),
    user_handle: buf(r.userHandle),
  };
}
