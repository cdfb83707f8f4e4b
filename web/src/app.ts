// The client model: one device of one user. Owns the connection (reconnect with backoff,
// resume by token, catch-up to SYNC_COMPLETE), the MLS groups (one per conversation)
// and the local copy of what this device decrypted. The UI only reads it and calls its
// actions; `changed()` tells it to re-render.
//
// MLS state handling (docs/web-client.md):
// - Conversation events are applied strictly in seq order, one conversation at a time
//   (a per-conversation lock); gaps are filled with MESSAGE_HISTORY_REQUEST forward.
// - After each event the group state, the conversation record and any message are
//   written to IndexedDB in ONE transaction, and only then is the event acknowledged:
//   a reload resumes exactly after the last applied event.
// - Our own commits and messages: the new state is persisted before the request goes
//   out; the echo (or, after a reconnect, the push of the same bytes) applies it.
// - 5004: another commit won the epoch; we apply it and build ours again.
// - No state for a conversation we belong to (new device, or state lost/forked): wait
//   for a Welcome a little, then rejoin with an external commit from the stored GroupInfo.
import { equalBytes, fromUtf8, newRequestId, sleep } from "./bytes";
import * as mls from "./mls";
import { decodeEnvelope, encode, type Envelope, type Msg } from "./proto";
import * as store from "./store";
import { Connection, ConnectionClosed, ServerError } from "./transport";
import { createPasskey, usePasskey } from "./webauthn";

export type ConnState = "signed-out" | "connecting" | "syncing" | "online" | "offline" | "error";

export interface Session {
  token: string;
  userId: string;
  username: string;
  displayName: string;
  deviceId?: string;
  keyPackagesUploaded?: boolean;
}
export interface Member {
  user_id: string;
  username: string;
  display_name: string;
  role: string;
}
export interface ConvRecord {
  id: string;
  title: string;
  members: Member[];
  lastSeq: number | null; // highest applied seq (null: no event seen yet)
  readSeq: number; // our read marker
  unread: number;
  lastText: string;
  lastTs: number;
  joinedEpoch: number | null;
  mlsEpoch: number; // the server's, from CONVERSATION_LIST
  deliveredSeq: number;
  readByOthersSeq: number;
  left: boolean;
}
export interface StoredMessage {
  conv: string;
  seq: number;
  id: string;
  sender: string;
  text: string;
  ts: number; // ms
  kind: "text" | "system" | "unavailable";
  subject?: string; // system messages: the user who joined or left (named when shown)
}
export interface OutboxEntry {
  rid: string;
  conv: string;
  text: string;
  payload: Uint8Array | null; // null: not encrypted yet (no group state)
  createdAt: number;
  failed?: string;
}

const KEY_PACKAGES = 10;
const WELCOME_GRACE_MS = 4000;
const FATAL_CLOSES = new Set([4002, 4003, 4004, 4005]);
const seqKey = (conv: string, seq: number) => `msg:${conv}:${String(seq).padStart(12, "0")}`;

type Own = { own: "commit"; newState: mls.State } | { own: "message"; rid: string };
type Pending = Own | Envelope;

export class App {
  state: ConnState = "signed-out";
  stateDetail = "";
  session: Session | null = null;
  conn: Connection | null = null;
  convs = new Map<string, ConvRecord>();
  outbox = new Map<string, OutboxEntry>();
  presence = new Map<string, string>();
  typing = new Map<string, Map<string, number>>(); // conv -> user -> expiry ms
  openConv: string | null = null;
  notice = "";
  private groups = new Map<string, mls.State>();
  private buffers = new Map<string, Map<number, Pending>>();
  private locks = new Map<string, Promise<unknown>>();
  private pendingCommits = new Map<string, { commitData: Uint8Array; newState: mls.State }>();
  private ackIds = new Map<string, string>(); // conv -> newest applied event id
  private welcomeAcks: string[] = [];
  private ackTimer = 0;
  private listeners = new Set<() => void>();
  private attempt = 0;
  private stopped = false;
  private pingTimer = 0;
  private rejoinTimers = new Map<string, number>();
  private gapTimers = new Map<string, number>();
  private identity: Awaited<ReturnType<typeof mls.identity>> | null = null;

  constructor(private url: string) {}

  // -- observers ---------------------------------------------------------------------
  subscribe(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
  changed(): void {
    for (const fn of this.listeners) fn();
  }
  private setState(s: ConnState, detail = ""): void {
    this.state = s;
    this.stateDetail = detail;
    this.changed();
  }

  // -- start, sign in, sign out ----------------------------------------------------------
  async start(): Promise<void> {
    const session = await store.get<Session>("session");
    if (!session) {
      this.setState("signed-out");
      return;
    }
    this.session = session;
    await this.loadLocal();
    void this.connectLoop();
  }

  private async loadLocal(): Promise<void> {
    for (const rec of await store.range<ConvRecord>("conv:")) this.convs.set(rec.id, rec);
    for (const key of await store.keys("group:")) {
      const bytes = await store.get<Uint8Array>(key);
      if (bytes) {
        try {
          this.groups.set(key.slice(6), mls.decodeState(bytes));
        } catch {
          /* unreadable state: the conversation rejoins (external commit) */
        }
      }
    }
    for (const o of await store.range<OutboxEntry>("out:")) this.outbox.set(o.rid, o);
  }

  async register(username: string, displayName: string, inviteCode: string): Promise<void> {
    const conn = await this.openRaw();
    try {
      const ch = await conn.request("AUTH_REGISTER_REQUEST", {
        username,
        display_name: displayName,
        invite_code: inviteCode,
      });
      const answer = await createPasskey(ch.message.credential_creation_options);
      const ok = await conn.request("AUTH_REGISTER_RESPONSE", answer);
      await this.signedIn(conn, {
        token: ok.message.session_token,
        userId: ok.message.user_id,
        username,
        displayName: displayName || username,
      });
    } catch (e) {
      conn.close();
      throw e;
    }
  }

  async login(username: string): Promise<void> {
    const conn = await this.openRaw();
    try {
      const ch = await conn.request("AUTH_REQUEST", { username });
      const answer = await usePasskey(ch.message.credential_request_options);
      const ok = await conn.request("AUTH_RESPONSE", answer);
      await this.signedIn(conn, {
        token: ok.message.session_token,
        userId: ok.message.user_id,
        username: ok.message.username,
        displayName: ok.message.display_name,
      });
    } catch (e) {
      conn.close();
      throw e;
    }
  }

  private async openRaw(): Promise<Connection> {
    const conn = await Connection.open(this.url);
    const early: Envelope[] = [];
    conn.onPush = (env) => early.push(env); // until READY is wired up
    (conn as unknown as { early: Envelope[] }).early = early;
    return conn;
  }

  private async signedIn(conn: Connection, session: Session): Promise<void> {
    await store.clearAll(); // a new device: nothing of a previous one is reused
    this.convs.clear();
    this.groups.clear();
    this.outbox.clear();
    this.session = session;
    await store.write({ session });
    this.stopped = false;
    this.attach(conn);
  }

  /** Sign this device out: revoke its session on the server, forget everything local. */
  async signOut(): Promise<void> {
    const me = this.session?.deviceId;
    if (me && this.conn?.open) {
      try {
        await this.conn.request("DEVICE_REVOKE", { device_id: me });
      } catch {
        /* closing anyway */
      }
    }
    await this.forget("You signed out.");
  }

  private async forget(notice: string): Promise<void> {
    // The notice first: once the session is dropped below, any render (another event's,
    // during the await) builds the sign-in page, and later renders only update it.
    this.notice = notice;
    this.stopped = true;
    clearInterval(this.pingTimer);
    this.conn?.close();
    this.conn = null;
    this.session = null;
    this.convs.clear();
    this.groups.clear();
    this.outbox.clear();
    this.buffers.clear();
    await store.clearAll();
    this.setState("signed-out");
  }

  // -- the connection ------------------------------------------------------------------
  private looping = false;
  private wake: (() => void) | null = null;

  private async connectLoop(): Promise<void> {
    if (this.looping) return;
    this.looping = true;
    try {
      await this.connectLoopInner();
    } finally {
      this.looping = false;
    }
  }

  private async connectLoopInner(): Promise<void> {
    while (!this.stopped && this.session && !this.conn) {
      this.setState("connecting");
      try {
        const conn = await this.openRaw();
        try {
          const ok = await conn.request("AUTH_REQUEST", { session_token: this.session.token });
          this.session.displayName = ok.message.display_name;
          this.session.username = ok.message.username;
          this.attach(conn);
          return;
        } catch (e) {
          conn.close();
          if (e instanceof ServerError && [1001, 1002, 1005, 2004].includes(e.code)) {
            await this.forget(e.code === 2004 ? "This account was disabled." : "This device was signed out.");
            return;
          }
          throw e;
        }
      } catch {
        this.attempt += 1;
        const delay = Math.min(30_000, 1000 * 2 ** Math.min(this.attempt - 1, 5)) * (0.5 + Math.random() / 2);
        this.setState(navigator.onLine ? "connecting" : "offline", `retrying in ${Math.round(delay / 1000)} s`);
        await new Promise<void>((resolve) => {
          this.wake = resolve; // the browser came back online: do not wait out the delay
          setTimeout(resolve, delay);
        });
        this.wake = null;
      }
    }
  }

  private attach(conn: Connection): void {
    this.conn = conn;
    this.attempt = 0;
    this.setState("syncing");
    const early = (conn as unknown as { early: Envelope[] }).early ?? [];
    conn.onPush = (env) => this.onPush(env);
    conn.onClose = (code) => this.onClose(conn, code);
    for (const env of early) this.onPush(env);
    clearInterval(this.pingTimer);
    this.pingTimer = window.setInterval(() => {
      this.conn?.request("PING", { timestamp: Date.now() }, { timeoutMs: 10_000 }).catch(() => this.conn?.close(4000));
    }, 25_000);
  }

  private onClose(conn: Connection, code: number): void {
    if (this.conn !== conn) return;
    this.conn = null;
    clearInterval(this.pingTimer);
    if (this.stopped) return;
    if (code === 4004) {
      void this.forget("This device was signed out.");
      return;
    }
    if (FATAL_CLOSES.has(code)) {
      this.stopped = true;
      this.setState("error", code === 4005 ? "This account was disabled." : `Disconnected (${code}).`);
      return;
    }
    void this.connectLoop();
  }

  /** Reconnect now (the browser's online event). */
  reconnect(): void {
    if (!this.session || this.conn || this.state === "error") return;
    this.stopped = false;
    this.attempt = 0;
    if (this.looping) this.wake?.();
    else void this.connectLoop();
  }

  /** The browser says the network is gone: the socket is dead even if no close came. */
  wentOffline(): void {
    if (!this.session || this.state === "signed-out" || this.state === "error") return;
    const conn = this.conn;
    if (conn) {
      this.conn = null; // do not wait for a close handshake that cannot complete
      clearInterval(this.pingTimer);
      conn.onClose = () => {};
      conn.close(4000);
    }
    this.setState("offline");
    void this.connectLoop();
  }

  request(type: string, message: Msg, opts: { requestId?: string; timeoutMs?: number } = {}): Promise<Envelope> {
    if (!this.conn) return Promise.reject(new ConnectionClosed(1006));
    return this.conn.request(type, message, opts);
  }

  // -- pushes --------------------------------------------------------------------------
  private onPush(env: Envelope): void {
    const m = env.message;
    switch (env.type) {
      case "MESSAGE_RECEIVE":
      case "MLS_COMMIT_BROADCAST":
      case "GROUP_MEMBER_ADDED":
      case "GROUP_MEMBER_REMOVED":
        this.enqueue(m.conversation_id, m.seq, env);
        return;
      case "MLS_WELCOME_RECEIVE":
        void this.onWelcome(m);
        return;
      case "SYNC_COMPLETE":
        void this.afterSync();
        return;
      case "MLS_KEY_PACKAGE_LOW":
        void this.uploadKeyPackages(Math.max(KEY_PACKAGES - m.remaining, 1));
        return;
      case "PRESENCE_NOTIFY":
        this.presence.set(m.user_id, m.status);
        this.changed();
        return;
      case "TYPING_NOTIFY": {
        const t = this.typing.get(m.conversation_id) ?? new Map<string, number>();
        if (m.typing) t.set(m.user_id, Date.now() + 6000);
        else t.delete(m.user_id);
        this.typing.set(m.conversation_id, t);
        this.changed();
        setTimeout(() => this.changed(), 6100);
        return;
      }
      case "MESSAGE_DELIVERED":
      case "MESSAGE_READ_RECEIPT": {
        const rec = this.convs.get(m.conversation_id);
        if (!rec) return;
        if (env.type === "MESSAGE_DELIVERED") rec.deliveredSeq = Math.max(rec.deliveredSeq, m.up_to_seq);
        else if (m.user_id !== this.session?.userId) {
          rec.readByOthersSeq = Math.max(rec.readByOthersSeq, m.up_to_seq);
          rec.deliveredSeq = Math.max(rec.deliveredSeq, m.up_to_seq);
        }
        void store.write({ [`conv:${rec.id}`]: rec });
        this.changed();
        return;
      }
      case "DEVICE_ADDED":
        void this.onDeviceAdded(m.user_id, m.device_id);
        return;
      default:
        return;
    }
  }

  private async afterSync(): Promise<void> {
    this.setState("online");
    try {
      await this.refreshConversations();
      const devices = await this.request("DEVICE_LIST_REQUEST", {});
      const me = (devices.message.devices as Msg[]).find((d) => d.current);
      if (this.session && me) {
        this.session.deviceId = me.device_id;
        await store.write({ session: this.session });
      }
      this.identity = await mls.identity(this.session!.userId);
      if (!this.session!.keyPackagesUploaded) {
        await this.uploadKeyPackages(KEY_PACKAGES);
        await this.uploadKeyPackages(1, true);
        this.session!.keyPackagesUploaded = true;
        await store.write({ session: this.session });
      }
      for (const rec of this.convs.values()) this.scheduleRejoin(rec.id);
      await this.flushOutbox();
      void this.request("PRESENCE_UPDATE", { status: document.hidden ? "away" : "online" }).catch(() => {});
    } catch (e) {
      console.warn("after sync", e);
    }
  }

  async uploadKeyPackages(count: number, lastResort = false): Promise<void> {
    const id = this.identity ?? (await mls.identity(this.session!.userId));
    const blobs = await mls.newKeyPackages(id, count, lastResort);
    await this.request("MLS_KEY_PACKAGE_UPLOAD", { key_packages: blobs, last_resort: lastResort });
  }

  async refreshConversations(): Promise<void> {
    const res = await this.request("CONVERSATION_LIST_REQUEST", {});
    const writes: Record<string, unknown> = {};
    for (const c of res.message.conversations as Msg[]) {
      const rec = this.record(c.conversation_id);
      rec.title = c.title;
      rec.members = c.members as Member[];
      rec.mlsEpoch = c.mls_epoch;
      writes[`conv:${rec.id}`] = rec;
    }
    if (Object.keys(writes).length) await store.write(writes);
    this.changed();
  }

  private record(id: string): ConvRecord {
    let rec = this.convs.get(id);
    if (!rec) {
      rec = {
        id,
        title: "",
        members: [],
        lastSeq: null,
        readSeq: 0,
        unread: 0,
        lastText: "",
        lastTs: 0,
        joinedEpoch: null,
        mlsEpoch: 0,
        deliveredSeq: 0,
        readByOthersSeq: 0,
        left: false,
      };
      this.convs.set(id, rec);
    }
    return rec;
  }

  // -- the per-conversation pipeline -----------------------------------------------------
  private locked<R>(conv: string, fn: () => Promise<R>): Promise<R> {
    const prev = this.locks.get(conv) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    this.locks.set(
      conv,
      next.catch(() => undefined),
    );
    return next;
  }

  private enqueue(conv: string, seq: number, item: Pending): void {
    const rec = this.record(conv);
    if (rec.lastSeq === null) rec.lastSeq = seq - 1; // where this device's cursor started
    if (seq <= rec.lastSeq) {
      const id = "own" in item ? "" : item.message.event_id || item.message.message_id;
      if (id) this.queueAck(conv, id); // a duplicate (at-least-once): ack it again
      return;
    }
    const buf = this.buffers.get(conv) ?? new Map<number, Pending>();
    buf.set(seq, item);
    this.buffers.set(conv, buf);
    void this.pump(conv);
  }

  private pump(conv: string): Promise<void> {
    return this.locked(conv, async () => {
      const rec = this.record(conv);
      const buf = this.buffers.get(conv);
      if (!buf) return;
      while (rec.lastSeq !== null && buf.has(rec.lastSeq + 1)) {
        const seq = rec.lastSeq + 1;
        const item = buf.get(seq)!;
        if (this.needsState(conv, item)) break; // wait for a Welcome or a rejoin
        buf.delete(seq);
        await this.applyOne(rec, seq, item);
      }
      this.changed();
      if (buf.size && rec.lastSeq !== null && !buf.has(rec.lastSeq + 1)) this.scheduleGapFill(conv);
    });
  }

  private needsState(conv: string, item: Pending): boolean {
    if (this.groups.has(conv)) return false;
    if ("own" in item) return false;
    if (item.type === "MESSAGE_RECEIVE") return !this.ownMessage(item.message.encrypted_payload);
    if (item.type === "MLS_COMMIT_BROADCAST") {
      const p = this.pendingCommits.get(conv);
      return !(p && equalBytes(p.commitData, item.message.commit_data));
    }
    return false;
  }

  private ownMessage(payload: Uint8Array): OutboxEntry | undefined {
    for (const o of this.outbox.values()) if (o.payload && equalBytes(o.payload, payload)) return o;
    return undefined;
  }

  private async applyOne(rec: ConvRecord, seq: number, item: Pending): Promise<void> {
    const conv = rec.id;
    const writes: Record<string, unknown> = {};
    let message: StoredMessage | null = null;
    let eventId = "";
    const groupBefore = this.groups.get(conv);
    let group = groupBefore;
    if ("own" in item && item.own === "commit") {
      group = item.newState;
      this.pendingCommits.delete(conv);
    } else if ("own" in item) {
      message = this.fromOutbox(rec, seq, item.rid, writes);
    } else {
      const env = item as Envelope;
      const m = env.message;
      eventId = m.event_id || m.message_id || "";
      if (env.type === "GROUP_MEMBER_ADDED" || env.type === "GROUP_MEMBER_REMOVED") {
        const added = env.type === "GROUP_MEMBER_ADDED";
        if (!added && m.user_id === this.session?.userId) rec.left = true;
        if (added && m.user_id === this.session?.userId) this.scheduleRejoin(conv); // if no Welcome comes
        message = {
          conv,
          seq,
          id: eventId,
          sender: m.added_by || m.removed_by,
          subject: m.user_id,
          text: added ? "joined" : "left",
          ts: m.server_timestamp / 1000,
          kind: "system",
        };
        void this.refreshSoon();
      } else if (env.type === "MLS_COMMIT_BROADCAST") {
        const pending = this.pendingCommits.get(conv);
        if (pending && equalBytes(pending.commitData, m.commit_data)) {
          group = pending.newState;
          this.pendingCommits.delete(conv);
        } else if (group && m.epoch === mls.epochOf(group)) {
          try {
            group = (await mls.processIncoming(group, m.commit_data)).newState;
          } catch (e) {
            console.warn("commit could not be applied; rejoining", e);
            group = undefined; // forked: rejoin from the GroupInfo
          }
        } else if (group && m.epoch > mls.epochOf(group)) {
          group = undefined; // we missed a commit: rejoin
        }
        // m.epoch below ours: before this device joined, nothing to do
      } else if (env.type === "MESSAGE_RECEIVE") {
        const own = this.ownMessage(m.encrypted_payload);
        if (own) message = this.fromOutbox(rec, seq, own.rid, writes, m);
        else {
          const epoch = mls.messageEpoch(m.encrypted_payload);
          let text = "";
          let kind: StoredMessage["kind"] = "unavailable";
          if (group && epoch !== null && rec.joinedEpoch !== null && epoch >= rec.joinedEpoch) {
            try {
              const r = await mls.processIncoming(group, m.encrypted_payload);
              group = r.newState;
              if (r.kind === "message") {
                text = fromUtf8.decode(r.data);
                kind = "text";
              }
            } catch (e) {
              console.warn("message could not be decrypted", e);
            }
          }
          message = { conv, seq, id: eventId, sender: m.sender_id, text, ts: m.server_timestamp / 1000, kind };
          if (kind === "text" && this.openConv !== conv && seq > rec.readSeq) rec.unread += 1;
        }
      }
    }
    rec.lastSeq = seq;
    if (message && message.kind !== "unavailable") {
      rec.lastText =
        message.kind === "system"
          ? `${this.nameOf(rec, message.subject ?? "")} ${message.text}`
          : `${message.sender === this.session?.userId ? "You: " : ""}${message.text}`;
      rec.lastTs = message.ts;
    }
    if (message) writes[seqKey(conv, seq)] = message;
    if (group !== groupBefore) {
      if (group) {
        this.groups.set(conv, group);
        writes[`group:${conv}`] = mls.encodeState(group);
      } else {
        this.groups.delete(conv);
        writes[`group:${conv}`] = undefined;
        rec.joinedEpoch = null;
        this.scheduleRejoin(conv, 0);
      }
    }
    writes[`conv:${conv}`] = rec;
    await store.write(writes); // state + record + message: all or nothing
    if (eventId) this.queueAck(conv, eventId);
  }

  private fromOutbox(rec: ConvRecord, seq: number, rid: string, writes: Record<string, unknown>, m?: Msg): StoredMessage {
    const o = this.outbox.get(rid);
    this.outbox.delete(rid);
    writes[`out:${rid}`] = undefined;
    return {
      conv: rec.id,
      seq,
      id: m?.message_id ?? "",
      sender: this.session!.userId,
      text: o?.text ?? "",
      ts: m ? m.server_timestamp / 1000 : Date.now(),
      kind: "text",
    };
  }

  nameOf(rec: ConvRecord, userId: string): string {
    if (userId === this.session?.userId) return "You";
    const m = rec.members.find((x) => x.user_id === userId);
    return m ? m.display_name || m.username : "Someone";
  }

  private refreshTimer = 0;
  private refreshSoon(): void {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = window.setTimeout(() => void this.refreshConversations().catch(() => {}), 150);
  }

  private queueAck(conv: string, id: string): void {
    this.ackIds.set(conv, id);
    this.scheduleAck();
  }
  private scheduleAck(): void {
    if (this.ackTimer) return;
    this.ackTimer = window.setTimeout(() => {
      this.ackTimer = 0;
      const ids = [...this.ackIds.values(), ...this.welcomeAcks];
      if (!ids.length || !this.conn) return;
      this.ackIds.clear();
      this.welcomeAcks = [];
      this.conn.send("MESSAGE_ACK", { message_ids: ids });
    }, 200);
  }

  private scheduleGapFill(conv: string): void {
    if (this.gapTimers.has(conv)) return;
    this.gapTimers.set(
      conv,
      window.setTimeout(async () => {
        this.gapTimers.delete(conv);
        const rec = this.convs.get(conv);
        const buf = this.buffers.get(conv);
        if (!rec || !buf || rec.lastSeq === null || buf.has(rec.lastSeq + 1) || !this.conn) return;
        try {
          const res = await this.request("MESSAGE_HISTORY_REQUEST", { conversation_id: conv, cursor_seq: rec.lastSeq, limit: 200, direction: 1 });
          for (const e of res.message.events as Msg[]) {
            const env = decodeEnvelope(encode("Envelope", e));
            this.enqueue(conv, env.message.seq, env);
          }
        } catch (e) {
          console.warn("gap fill", e);
        }
      }, 1000),
    );
  }

  // -- Welcomes, joins and rejoins ---------------------------------------------------------
  private async onWelcome(m: Msg): Promise<void> {
    const conv = m.conversation_id as string;
    await this.locked(conv, async () => {
      this.welcomeAcks.push(m.event_id);
      this.scheduleAck();
      if (this.groups.has(conv)) return; // a Welcome for another device of ours
      let state: mls.State | null = null;
      try {
        state = await mls.joinFromWelcome(m.welcome_data);
      } catch (e) {
        console.warn("welcome", e);
      }
      if (!state) return;
      const rec = this.record(conv);
      rec.joinedEpoch = mls.epochOf(state);
      this.groups.set(conv, state);
      await store.write({ [`group:${conv}`]: mls.encodeState(state), [`conv:${conv}`]: rec });
    });
    await this.pump(conv);
    await this.flushOutbox();
  }

  private scheduleRejoin(conv: string, delay = WELCOME_GRACE_MS): void {
    if (this.groups.has(conv) || this.rejoinTimers.has(conv)) return;
    this.rejoinTimers.set(
      conv,
      window.setTimeout(() => {
        this.rejoinTimers.delete(conv);
        void this.rejoin(conv);
      }, delay),
    );
  }

  /** External commit from the stored GroupInfo (RFC 9420 §12.4.3.2). */
  async rejoin(conv: string): Promise<void> {
    const rec = this.convs.get(conv);
    if (!rec || rec.left || this.groups.has(conv) || !this.conn) return;
    for (let attempt = 0; attempt < 5; attempt++) {
      let info: Envelope;
      try {
        info = await this.request("MLS_GROUP_INFO_FETCH", { conversation_id: conv });
      } catch (e) {
        if (e instanceof ServerError && e.code === 5006) return; // no MLS group yet
        throw e;
      }
      const done = await this.locked(conv, async () => {
        if (this.groups.has(conv)) return true;
        const id = this.identity ?? (await mls.identity(this.session!.userId));
        const joined = await mls.externalJoin(id, info.message.group_info);
        try {
          const echo = await this.request("MLS_COMMIT", {
            conversation_id: conv,
            commit_data: joined.commitData,
            group_info: joined.groupInfo,
          });
          rec.joinedEpoch = mls.epochOf(joined.newState);
          this.groups.set(conv, joined.newState);
          await store.write({ [`group:${conv}`]: mls.encodeState(joined.newState), [`conv:${conv}`]: rec });
          const buf = this.buffers.get(conv) ?? new Map<number, Pending>();
          buf.set(echo.message.seq, { own: "commit", newState: joined.newState });
          this.buffers.set(conv, buf);
          return true;
        } catch (e) {
          if (e instanceof ServerError && e.code === 5004) return false;
          throw e;
        }
      });
      if (done) {
        await this.pump(conv);
        await this.flushOutbox();
        return;
      }
      await sleep(300 + Math.random() * 700);
    }
  }

  // -- commits we make --------------------------------------------------------------------
  /**
   * Build and send a commit under the conversation's lock; on 5004 wait for the winning
   * commit to be applied and build again. `adds` is asked again on every attempt (what
   * to add may have changed: the winner may have added the same device).
   */
  private async commit(conv: string, adds: () => Promise<{ kps: import("ts-mls").KeyPackage[]; recipients: string[] }>): Promise<boolean> {
    for (let attempt = 0; attempt < 6; attempt++) {
      const outcome = await this.locked(conv, async () => {
        const group = this.groups.get(conv);
        if (!group) return "no-group" as const;
        const { kps, recipients } = await adds();
        if (!kps.length) return "nothing" as const;
        const c = await mls.commitAdds(group, kps);
        this.pendingCommits.set(conv, { commitData: c.commitData, newState: c.newState });
        try {
          const echo = await this.request("MLS_COMMIT", {
            conversation_id: conv,
            commit_data: c.commitData,
            group_info: c.groupInfo,
            welcomes: c.welcome ? recipients.map((r) => ({ conversation_id: conv, recipient_id: r, welcome_data: c.welcome })) : [],
          });
          const buf = this.buffers.get(conv) ?? new Map<number, Pending>();
          buf.set(echo.message.seq, { own: "commit", newState: c.newState });
          this.buffers.set(conv, buf);
          return "ok" as const;
        } catch (e) {
          this.pendingCommits.delete(conv);
          if (e instanceof ServerError && e.code === 5004) return "retry" as const;
          throw e;
        }
      });
      if (outcome === "ok") {
        await this.pump(conv);
        return true;
      }
      if (outcome !== "retry") return false;
      await sleep(200 + Math.random() * 500); // the winner's commit is applied meanwhile
    }
    return false;
  }

  /** KeyPackages of every device of `userIds` except this one. */
  private async fetchPackages(conv: string, userIds: string[], onlyDevice?: string) {
    const kps: import("ts-mls").KeyPackage[] = [];
    const recipients: string[] = [];
    const group = this.groups.get(conv);
    for (const uid of userIds) {
      let res: Envelope;
      try {
        res = await this.request("MLS_KEY_PACKAGE_FETCH", { user_id: uid });
      } catch (e) {
        if (e instanceof ServerError && e.code === 5005) continue; // no device ready yet
        throw e;
      }
      for (const d of res.message.key_packages as Msg[]) {
        if (d.device_id === this.session?.deviceId) continue;
        if (onlyDevice && d.device_id !== onlyDevice) continue;
        const kp = mls.decodeAnyKeyPackage(d.key_package_data);
        if (group && mls.hasLeafWithKey(group, kp.leafNode.signaturePublicKey)) continue; // already in
        if (kps.some((k) => equalBytes(k.leafNode.signaturePublicKey, kp.leafNode.signaturePublicKey))) continue;
        kps.push(kp);
        if (!recipients.includes(uid)) recipients.push(uid);
      }
    }
    return { kps, recipients };
  }

  private async onDeviceAdded(userId: string, deviceId: string): Promise<void> {
    if (deviceId === this.session?.deviceId) return;
    // Every member hears of the device: a random pause spreads the adds, and whoever
    // comes second finds the device in the tree (or loses the epoch and looks again).
    await sleep(100 + Math.random() * 900);
    for (const rec of this.convs.values()) {
      if (rec.left || !this.groups.has(rec.id) || !rec.members.some((m) => m.user_id === userId)) continue;
      try {
        await this.commit(rec.id, () => this.fetchPackages(rec.id, [userId], deviceId));
      } catch (e) {
        console.warn("adding a new device", e);
      }
    }
  }

  // -- user actions ------------------------------------------------------------------------
  async lookup(username: string): Promise<Member> {
    const res = await this.request("USER_LOOKUP", { username });
    return { user_id: res.message.user_id, username: res.message.username, display_name: res.message.display_name, role: "member" };
  }

  /** A new conversation with these users, encrypted from its first message. */
  async startConversation(usernames: string[], title: string): Promise<string> {
    const users: Member[] = [];
    for (const name of usernames) users.push(await this.lookup(name));
    const created = await this.request("GROUP_CREATE", { title, member_ids: users.map((u) => u.user_id) });
    const conv = created.message.conversation_id as string;
    const rec = this.record(conv);
    rec.title = created.message.title;
    rec.members = created.message.members;
    const id = this.identity ?? (await mls.identity(this.session!.userId));
    await this.locked(conv, async () => {
      const group = await mls.newGroup(id);
      rec.joinedEpoch = 0;
      this.groups.set(conv, group);
      await store.write({ [`group:${conv}`]: mls.encodeState(group), [`conv:${conv}`]: rec });
    });
    const everyone = [...users.map((u) => u.user_id), this.session!.userId];
    await this.commit(conv, () => this.fetchPackages(conv, everyone));
    this.changed();
    return conv;
  }

  async addMember(conv: string, username: string): Promise<void> {
    const user = await this.lookup(username);
    await this.request("GROUP_INVITE", { conversation_id: conv, user_id: user.user_id });
    await this.commit(conv, () => this.fetchPackages(conv, [user.user_id]));
    await this.refreshConversations();
  }

  /** Optimistic send: shown at once, encrypted, sent with a request_id kept until echoed. */
  async send(conv: string, text: string): Promise<void> {
    const entry: OutboxEntry = { rid: newRequestId(), conv, text, payload: null, createdAt: Date.now() };
    this.outbox.set(entry.rid, entry);
    await store.write({ [`out:${entry.rid}`]: entry });
    this.changed();
    await this.flushOutbox();
    this.typingSent.delete(conv);
  }

  async retry(rid: string): Promise<void> {
    const o = this.outbox.get(rid);
    if (o) {
      delete o.failed;
      this.changed();
      await this.flushOutbox();
    }
  }

  private flushing = false;
  private flushAgain = false;
  private async flushOutbox(): Promise<void> {
    if (!this.conn || this.state !== "online") return;
    if (this.flushing) {
      this.flushAgain = true; // picked up when the running pass ends
      return;
    }
    this.flushing = true;
    try {
      do {
        this.flushAgain = false;
        await this.flushPass();
      } while (this.flushAgain && this.conn);
    } finally {
      this.flushing = false;
    }
  }

  private async flushPass(): Promise<void> {
    {
      const entries = [...this.outbox.values()].sort((a, b) => a.createdAt - b.createdAt);
      for (const o of entries) {
        if (o.failed || !this.conn) continue;
        if (!o.payload) {
          const ok = await this.locked(o.conv, async () => {
            const group = this.groups.get(o.conv);
            if (!group) return false;
            const enc = await mls.encrypt(group, o.text);
            this.groups.set(o.conv, enc.newState);
            o.payload = enc.payload;
            // The ratchet moved: persist it with the ciphertext before anything is sent.
            await store.write({ [`group:${o.conv}`]: mls.encodeState(enc.newState), [`out:${o.rid}`]: o });
            return true;
          });
          if (!ok) continue; // no group state yet: sent once we join
        }
        try {
          const echo = await this.request("MESSAGE_SEND", { conversation_id: o.conv, encrypted_payload: o.payload, message_type: "text" }, { requestId: o.rid });
          this.enqueue(o.conv, echo.message.seq, { own: "message", rid: o.rid });
        } catch (e) {
          if (e instanceof ServerError && e.code === 3004) {
            // Rate limited (a burst of sends): the rest go after the wait the server
            // named, same request_ids; the connection is fine, so no READY would.
            setTimeout(() => void this.flushOutbox(), Math.max(e.retryAfterMs, 50));
            return;
          }
          if (e instanceof ServerError && e.code < 9000) {
            o.failed = e.serverMessage;
            await store.write({ [`out:${o.rid}`]: o });
            this.changed();
          } else return; // connection trouble: the next READY sends it again (same request_id)
        }
      }
    }
  }

  async messages(conv: string, limit: number, beforeSeq?: number): Promise<StoredMessage[]> {
    return store.range<StoredMessage>(`msg:${conv}:`, { limit, before: beforeSeq ? seqKey(conv, beforeSeq) : undefined });
  }

  markRead(conv: string): void {
    const rec = this.convs.get(conv);
    if (!rec || rec.lastSeq === null || !this.conn) return;
    rec.unread = 0;
    if (rec.lastSeq > rec.readSeq) {
      rec.readSeq = rec.lastSeq;
      void store.write({ [`conv:${conv}`]: rec });
      this.conn.send("MESSAGE_READ", { conversation_id: conv, up_to_seq: rec.lastSeq });
    }
  }

  private typingSent = new Map<string, number>();
  typingNow(conv: string, typing: boolean): void {
    const last = this.typingSent.get(conv) ?? 0;
    if (typing && Date.now() - last < 3000) return;
    if (!typing && !last) return;
    if (typing) this.typingSent.set(conv, Date.now());
    else this.typingSent.delete(conv);
    this.conn?.send("TYPING", { conversation_id: conv, typing });
  }

  typers(conv: string): string[] {
    const t = this.typing.get(conv);
    const rec = this.convs.get(conv);
    if (!t || !rec) return [];
    const now = Date.now();
    return [...t.entries()].filter(([, exp]) => exp > now).map(([uid]) => this.nameOf(rec, uid));
  }

  setPresence(status: "online" | "away"): void {
    this.conn?.send("PRESENCE_UPDATE", { status });
  }

  async devices(): Promise<Msg[]> {
    const res = await this.request("DEVICE_LIST_REQUEST", {});
    return res.message.devices as Msg[];
  }

  async revokeDevice(deviceId: string): Promise<void> {
    if (deviceId === this.session?.deviceId) {
      await this.signOut();
      return;
    }
    await this.request("DEVICE_REVOKE", { device_id: deviceId });
  }

  async updateProfile(displayName: string): Promise<void> {
    await this.request("PROFILE_UPDATE", { display_name: displayName });
    if (this.session) {
      this.session.displayName = displayName;
      await store.write({ session: this.session });
    }
    this.changed();
  }

  title(rec: ConvRecord): string {
    if (rec.title) return rec.title;
    const others = rec.members.filter((m) => m.user_id !== this.session?.userId);
    return others.map((m) => m.display_name || m.username).join(", ") || "Just you";
  }

  hasKeys(conv: string): boolean {
    return this.groups.has(conv);
  }
}
