// One authenticated sovereign.v1 connection: WebSocket (subprotocol sovereign.v1),
// binary frames, one protobuf Envelope per message. Requests carry a request_id and
// resolve with whatever the server answers for it (typed response, Error or Ack);
// pushes (request_id "") go to an in-order queue.
import { randomUUID } from "node:crypto";
import WebSocket from "ws";
import { loadSchema } from "./proto.mjs";

export class ServerError extends Error {
  constructor(code, message, type = "ERROR") {
    super(`${type} ${code}: ${message}`);
    this.code = code;
    this.serverMessage = message;
  }
}

export class Connection {
  constructor(ws, schema, label) {
    this.ws = ws;
    this.schema = schema;
    this.label = label;
    this.pending = new Map(); // request_id -> {resolve, reject, timer}
    this.pushes = []; // queued push envelopes
    this.waiters = []; // resolvers waiting for the next push
    this.closed = null; // {code, reason} once closed
    this.log = [];
    ws.on("message", (data, isBinary) => this._onFrame(data, isBinary));
    ws.on("close", (code, reason) => this._onClose(code, String(reason)));
    ws.on("error", (err) => this._onClose(-1, String(err)));
  }

  /** Open /ws and resume with a session token; returns after SYNC_COMPLETE. */
  static async open(url, token, { label = "client", timeoutMs = 10_000 } = {}) {
    const schema = loadSchema();
    const ws = new WebSocket(url, "sovereign.v1", { perMessageDeflate: false });
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${label}: connect timeout`)), timeoutMs);
      ws.once("open", () => (clearTimeout(t), resolve()));
      ws.once("error", (e) => (clearTimeout(t), reject(e)));
    });
    if (ws.protocol !== "sovereign.v1") throw new Error(`${label}: subprotocol ${ws.protocol}`);
    const conn = new Connection(ws, schema, label);
    const ok = await conn.request("AUTH_REQUEST", { session_token: token }, { expect: "AUTH_SUCCESS" });
    conn.userId = ok.user_id;
    conn.username = ok.username;
    // The backlog (if any) then SYNC_COMPLETE: keep the backlog as ordinary pushes.
    const backlog = [];
    for (;;) {
      const ev = await conn.nextPush(timeoutMs);
      if (ev.type === "SYNC_COMPLETE") break;
      backlog.push(ev);
    }
    conn.pushes.unshift(...backlog);
    return conn;
  }

  _onFrame(data, isBinary) {
    if (!isBinary) return this._fail(new Error(`${this.label}: text frame from server`));
    let env;
    try {
      env = this.schema.decodeEnvelope(data);
    } catch (e) {
      return this._fail(new Error(`${this.label}: undecodable envelope: ${e.message}`));
    }
    this.log.push(env.type);
    if (env.request_id) {
      const p = this.pending.get(env.request_id);
      if (!p) return this._fail(new Error(`${this.label}: response for unknown request ${env.request_id}`));
      this.pending.delete(env.request_id);
      clearTimeout(p.timer);
      p.resolve(env);
      return;
    }
    if (this.waiters.length) this.waiters.shift().resolve(env);
    else this.pushes.push(env);
  }

  _onClose(code, reason) {
    if (this.closed) return;
    this.closed = { code, reason };
    const err = new Error(`${this.label}: connection closed (${code} ${reason})`);
    for (const p of this.pending.values()) (clearTimeout(p.timer), p.reject(err));
    this.pending.clear();
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  _fail(err) {
    this.failure ??= err;
    for (const w of this.waiters.splice(0)) w.reject(err);
  }

  send(type, fields, requestId = "") {
    if (this.closed) throw new Error(`${this.label}: send on closed connection`);
    this.ws.send(this.schema.encodeEnvelope(type, requestId, fields), { binary: true });
  }

  /**
   * Send a request and resolve with the raw response envelope {type, request_id, message}.
   * With `expect`, resolve with the payload if the type matches, else reject (a server
   * Error rejects with ServerError carrying `.code`).
   */
  async request(type, fields, { expect, timeoutMs = 10_000 } = {}) {
    const rid = randomUUID();
    const env = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new Error(`${this.label}: ${type} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(rid, { resolve, reject, timer });
      this.send(type, fields, rid);
    });
    if (!expect) return env;
    if (env.type === expect) return env.message;
    if (env.type === "ERROR") throw new ServerError(env.message.code, env.message.message);
    if (env.type === "AUTH_ERROR") throw new ServerError(env.message.error_code, env.message.message, "AUTH_ERROR");
    throw new Error(`${this.label}: ${type} answered ${env.type}, expected ${expect}`);
  }

  /** The next push (request_id ""), waiting up to timeoutMs. */
  nextPush(timeoutMs = 10_000) {
    if (this.failure) return Promise.reject(this.failure);
    if (this.pushes.length) return Promise.resolve(this.pushes.shift());
    if (this.closed) return Promise.reject(new Error(`${this.label}: connection closed (${this.closed.code})`));
    return new Promise((resolve, reject) => {
      const w = { resolve: (v) => (clearTimeout(t), resolve(v)), reject: (e) => (clearTimeout(t), reject(e)) };
      const t = setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new PushTimeout(`${this.label}: no push within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  async close() {
    if (this.closed) return;
    await new Promise((resolve) => {
      this.ws.once("close", resolve);
      this.ws.close(1000);
      setTimeout(resolve, 2000);
    });
  }
}

export class PushTimeout extends Error {}
