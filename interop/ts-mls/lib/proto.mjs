// The sovereign.v1 protobuf schema, loaded at runtime from the project's .proto
// (the one the server is generated from), so the interop client can never drift.
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import protobuf from "protobufjs";

const here = dirname(fileURLToPath(import.meta.url));
export const DEFAULT_PROTO = resolve(here, "../../../proto/sovereign/v1/sovereign.proto");

let cached;

/** Load the schema once. Field names are kept as in the .proto (snake_case). */
export function loadSchema(path = process.env.SOVEREIGN_PROTO || DEFAULT_PROTO) {
  if (cached) return cached;
  const root = protobuf.parse(readFileSync(path, "utf8"), { keepCase: true }).root;
  const ns = "sovereign.v1.";
  const MessageType = root.lookupEnum(ns + "MessageType").values; // name -> number
  const typeName = Object.fromEntries(Object.entries(MessageType).map(([k, v]) => [v, k]));
  const T = (name) => root.lookupType(ns + name);
  // Which payload message each envelope type carries (SPEC §3).
  const payloadOf = {
    AUTH_REQUEST: "AuthRequest",
    AUTH_CHALLENGE: "AuthChallenge",
    AUTH_SUCCESS: "AuthSuccess",
    AUTH_ERROR: "AuthError",
    MESSAGE_SEND: "MessageSend",
    MESSAGE_RECEIVE: "MessageReceive",
    MESSAGE_ACK: "MessageAck",
    MESSAGE_DELIVERED: "MessageDelivered",
    MESSAGE_HISTORY_REQUEST: "HistoryRequest",
    MESSAGE_HISTORY_RESPONSE: "HistoryResponse",
    MESSAGE_READ_RECEIPT: "ReadReceipt",
    SYNC_COMPLETE: "SyncComplete",
    GROUP_CREATE: "GroupCreate",
    GROUP_CREATED: "GroupCreated",
    GROUP_INVITE: "GroupInvite",
    GROUP_MEMBER_ADDED: "GroupMemberAdded",
    GROUP_MEMBER_REMOVED: "GroupMemberRemoved",
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
    TYPING_NOTIFY: "TypingNotify",
    PING: "Ping",
    PONG: "Pong",
    ERROR: "Error",
    ACK: "Ack",
  };
  const Envelope = T("Envelope");
  const toObj = (type, msg) =>
    type.toObject(msg, { longs: Number, enums: Number, bytes: Buffer, defaults: true, arrays: true });

  cached = {
    MessageType,
    typeName,
    /** Serialize one Envelope{type, request_id, payload}. */
    encodeEnvelope(typeNameStr, requestId, fields) {
      const type = MessageType[typeNameStr];
      if (type === undefined) throw new Error(`unknown message type ${typeNameStr}`);
      const pname = payloadOf[typeNameStr];
      let payload = new Uint8Array();
      if (pname) {
        const P = T(pname);
        const err = P.verify(fields ?? {});
        if (err) throw new Error(`${pname}: ${err}`);
        payload = P.encode(P.fromObject(fields ?? {})).finish();
      }
      return Envelope.encode(Envelope.create({ type, request_id: requestId, payload })).finish();
    },
    /** Parse one Envelope; `message` is the decoded payload (a plain object) when known. */
    decodeEnvelope(bytes) {
      const env = Envelope.decode(bytes);
      const name = typeName[env.type] ?? String(env.type);
      const pname = payloadOf[name];
      const P = pname ? T(pname) : null;
      const message = P ? toObj(P, P.decode(env.payload)) : env.payload;
      return { type: name, request_id: env.request_id, message };
    },
  };
  return cached;
}
