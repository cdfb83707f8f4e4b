// A small protobuf (proto3) codec driven by the schema generated from sovereign.proto.
// Field kinds: string, bytes, bool, the varint integers (int32/uint32/int64/uint64 and
// enums, read as JS numbers: every value on this wire is far below 2^53), and nested
// messages. Unknown fields are skipped. No eval, no code generation at run time (CSP).
import { MESSAGES, TYPES } from "./schema.gen";

export type Msg = Record<string, any>;
export type TypeName = keyof typeof TYPES;
export const T = TYPES;
export const TYPE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(TYPES).map(([k, v]) => [v, k]),
);

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: false });
const VARINTS = new Set(["int32", "uint32", "int64", "uint64", "enum", "bool"]);

class Writer {
  buf = new Uint8Array(64);
  len = 0;
  ensure(n: number) {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }
  varint(v: number) {
    this.ensure(10);
    if (v < 0) v = 2 ** 64 + v; // two's complement for negative int32/int64
    while (v >= 0x80) {
      this.buf[this.len++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.len++] = v;
  }
  bytes(b: Uint8Array) {
    this.varint(b.length);
    this.ensure(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }
  done() {
    return this.buf.slice(0, this.len);
  }
}

export function encode(type: string, msg: Msg): Uint8Array {
  const fields = MESSAGES[type];
  if (!fields) throw new Error(`unknown message ${type}`);
  const w = new Writer();
  for (const [num, name, kind, repeated] of fields) {
    const value = msg[name];
    if (value === undefined || value === null) continue;
    const values = repeated ? (value as unknown[]) : [value];
    for (const v of values) {
      if (VARINTS.has(kind)) {
        const n = kind === "bool" ? (v ? 1 : 0) : Number(v);
        if (!repeated && n === 0) continue; // proto3 default
        w.varint(num * 8);
        w.varint(n);
      } else if (kind === "string") {
        if (!repeated && v === "") continue;
        w.varint(num * 8 + 2);
        w.bytes(utf8.encode(v as string));
      } else if (kind === "bytes") {
        const b = v as Uint8Array;
        if (!repeated && b.length === 0) continue;
        w.varint(num * 8 + 2);
        w.bytes(b);
      } else {
        w.varint(num * 8 + 2);
        w.bytes(encode(kind, v as Msg));
      }
    }
  }
  return w.done();
}

function defaults(type: string): Msg {
  const out: Msg = {};
  for (const [, name, kind, repeated] of MESSAGES[type]) {
    if (repeated) out[name] = [];
    else if (kind === "string") out[name] = "";
    else if (kind === "bytes") out[name] = new Uint8Array();
    else if (kind === "bool") out[name] = false;
    else if (VARINTS.has(kind)) out[name] = 0;
    else out[name] = null;
  }
  return out;
}

export function decode(type: string, data: Uint8Array): Msg {
  const fields = MESSAGES[type];
  if (!fields) throw new Error(`unknown message ${type}`);
  const byNum = new Map(fields.map((f) => [f[0], f]));
  const out = defaults(type);
  let pos = 0;
  const varint = () => {
    let result = 0;
    let mul = 1;
    for (;;) {
      if (pos >= data.length) throw new Error("truncated varint");
      const b = data[pos++];
      result += (b & 0x7f) * mul;
      if (b < 0x80) return result;
      mul *= 0x80;
    }
  };
  while (pos < data.length) {
    const key = varint();
    const num = Math.floor(key / 8);
    const wire = key % 8;
    const field = byNum.get(num);
    let value: unknown;
    if (wire === 0) value = varint();
    else if (wire === 2) {
      const n = varint();
      if (pos + n > data.length) throw new Error("truncated field");
      value = data.subarray(pos, pos + n);
      pos += n;
    } else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else throw new Error(`unsupported wire type ${wire}`);
    if (!field || value === undefined) continue;
    const [, name, kind, repeated] = field;
    let v: unknown;
    if (kind === "bool") v = value !== 0;
    else if (kind === "int32" && (value as number) >= 2 ** 31) v = (value as number) - 2 ** 64;
    else if (VARINTS.has(kind)) v = value;
    else if (kind === "string") v = fromUtf8.decode(value as Uint8Array);
    else if (kind === "bytes") v = new Uint8Array(value as Uint8Array);
    else v = decode(kind, value as Uint8Array);
    if (repeated) (out[name] as unknown[]).push(v);
    else out[name] = v;
  }
  return out;
}

/** The payload message of each type the client sends or receives. */
export const PAYLOAD: Record<string, string> = {
  AUTH_REQUEST: "AuthRequest",
  AUTH_CHALLENGE: "AuthChallenge",
  AUTH_RESPONSE: "AuthResponse",
  AUTH_SUCCESS: "AuthSuccess",
  AUTH_ERROR: "AuthError",
  AUTH_REGISTER_REQUEST: "AuthRegisterRequest",
  AUTH_REGISTER_CHALLENGE: "AuthRegisterChallenge",
  AUTH_REGISTER_RESPONSE: "AuthRegisterResponse",
  AUTH_REGISTER_SUCCESS: "AuthRegisterSuccess",
  MESSAGE_SEND: "MessageSend",
  MESSAGE_RECEIVE: "MessageReceive",
  MESSAGE_ACK: "MessageAck",
  MESSAGE_DELIVERED: "MessageDelivered",
  MESSAGE_HISTORY_REQUEST: "HistoryRequest",
  MESSAGE_HISTORY_RESPONSE: "HistoryResponse",
  MESSAGE_READ: "ReadMarker",
  MESSAGE_READ_RECEIPT: "ReadReceipt",
  SYNC_COMPLETE: "SyncComplete",
  GROUP_CREATE: "GroupCreate",
  GROUP_CREATED: "GroupCreated",
  GROUP_INVITE: "GroupInvite",
  GROUP_MEMBER_ADDED: "GroupMemberAdded",
  GROUP_MEMBER_REMOVED: "GroupMemberRemoved",
  GROUP_LEAVE: "GroupLeave",
  GROUP_REMOVE: "GroupRemove",
  CONVERSATION_LIST_REQUEST: "ConversationListRequest",
  CONVERSATION_LIST: "ConversationList",
  MLS_KEY_PACKAGE_UPLOAD: "MLSKeyPackageUpload",
  MLS_KEY_PACKAGE_FETCH: "MLSKeyPackageFetch",
  MLS_KEY_PACKAGE_RESPONSE: "MLSKeyPackageResponse",
  MLS_WELCOME: "MLSWelcome",
  MLS_WELCOME_RECEIVE: "MLSWelcomeReceive",
  MLS_COMMIT: "MLSCommit",
  MLS_COMMIT_BROADCAST: "MLSCommitBroadcast",
  MLS_KEY_PACKAGE_LOW: "KeyPackageLow",
  MLS_GROUP_INFO_FETCH: "GroupInfoFetch",
  MLS_GROUP_INFO: "GroupInfo",
  PRESENCE_UPDATE: "PresenceUpdate",
  PRESENCE_NOTIFY: "PresenceNotify",
  TYPING: "Typing",
  TYPING_NOTIFY: "TypingNotify",
  USER_LOOKUP: "UserLookup",
  USER_INFO: "UserInfo",
  DEVICE_LIST_REQUEST: "DeviceListRequest",
  DEVICE_LIST: "DeviceList",
  DEVICE_REVOKE: "DeviceRevoke",
  PROFILE_UPDATE: "ProfileUpdate",
  DEVICE_ADDED: "DeviceAdded",
  PING: "Ping",
  PONG: "Pong",
  ERROR: "Error",
  ACK: "Ack",
};

export interface Envelope {
  type: string; // the MessageType name
  requestId: string;
  message: Msg;
}

export function encodeEnvelope(type: string, requestId: string, message: Msg): Uint8Array {
  const cls = PAYLOAD[type];
  const payload = cls ? encode(cls, message) : new Uint8Array();
  return encode("Envelope", { type: (TYPES as Record<string, number>)[type], request_id: requestId, payload });
}

export function decodeEnvelope(data: Uint8Array): Envelope {
  const env = decode("Envelope", data);
  const type = TYPE_NAMES[env.type as number] ?? String(env.type);
  const cls = PAYLOAD[type];
  return { type, requestId: env.request_id as string, message: cls ? decode(cls, env.payload as Uint8Array) : {} };
}
