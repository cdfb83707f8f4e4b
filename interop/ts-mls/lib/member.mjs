// An MLS group member (ts-mls) that uses Sovereign as its Delivery Service.
//
// The server never decrypts: it routes KeyPackages, Welcomes, commits and
// application messages (PrivateMessage) as opaque bytes, orders commits per
// conversation (one seq), and rejects a commit for a stale epoch with 5004.
//
// Conversation events (MESSAGE_RECEIVE, MLS_COMMIT_BROADCAST, GROUP_MEMBER_*) are
// applied strictly in seq order, whether they arrive as pushes or as the echo of this
// member's own request, so the MLS state follows exactly the server's history.
import {
  acceptAll,
  createApplicationMessage,
  createCommit,
  createGroup,
  createGroupInfoWithExternalPubAndRatchetTree,
  decodeMlsMessage,
  defaultCapabilities,
  emptyPskIndex,
  encodeMlsMessage,
  generateKeyPackageWithKey,
  getCiphersuiteFromName,
  getCiphersuiteImpl,
  joinGroup,
  joinGroupExternal,
  processMessage,
} from "ts-mls";
import { decodeKeyPackage, encodeKeyPackage, makeKeyPackageRef } from "ts-mls/keyPackage.js";
import { Connection, PushTimeout, ServerError } from "./transport.mjs";

export const DEFAULT_SUITE = "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519";
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
const hex = (b) => Buffer.from(b).toString("hex");

export async function suiteImpl(name = DEFAULT_SUITE) {
  return getCiphersuiteImpl(getCiphersuiteFromName(name));
}

/** A realistic KeyPackage lifetime: valid from an hour ago for 30 days. */
export function lifetime(days = 30) {
  const now = BigInt(Math.floor(Date.now() / 1000));
  return { notBefore: now - 3600n, notAfter: now + BigInt(days) * 86400n };
}

/** Decode a KeyPackage served by the DS: MLSMessage(mls_key_package) or bare. */
export function decodeAnyKeyPackage(bytes) {
  const u8 = new Uint8Array(bytes);
  try {
    const decoded = decodeMlsMessage(u8, 0);
    if (decoded && decoded[0].wireformat === "mls_key_package" && decoded[1] === u8.length) {
      return decoded[0].keyPackage;
    }
  } catch {
    /* not an MLSMessage: try a bare KeyPackage */
  }
  const bare = decodeKeyPackage(u8, 0);
  if (!bare || bare[1] !== u8.length) throw new Error("not a KeyPackage");
  return bare[0];
}

export function decodeMls(bytes, wireformat) {
  const u8 = new Uint8Array(bytes);
  const decoded = decodeMlsMessage(u8, 0);
  if (!decoded) throw new Error(`undecodable MLSMessage (expected ${wireformat})`);
  const [msg, len] = decoded;
  if (len !== u8.length) throw new Error(`trailing bytes after MLSMessage (${wireformat})`);
  if (wireformat && msg.wireformat !== wireformat) {
    throw new Error(`expected ${wireformat}, got ${msg.wireformat}`);
  }
  return msg;
}

export class Member {
  /**
   * @param {Connection} conn an authenticated connection
   * @param impl a ts-mls CiphersuiteImpl
   */
  constructor(conn, impl, { name, userId, username }) {
    this.conn = conn;
    this.impl = impl;
    this.name = name;
    this.userId = userId;
    this.username = username;
    this.keyPackages = new Map(); // KeyPackageRef hex -> {publicPackage, privatePackage}
    this.conversationId = null;
    this.state = undefined; // ts-mls ClientState, undefined until joined
    this.joinedEpoch = null; // epoch at which this member (re)joined
    this.joinedEpochs = []; // every (re)join, in order
    this.lastSeq = null; // highest conversation seq applied
    this.buffer = new Map(); // seq -> event not yet applied
    this.lastEventId = null;
    this.unacked = 0;
    this.received = []; // decrypted application messages
    this.skipped = []; // events this member could not (and need not) decrypt
    this.membership = []; // GROUP_MEMBER_ADDED/REMOVED user ids, in order
    this.commitsApplied = []; // {seq, epoch, sender_id, own}
    this.keyPackageLow = [];
    this.sent = 0;
  }

  static async connect(url, { name, token, userId, username, suite = DEFAULT_SUITE }) {
    const conn = await Connection.open(url, token, { label: name });
    if (userId && conn.userId !== userId) {
      throw new Error(`${name}: token belongs to ${conn.userId}, not ${userId}`);
    }
    const m = new Member(conn, await suiteImpl(suite), {
      name,
      userId: conn.userId,
      username: username || conn.username,
    });
    m.signatureKeys = await m.impl.signature.keygen(); // this client's MLS identity key
    return m;
  }

  get epoch() {
    return this.state ? Number(this.state.groupContext.epoch) : null;
  }

  get epochAuthenticator() {
    return this.state ? hex(this.state.keySchedule.epochAuthenticator) : null;
  }

  // ---------------------------------------------------------------- KeyPackages --
  /** A fresh KeyPackage bound to `identity` (default: our user_id) and our signature key. */
  async newKeyPackage({ identity = this.userId, impl = this.impl, signatureKeys } = {}) {
    const keys = signatureKeys ?? (impl === this.impl ? this.signatureKeys : await impl.signature.keygen());
    const kp = await generateKeyPackageWithKey(
      { credentialType: "basic", identity: utf8.encode(identity) },
      defaultCapabilities(),
      lifetime(),
      [],
      keys,
      impl,
    );
    return kp;
  }

  async remember(kp) {
    const ref = await makeKeyPackageRef(kp.publicPackage, this.impl.hash);
    this.keyPackages.set(hex(ref), kp);
  }

  /**
   * Upload `count` KeyPackages in one batch: every other one as MLSMessage
   * (mls_key_package), the others bare (SPEC §7 accepts both). Returns Ack.count.
   */
  async uploadKeyPackages(count, { lastResort = false } = {}) {
    const blobs = [];
    for (let i = 0; i < count; i++) {
      const kp = await this.newKeyPackage();
      await this.remember(kp);
      blobs.push(
        i % 2 === 0
          ? encodeMlsMessage({ version: "mls10", wireformat: "mls_key_package", keyPackage: kp.publicPackage })
          : encodeKeyPackage(kp.publicPackage),
      );
    }
    const ack = await this.conn.request(
      "MLS_KEY_PACKAGE_UPLOAD",
      { key_packages: blobs, last_resort: lastResort },
      { expect: "ACK" },
    );
    return ack.count;
  }

  /** Upload raw KeyPackage bytes; resolves {ok, count} or {ok:false, code, message}. */
  async uploadRaw(blobs, { lastResort = false } = {}) {
    try {
      const ack = await this.conn.request(
        "MLS_KEY_PACKAGE_UPLOAD",
        { key_packages: blobs, last_resort: lastResort },
        { expect: "ACK" },
      );
      return { ok: true, count: ack.count };
    } catch (e) {
      if (e instanceof ServerError) return { ok: false, code: e.code, message: e.serverMessage };
      throw e;
    }
  }

  /** MLS_KEY_PACKAGE_FETCH: one KeyPackage per device of `userId`, decoded and verified. */
  async fetchKeyPackages(userId) {
    const res = await this.conn.request("MLS_KEY_PACKAGE_FETCH", { user_id: userId }, { expect: "MLS_KEY_PACKAGE_RESPONSE" });
    if (res.user_id !== userId) throw new Error(`${this.name}: KeyPackage response for ${res.user_id}`);
    if (!res.key_packages.length) throw new Error(`${this.name}: no KeyPackage for ${userId}`);
    return res.key_packages.map((d) => {
      const kp = decodeAnyKeyPackage(d.key_package_data);
      const cred = kp.leafNode.credential;
      if (cred.credentialType !== "basic" || fromUtf8.decode(cred.identity) !== userId) {
        throw new Error(`${this.name}: fetched KeyPackage is not bound to ${userId}`);
      }
      return { deviceId: d.device_id, keyPackage: kp };
    });
  }

  // -------------------------------------------------------------- conversation --
  async createConversation(title, memberIds) {
    const created = await this.conn.request("GROUP_CREATE", { title, member_ids: memberIds }, { expect: "GROUP_CREATED" });
    this.conversationId = created.conversation_id;
    return created;
  }

  /** Create the MLS group (epoch 0) for our conversation; the first commit binds it. */
  async createMlsGroup() {
    const kp = await this.newKeyPackage();
    const groupId = this.impl.rng.randomBytes(32);
    this.state = await createGroup(groupId, kp.publicPackage, kp.privatePackage, [], this.impl);
    this.joinedEpoch = 0;
    this.joinedEpochs.push(0);
    this.groupIdHex = hex(groupId);
  }

  async conversationList() {
    const res = await this.conn.request("CONVERSATION_LIST_REQUEST", {}, { expect: "CONVERSATION_LIST" });
    return res.conversations;
  }

  async serverEpoch() {
    const conv = (await this.conversationList()).find((c) => c.conversation_id === this.conversationId);
    if (!conv) throw new Error(`${this.name}: conversation not listed`);
    return conv.mls_epoch;
  }

  // ------------------------------------------------------------------- commits --
  /** Build a commit (not sent yet) from the current state. */
  async prepareCommit({ adds = [], publicMessage = false } = {}) {
    await this.drain();
    if (!this.state) throw new Error(`${this.name}: not in the MLS group`);
    const base = this.state;
    const proposals = adds.map((a) => ({ proposalType: "add", add: { keyPackage: a.keyPackage } }));
    const r = await createCommit(
      { state: base, cipherSuite: this.impl },
      { extraProposals: proposals, ratchetTreeExtension: true, wireAsPublicMessage: publicMessage },
    );
    const groupInfo = await createGroupInfoWithExternalPubAndRatchetTree(r.newState, [], this.impl);
    const welcomeData = r.welcome
      ? encodeMlsMessage({ version: "mls10", wireformat: "mls_welcome", welcome: r.welcome })
      : null;
    const recipients = [...new Set(adds.map((a) => a.userId))];
    return {
      epoch: Number(base.groupContext.epoch),
      newState: r.newState,
      fields: {
        conversation_id: this.conversationId,
        commit_data: encodeMlsMessage(r.commit),
        group_info: encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo }),
        welcomes: welcomeData
          ? recipients.map((uid) => ({ conversation_id: this.conversationId, recipient_id: uid, welcome_data: welcomeData }))
          : [],
      },
    };
  }

  /**
   * Send a prepared commit. Accepted: the echoed MLS_COMMIT_BROADCAST is applied at
   * its seq (our pending state becomes current) → {ok:true, seq, epoch}. Rejected:
   * the pending state is dropped → {ok:false, code, message}.
   */
  async submitCommit(prepared, { applied } = {}) {
    const env = await this.conn.request("MLS_COMMIT", prepared.fields);
    if (env.type === "ERROR") {
      return { ok: false, code: env.message.code, message: env.message.message, epoch: prepared.epoch };
    }
    if (env.type !== "MLS_COMMIT_BROADCAST") throw new Error(`${this.name}: MLS_COMMIT answered ${env.type}`);
    const b = env.message;
    if (b.sender_id !== this.userId || b.conversation_id !== this.conversationId) {
      throw new Error(`${this.name}: echo names ${b.sender_id}/${b.conversation_id}`);
    }
    if (b.epoch !== prepared.epoch) throw new Error(`${this.name}: echo epoch ${b.epoch} != ${prepared.epoch}`);
    if (applied) {
      applied(b); // external join: the state is set now; the seq only needs marking done
      this.commitsApplied.push({ seq: b.seq, epoch: b.epoch, sender_id: b.sender_id, own: true, external: true });
      this.buffer.set(b.seq, { type: "OWN", message: b });
    } else {
      this.buffer.set(b.seq, { type: "OWN_COMMIT", message: b, newState: prepared.newState });
    }
    await this.until(() => this.lastSeq >= b.seq, 10_000, `own commit seq ${b.seq}`);
    return { ok: true, seq: b.seq, epoch: b.epoch };
  }

  async commit(opts) {
    return this.submitCommit(await this.prepareCommit(opts));
  }

  /** Add every device of each user: fetch KeyPackages, commit with Welcome + GroupInfo. */
  async addMembers(userIds) {
    const adds = [];
    for (const uid of userIds) {
      for (const d of await this.fetchKeyPackages(uid)) adds.push({ userId: uid, keyPackage: d.keyPackage });
    }
    const prepared = await this.prepareCommit({ adds });
    const res = await this.submitCommit(prepared);
    if (!res.ok) throw new Error(`${this.name}: add commit refused: ${res.code} ${res.message}`);
    this.lastWelcomeData = prepared.fields.welcomes[0]?.welcome_data;
    return res;
  }

  /** Commit (empty, with an UpdatePath) and retry after every 5004 until accepted. */
  async commitWithRetry({ maxAttempts = 10 } = {}) {
    const failures = [];
    for (let i = 0; i < maxAttempts; i++) {
      const res = await this.commit();
      if (res.ok) return { ...res, failures };
      if (res.code !== 5004) throw new Error(`${this.name}: commit refused ${res.code} ${res.message}`);
      failures.push(res);
      await this.until(() => this.epoch > res.epoch, 10_000, `a commit past epoch ${res.epoch}`);
    }
    throw new Error(`${this.name}: commit not accepted after ${maxAttempts} attempts`);
  }

  /** Forget the MLS state, fetch the stored GroupInfo and rejoin by external commit (resync). */
  async rejoinExternal() {
    await this.drain();
    this.state = undefined;
    this.joinedEpoch = null;
    const gi = await this.conn.request("MLS_GROUP_INFO_FETCH", { conversation_id: this.conversationId }, { expect: "MLS_GROUP_INFO" });
    if (gi.conversation_id !== this.conversationId) throw new Error(`${this.name}: GroupInfo for ${gi.conversation_id}`);
    const groupInfo = decodeMls(gi.group_info, "mls_group_info").groupInfo;
    if (Number(groupInfo.groupContext.epoch) !== gi.epoch) {
      throw new Error(`${this.name}: GroupInfo epoch ${groupInfo.groupContext.epoch} != served epoch ${gi.epoch}`);
    }
    // Same signature key (same client), fresh HPKE keys: resync=true removes our old leaf.
    const kp = await this.newKeyPackage();
    const { publicMessage, newState } = await joinGroupExternal(groupInfo, kp.publicPackage, kp.privatePackage, true, this.impl);
    const newGroupInfo = await createGroupInfoWithExternalPubAndRatchetTree(newState, [], this.impl);
    const prepared = {
      epoch: gi.epoch,
      newState,
      fields: {
        conversation_id: this.conversationId,
        commit_data: encodeMlsMessage({ version: "mls10", wireformat: "mls_public_message", publicMessage }),
        group_info: encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo: newGroupInfo }),
        welcomes: [],
      },
    };
    const res = await this.submitCommit(prepared, {
      applied: () => {
        this.state = newState;
        this.joinedEpoch = Number(newState.groupContext.epoch);
        this.joinedEpochs.push(this.joinedEpoch);
      },
    });
    return { ...res, groupInfoEpoch: gi.epoch };
  }

  // ------------------------------------------------------------------ messages --
  /** Encrypt `text` as an MLS PrivateMessage and send it (MESSAGE_SEND). */
  async sendText(text) {
    await this.drain();
    if (!this.state) throw new Error(`${this.name}: not in the MLS group`);
    const body = utf8.encode(JSON.stringify({ from: this.userId, text }));
    const r = await createApplicationMessage(this.state, body, this.impl);
    this.state = r.newState;
    const payload = encodeMlsMessage({ version: "mls10", wireformat: "mls_private_message", privateMessage: r.privateMessage });
    const echo = await this.conn.request(
      "MESSAGE_SEND",
      { conversation_id: this.conversationId, encrypted_payload: payload, message_type: "mls" },
      { expect: "MESSAGE_RECEIVE" },
    );
    if (echo.sender_id !== this.userId) throw new Error(`${this.name}: echo sender ${echo.sender_id}`);
    if (!Buffer.from(echo.encrypted_payload).equals(Buffer.from(payload))) {
      throw new Error(`${this.name}: the server altered the ciphertext`);
    }
    this.sent += 1;
    this.buffer.set(echo.seq, { type: "OWN", message: echo });
    await this.drain();
    return { seq: echo.seq, epoch: this.epoch };
  }

  /** Wait until texts from each of `expected` ({userId: [text...]}) were decrypted. */
  async waitForTexts(expected, timeoutMs = 10_000) {
    const have = () =>
      Object.entries(expected).every(([uid, texts]) =>
        texts.every((t) => this.received.some((r) => r.from === uid && r.text === t)),
      );
    await this.until(have, timeoutMs, `texts ${JSON.stringify(expected)}`);
  }

  // ------------------------------------------------------------- event pipeline --
  /** Pump pushes until `pred()` holds (applying everything in order). */
  async until(pred, timeoutMs = 10_000, what = "condition") {
    const deadline = Date.now() + timeoutMs;
    await this.drain();
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${this.name}: timed out waiting for ${what}`);
      let env;
      try {
        env = await this.conn.nextPush(left);
      } catch (e) {
        if (e instanceof PushTimeout) throw new Error(`${this.name}: timed out waiting for ${what}`);
        throw e;
      }
      await this.onPush(env);
    }
    await this.flushAck();
  }

  /** Apply whatever pushes already arrived, without waiting. */
  async drain() {
    while (this.conn.pushes.length) await this.onPush(this.conn.pushes.shift());
    await this.apply();
  }

  async onPush(env) {
    const m = env.message;
    switch (env.type) {
      case "MESSAGE_RECEIVE":
      case "MLS_COMMIT_BROADCAST":
      case "GROUP_MEMBER_ADDED":
      case "GROUP_MEMBER_REMOVED":
        if (this.conversationId === null) this.conversationId = m.conversation_id;
        if (m.conversation_id !== this.conversationId) throw new Error(`${this.name}: event for unknown conversation`);
        if (this.lastSeq === null) this.lastSeq = m.seq - 1; // our cursor's starting point
        if (m.seq <= this.lastSeq) return; // duplicate (at-least-once)
        this.buffer.set(m.seq, env);
        await this.apply();
        return;
      case "MLS_WELCOME_RECEIVE":
        await this.onWelcome(m);
        await this.apply();
        return;
      case "MLS_KEY_PACKAGE_LOW":
        this.keyPackageLow.push(m);
        return;
      case "PRESENCE_NOTIFY":
      case "TYPING_NOTIFY":
      case "MESSAGE_DELIVERED":
      case "MESSAGE_READ_RECEIPT":
        return;
      case "ERROR":
        throw new Error(`${this.name}: unsolicited server error ${m.code} ${m.message}`);
      default:
        throw new Error(`${this.name}: unexpected push ${env.type}`);
    }
  }

  async onWelcome(w) {
    if (this.state) {
      this.skipped.push({ kind: "welcome-while-member", event_id: w.event_id });
      return;
    }
    const welcome = decodeMls(w.welcome_data, "mls_welcome").welcome;
    let mine;
    for (const s of welcome.secrets) {
      mine = this.keyPackages.get(hex(s.newMember));
      if (mine) break;
    }
    if (!mine) throw new Error(`${this.name}: Welcome for none of our KeyPackages`);
    this.state = await joinGroup(welcome, mine.publicPackage, mine.privatePackage, emptyPskIndex, this.impl);
    this.joinedEpoch = this.epoch;
    this.joinedEpochs.push(this.joinedEpoch);
    this.conversationId ??= w.conversation_id;
    if (w.conversation_id !== this.conversationId) throw new Error(`${this.name}: Welcome for another conversation`);
    this.welcomedBy = w.sender_id;
    this.conn.send("MESSAGE_ACK", { message_ids: [w.event_id] }); // welcomes are acked one by one
  }

  /** Apply buffered conversation events with consecutive seqs. */
  async apply() {
    while (this.lastSeq !== null && this.buffer.has(this.lastSeq + 1)) {
      const seq = this.lastSeq + 1;
      const env = this.buffer.get(seq);
      const needsState = env.type === "MESSAGE_RECEIVE" || env.type === "MLS_COMMIT_BROADCAST";
      if (needsState && !this.state) return; // not (yet / any more) in the group: wait for a join
      this.buffer.delete(seq);
      await this.applyOne(seq, env);
      this.lastSeq = seq;
      if (env.message.event_id || env.message.message_id) {
        this.lastEventId = env.message.event_id || env.message.message_id;
        this.unacked += 1;
      }
    }
    if (this.unacked >= 8) await this.flushAck();
  }

  async flushAck({ confirm = false } = {}) {
    if (!this.unacked || !this.lastEventId) return;
    // Cumulative per conversation (SPEC §5). Without request_id: fire and forget (an
    // error would still arrive as a push and fail the pump).
    const ids = { message_ids: [this.lastEventId] };
    this.unacked = 0;
    if (confirm) await this.conn.request("MESSAGE_ACK", ids, { expect: "ACK" });
    else this.conn.send("MESSAGE_ACK", ids);
  }

  async applyOne(seq, env) {
    const m = env.message;
    switch (env.type) {
      case "OWN":
        return;
      case "OWN_COMMIT":
        this.state = env.newState;
        this.commitsApplied.push({ seq, epoch: m.epoch, sender_id: m.sender_id, own: true });
        return;
      case "GROUP_MEMBER_ADDED":
      case "GROUP_MEMBER_REMOVED":
        this.membership.push({ type: env.type, user_id: m.user_id, seq });
        return;
      case "MLS_COMMIT_BROADCAST": {
        if (m.epoch < this.joinedEpoch) {
          this.skipped.push({ kind: "commit-before-join", seq, epoch: m.epoch });
          return;
        }
        if (m.epoch !== this.epoch) {
          throw new Error(`${this.name}: broadcast commit for epoch ${m.epoch} at our epoch ${this.epoch} (seq ${seq})`);
        }
        if (m.sender_id === this.userId) {
          throw new Error(`${this.name}: a commit of ours we did not get an echo for (seq ${seq})`);
        }
        const msg = decodeMls(m.commit_data);
        const r = await processMessage(msg, this.state, emptyPskIndex, acceptAll, this.impl);
        if (r.kind !== "newState") throw new Error(`${this.name}: commit decoded as ${r.kind}`);
        this.state = r.newState;
        if (this.epoch !== m.epoch + 1) throw new Error(`${this.name}: commit led to epoch ${this.epoch}`);
        this.commitsApplied.push({ seq, epoch: m.epoch, sender_id: m.sender_id, own: false });
        return;
      }
      case "MESSAGE_RECEIVE": {
        const msg = decodeMls(m.encrypted_payload, "mls_private_message");
        const epoch = Number(msg.privateMessage.epoch);
        if (epoch < this.joinedEpoch) {
          this.skipped.push({ kind: "message-before-join", seq, epoch });
          return;
        }
        if (m.sender_id === this.userId) {
          // Our own message sent from another device would be undecryptable for us too.
          this.skipped.push({ kind: "own-message", seq, epoch });
          return;
        }
        const r = await processMessage(msg, this.state, emptyPskIndex, acceptAll, this.impl);
        if (r.kind !== "applicationMessage") throw new Error(`${this.name}: message decoded as ${r.kind}`);
        this.state = r.newState;
        const body = JSON.parse(fromUtf8.decode(r.message));
        if (body.from !== m.sender_id) {
          throw new Error(`${this.name}: message claims ${body.from} but the server says ${m.sender_id}`);
        }
        this.received.push({ from: body.from, text: body.text, seq, epoch });
        return;
      }
      default:
        throw new Error(`${this.name}: cannot apply ${env.type}`);
    }
  }

  summary() {
    return {
      user_id: this.userId,
      epoch: this.epoch,
      joined_epoch: this.joinedEpoch,
      joined_epochs: this.joinedEpochs,
      epoch_authenticator: this.epochAuthenticator,
      last_seq: this.lastSeq,
      members_in_tree: this.state
        ? this.state.ratchetTree.filter((n) => n && n.nodeType === "leaf").map((n) => fromUtf8.decode(n.leaf.credential.identity))
        : [],
      received: this.received.map((r) => ({ from: r.from, text: r.text, epoch: r.epoch, seq: r.seq })),
      sent: this.sent,
      commits_applied: this.commitsApplied,
      skipped: this.skipped,
      key_package_low: this.keyPackageLow.length,
    };
  }

  async close() {
    await this.drain(); // a late push (an error included) still counts
    await this.flushAck({ confirm: true });
    await this.conn.close();
  }
}
