// MLS (RFC 9420) with ts-mls: this device's identity, its KeyPackages, and the group
// operations the app needs. The server sees only what these functions return as bytes.
//
// Identity: one Ed25519 signature key per device, kept in IndexedDB; every KeyPackage
// and leaf of this device carries it, which is how a device is recognised in a ratchet
// tree (ts-mls compares leaves by signature key) -- e.g. "is this device already a
// member?" before adding it, and which old leaf an external rejoin replaces.
import {
  acceptAll,
  createApplicationMessage,
  createCommit,
  createGroup,
  createGroupInfoWithExternalPubAndRatchetTree,
  decodeGroupState,
  decodeMlsMessage,
  defaultCapabilities,
  emptyPskIndex,
  encodeGroupState,
  encodeMlsMessage,
  generateKeyPackageWithKey,
  getCiphersuiteFromName,
  getCiphersuiteImpl,
  joinGroup,
  joinGroupExternal,
  processMessage,
  type CiphersuiteImpl,
  type ClientState,
  type KeyPackage,
  type PrivateKeyPackage,
} from "ts-mls";
import { defaultClientConfig } from "ts-mls/clientConfig.js";
import { ratchetTreeFromExtension } from "ts-mls/groupInfo.js";
import { decodeKeyPackage, encodeKeyPackage, makeKeyPackageRef } from "ts-mls/keyPackage.js";
import { equalBytes, hex, utf8 } from "./bytes";
import * as store from "./store";

export const SUITE = "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519";
export type State = ClientState;

let impl: CiphersuiteImpl | null = null;
export async function suite(): Promise<CiphersuiteImpl> {
  impl ??= await getCiphersuiteImpl(getCiphersuiteFromName(SUITE));
  return impl;
}

interface Identity {
  userId: string;
  publicKey: Uint8Array;
  signKey: Uint8Array;
}
interface StoredKeyPackage {
  publicPackage: Uint8Array; // encoded KeyPackage
  privatePackage: PrivateKeyPackage;
  lastResort: boolean;
}

export async function identity(userId: string): Promise<Identity> {
  const have = await store.get<Identity>("identity");
  if (have && have.userId === userId) return have;
  const keys = await (await suite()).signature.keygen();
  const id = { userId, publicKey: keys.publicKey, signKey: keys.signKey };
  await store.write({ identity: id });
  return id;
}

function lifetime(days = 60) {
  const now = BigInt(Math.floor(Date.now() / 1000));
  return { notBefore: now - 3600n, notAfter: now + BigInt(days) * 86400n };
}

async function generate(id: Identity) {
  return generateKeyPackageWithKey(
    { credentialType: "basic", identity: utf8.encode(id.userId) },
    defaultCapabilities(),
    lifetime(),
    [],
    { signKey: id.signKey, publicKey: id.publicKey },
    await suite(),
  );
}

/** `count` new KeyPackages (private parts stored first), as upload blobs. */
export async function newKeyPackages(id: Identity, count: number, lastResort = false): Promise<Uint8Array[]> {
  const cs = await suite();
  const blobs: Uint8Array[] = [];
  const entries: Record<string, unknown> = {};
  for (let i = 0; i < count; i++) {
    const kp = await generate(id);
    const ref = hex(await makeKeyPackageRef(kp.publicPackage, cs.hash));
    entries[`kp:${ref}`] = {
      publicPackage: encodeKeyPackage(kp.publicPackage),
      privatePackage: kp.privatePackage,
      lastResort,
    } satisfies StoredKeyPackage;
    blobs.push(encodeMlsMessage({ version: "mls10", wireformat: "mls_key_package", keyPackage: kp.publicPackage }));
  }
  await store.write(entries);
  return blobs;
}

export function encodeState(state: State): Uint8Array {
  return encodeGroupState(state);
}

export function decodeState(bytes: Uint8Array): State {
  const decoded = decodeGroupState(bytes, 0);
  if (!decoded) throw new Error("stored group state does not decode");
  return { ...decoded[0], clientConfig: defaultClientConfig };
}

export function epochOf(state: State): number {
  return Number(state.groupContext.epoch);
}

export function hasLeafWithKey(state: State, signaturePublicKey: Uint8Array): boolean {
  return state.ratchetTree.some((n) => n?.nodeType === "leaf" && equalBytes(n.leaf.signaturePublicKey, signaturePublicKey));
}

export async function newGroup(id: Identity): Promise<State> {
  const cs = await suite();
  const kp = await generate(id);
  return createGroup(cs.rng.randomBytes(32), kp.publicPackage, kp.privatePackage, [], cs);
}

export function decodeAnyKeyPackage(bytes: Uint8Array): KeyPackage {
  try {
    const d = decodeMlsMessage(bytes, 0);
    if (d && d[0].wireformat === "mls_key_package" && d[1] === bytes.length) return d[0].keyPackage;
  } catch {
    /* a bare KeyPackage */
  }
  const bare = decodeKeyPackage(bytes, 0);
  if (!bare || bare[1] !== bytes.length) throw new Error("not a KeyPackage");
  return bare[0];
}

/** A commit adding `adds` (none: an empty commit with an UpdatePath), with GroupInfo. */
export async function commitAdds(state: State, adds: KeyPackage[]) {
  const cs = await suite();
  const r = await createCommit(
    { state, cipherSuite: cs },
    {
      extraProposals: adds.map((keyPackage) => ({ proposalType: "add" as const, add: { keyPackage } })),
      ratchetTreeExtension: true,
    },
  );
  const groupInfo = await createGroupInfoWithExternalPubAndRatchetTree(r.newState, [], cs);
  return {
    newState: r.newState,
    commitData: encodeMlsMessage(r.commit),
    groupInfo: encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo }),
    welcome: r.welcome ? encodeMlsMessage({ version: "mls10", wireformat: "mls_welcome", welcome: r.welcome }) : null,
  };
}

/** Join from a Welcome if it carries a secret for one of our KeyPackages (else null). */
export async function joinFromWelcome(welcomeData: Uint8Array): Promise<State | null> {
  const msg = decodeMlsMessage(welcomeData, 0);
  if (!msg || msg[0].wireformat !== "mls_welcome") return null;
  const welcome = msg[0].welcome;
  for (const s of welcome.secrets) {
    const key = `kp:${hex(s.newMember)}`;
    const kp = await store.get<StoredKeyPackage>(key);
    if (!kp) continue;
    const pub = decodeKeyPackage(kp.publicPackage, 0);
    if (!pub) continue;
    const state = await joinGroup(welcome, pub[0], kp.privatePackage, emptyPskIndex, await suite());
    if (!kp.lastResort) await store.write({ [key]: undefined }); // single use (RFC 9420 §16.8)
    return state;
  }
  return null;
}

/** Rejoin from a GroupInfo by external commit; replaces our old leaf if it is there. */
export async function externalJoin(id: Identity, groupInfoData: Uint8Array) {
  const cs = await suite();
  const msg = decodeMlsMessage(groupInfoData, 0);
  if (!msg || msg[0].wireformat !== "mls_group_info") throw new Error("not a GroupInfo");
  const groupInfo = msg[0].groupInfo;
  const kp = await generate(id);
  const tree = ratchetTreeFromExtension(groupInfo);
  if (!tree) throw new Error("GroupInfo without a ratchet tree");
  const resync = tree.some((n) => n?.nodeType === "leaf" && equalBytes(n.leaf.signaturePublicKey, id.publicKey));
  const r = await joinGroupExternal(groupInfo, kp.publicPackage, kp.privatePackage, resync, cs);
  return finishExternal(r.newState, r.publicMessage, cs);
}

async function finishExternal(newState: State, publicMessage: unknown, cs: CiphersuiteImpl) {
  const groupInfo = await createGroupInfoWithExternalPubAndRatchetTree(newState, [], cs);
  return {
    newState,
    commitData: encodeMlsMessage({ version: "mls10", wireformat: "mls_public_message", publicMessage } as never),
    groupInfo: encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo }),
  };
}

export async function encrypt(state: State, text: string) {
  const r = await createApplicationMessage(state, utf8.encode(text), await suite());
  return {
    newState: r.newState,
    payload: encodeMlsMessage({ version: "mls10", wireformat: "mls_private_message", privateMessage: r.privateMessage }),
  };
}

export type Processed =
  | { kind: "message"; newState: State; data: Uint8Array }
  | { kind: "state"; newState: State };

/** Process a commit or an application message received from another member. */
export async function processIncoming(state: State, bytes: Uint8Array): Promise<Processed> {
  const d = decodeMlsMessage(bytes, 0);
  if (!d) throw new Error("undecodable MLS message");
  const m = d[0];
  if (m.wireformat !== "mls_private_message" && m.wireformat !== "mls_public_message") {
    throw new Error(`unexpected ${m.wireformat}`);
  }
  const r = await processMessage(m, state, emptyPskIndex, acceptAll, await suite());
  if (r.kind === "applicationMessage") return { kind: "message", newState: r.newState, data: r.message };
  return { kind: "state", newState: r.newState };
}

/** The epoch a PrivateMessage / PublicMessage was made in (clear-text header). */
export function messageEpoch(bytes: Uint8Array): number | null {
  try {
    const d = decodeMlsMessage(bytes, 0);
    if (!d) return null;
    const m = d[0];
    if (m.wireformat === "mls_private_message") return Number(m.privateMessage.epoch);
    if (m.wireformat === "mls_public_message") return Number(m.publicMessage.content.epoch);
  } catch {
    /* fallthrough */
  }
  return null;
}
