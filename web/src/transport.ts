// One WebSocket to /ws (subprotocol sovereign.v1): requests answered by request_id,
// everything else is a push. Reconnecting is the session's job (session.ts).
import { newRequestId } from "./bytes";
import { decodeEnvelope, encodeEnvelope, type Envelope, type Msg } from "./proto";

export class ServerError extends Error {
  constructor(
    public code: number,
    public serverMessage: string,
    public fatal = false,
    /** SPEC §8: how long to wait before retrying (3004 RateLimited), 0 if not given. */
    public retryAfterMs = 0,
  ) {
    super(`${code}: ${serverMessage}`);
  }
}

export class ConnectionClosed extends Error {
  constructor(public code: number) {
    super(`connection closed (${code})`);
  }
}

interface Pending {
  resolve: (env: Envelope) => void;
  reject: (e: Error) => void;
  timer: number;
}

export class Connection {
  private pending = new Map<string, Pending>();
  closeCode: number | null = null;
  onPush: (env: Envelope) => void = () => {};
  onClose: (code: number) => void = () => {};

  private constructor(private ws: WebSocket) {
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => this.received(new Uint8Array(ev.data as ArrayBuffer));
    ws.onclose = (ev) => this.closed(ev.code);
  }

  static open(url: string, timeoutMs = 10_000): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, ["sovereign.v1"]);
      const timer = setTimeout(() => {
        ws.close();
        reject(new ConnectionClosed(1006));
      }, timeoutMs);
      ws.onopen = () => {
        clearTimeout(timer);
        resolve(new Connection(ws));
      };
      ws.onerror = () => {
        clearTimeout(timer);
        reject(new ConnectionClosed(1006));
      };
    });
  }

  get open(): boolean {
    return this.ws.readyState === WebSocket.OPEN;
  }

  send(type: string, message: Msg, requestId = ""): void {
    if (this.open) this.ws.send(encodeEnvelope(type, requestId, message));
  }

  /** Send a request; resolves with its response envelope, rejects with ServerError. */
  request(type: string, message: Msg, opts: { timeoutMs?: number; requestId?: string } = {}): Promise<Envelope> {
    const rid = opts.requestId ?? newRequestId();
    return new Promise((resolve, reject) => {
      if (!this.open) {
        reject(new ConnectionClosed(this.closeCode ?? 1006));
        return;
      }
      const timer = window.setTimeout(() => {
        this.pending.delete(rid);
        reject(new Error(`${type}: no answer`));
      }, opts.timeoutMs ?? 20_000);
      this.pending.set(rid, { resolve, reject, timer });
      this.ws.send(encodeEnvelope(type, rid, message));
    });
  }

  close(code = 1000): void {
    this.ws.close(code);
    this.failPending(code); // now: the close handshake may never complete (offline)
  }

  private failPending(code: number): void {
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new ConnectionClosed(code));
    }
    this.pending.clear();
  }

  private received(data: Uint8Array): void {
    let env: Envelope;
    try {
      env = decodeEnvelope(data);
    } catch {
      return; // never crash on a frame we cannot read
    }
    const p = env.requestId ? this.pending.get(env.requestId) : undefined;
    if (p) {
      this.pending.delete(env.requestId);
      clearTimeout(p.timer);
      if (env.type === "ERROR") p.reject(new ServerError(env.message.code, env.message.message, env.message.fatal, Number(env.message.retry_after_ms ?? 0)));
      else if (env.type === "AUTH_ERROR") p.reject(new ServerError(env.message.error_code, env.message.message));
      else p.resolve(env);
      return;
    }
    this.onPush(env);
  }

  private closed(code: number): void {
    this.closeCode = code;
    this.failPending(code);
    this.onClose(code);
  }
}
