// The interface: plain DOM, text only through textContent (never innerHTML), routes in
// the URL hash (#/, #/c/<id>, #/devices). One column on a phone, two on a wide screen.
import type { App, ConvRecord, StoredMessage } from "./app";
import { ServerError } from "./transport";

type Child = Node | string | null | undefined | false;
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | ((e: Event) => void)> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (typeof v === "function") el.addEventListener(k.slice(2), v as EventListener);
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false) el.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

const STATE_TEXT: Record<string, string> = {
  "signed-out": "Signed out",
  connecting: "Connecting…",
  syncing: "Catching up…",
  online: "Online",
  offline: "Offline",
  error: "Disconnected",
};

function errorText(e: unknown): string {
  if (e instanceof ServerError) {
    if (e.code === 4006) return "No user with that name.";
    if (e.code === 1003) return e.serverMessage.charAt(0).toUpperCase() + e.serverMessage.slice(1) + ".";
    if (e.code === 1001) return "Unknown user or passkey.";
    return `${e.serverMessage} (${e.code})`;
  }
  if (e instanceof DOMException && e.name === "NotAllowedError") return "The passkey request was cancelled or timed out.";
  return e instanceof Error ? e.message : String(e);
}

function time(ms: number): string {
  return ms ? new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

export class UI {
  private root: HTMLElement;
  private route = "";
  private pageSize = new Map<string, number>();
  private renderQueued = false;

  constructor(private app: App, root: HTMLElement) {
    this.root = root;
    app.subscribe(() => this.queueRender());
    window.addEventListener("hashchange", () => this.build());
    this.build();
  }

  private queueRender(): void {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      if (this.currentRoute() !== this.route || (this.app.state === "signed-out") !== (this.route === "auth")) this.build();
      else void this.update();
    });
  }

  private currentRoute(): string {
    if (this.app.state === "signed-out" || !this.app.session) return "auth";
    const hash = location.hash.replace(/^#/, "");
    if (hash.startsWith("/c/")) return hash;
    if (hash === "/devices") return hash;
    return "/";
  }

  // -- skeletons ---------------------------------------------------------------------
  private build(): void {
    this.route = this.currentRoute();
    this.root.replaceChildren();
    if (this.route === "auth") {
      this.root.append(this.authScreen());
      return;
    }
    const main = h("main", { id: "main", class: "layout" });
    this.root.append(this.header(), main);
    const convId = this.route.startsWith("/c/") ? this.route.slice(3) : null;
    this.app.openConv = convId;
    if (this.route === "/devices") {
      main.classList.add("single");
      main.append(this.devicesScreen());
    } else {
      main.classList.toggle("in-conversation", convId !== null);
      main.append(this.listPane(), convId ? this.conversationPane(convId) : this.emptyPane());
    }
    void this.update();
  }

  private header(): HTMLElement {
    const s = this.app.session!;
    return h(
      "header",
      { class: "top" },
      h("a", { href: "#/", class: "brand" }, "Sovereign"),
      h("span", { id: "conn", class: `pill ${this.app.state}`, role: "status", "aria-live": "polite" }),
      h(
        "nav",
        { "aria-label": "Main" },
        h("a", { href: "#/", "aria-current": this.route !== "/devices" ? "page" : false }, "Chats"),
        h("a", { href: "#/devices", "aria-current": this.route === "/devices" ? "page" : false }, "Devices"),
      ),
      h("span", { class: "me", title: `Signed in as ${s.username}` }, s.displayName || s.username),
    );
  }

  private authScreen(): HTMLElement {
    const invite = new URLSearchParams(location.hash.replace(/^#/, "")).get("invite") ?? "";
    const status = h("p", { id: "auth-error", class: "error", role: "alert" });
    const busy = (b: boolean) => this.root.querySelectorAll("button").forEach((x) => ((x as HTMLButtonElement).disabled = b));
    const reg = h(
      "form",
      {
        class: "card",
        "aria-labelledby": "reg-title",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          const f = new FormData(e.target as HTMLFormElement);
          status.textContent = "";
          busy(true);
          try {
            await this.app.register(String(f.get("username")).trim(), String(f.get("display_name")).trim(), String(f.get("invite")).trim());
            history.replaceState(null, "", "#/");
          } catch (err) {
            status.textContent = errorText(err);
          } finally {
            busy(false);
          }
        },
      },
      h("h2", { id: "reg-title" }, invite ? "Set up your account" : "Create an account"),
      invite ? h("p", { class: "sub" }, "Your invite code is filled in. Choose a username; your passkey signs you in.") : null,
      h("label", { for: "reg-username" }, "Username"),
      h("input", { id: "reg-username", name: "username", required: true, autocomplete: "username", pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,31}", maxlength: "32" }),
      h("label", { for: "reg-display" }, "Display name"),
      h("input", { id: "reg-display", name: "display_name", maxlength: "64", autocomplete: "name" }),
      h("label", { for: "reg-invite" }, "Invite code (if the server asks for one)"),
      h("input", { id: "reg-invite", name: "invite", value: invite, autocomplete: "off" }),
      h("button", { type: "submit", class: "primary" }, "Create account with a passkey"),
    );
    const login = h(
      "form",
      {
        class: "card",
        "aria-labelledby": "login-title",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          const f = new FormData(e.target as HTMLFormElement);
          status.textContent = "";
          busy(true);
          try {
            await this.app.login(String(f.get("username")).trim());
          } catch (err) {
            status.textContent = errorText(err);
          } finally {
            busy(false);
          }
        },
      },
      h("h2", { id: "login-title" }, "Sign in"),
      h("label", { for: "login-username" }, "Username"),
      h("input", { id: "login-username", name: "username", required: true, autocomplete: "username webauthn" }),
      h("button", { type: "submit" }, "Sign in with a passkey"),
    );
    return h(
      "main",
      { class: "auth" },
      h("h1", {}, "Sovereign"),
      h("p", { class: "lead" }, "End-to-end encrypted messaging on your own server."),
      this.app.notice ? h("p", { id: "notice", class: "notice", role: "status" }, this.app.notice) : null,
      status,
      h("div", { class: "cards" }, reg, login),
    );
  }

  private listPane(): HTMLElement {
    const error = h("p", { class: "error", role: "alert", id: "new-error" });
    const form = h(
      "form",
      {
        class: "new-conv",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          const f = e.target as HTMLFormElement;
          const data = new FormData(f);
          const names = String(data.get("usernames")).split(",").map((x) => x.trim()).filter(Boolean);
          error.textContent = "";
          if (!names.length) return;
          try {
            const id = await this.app.startConversation(names, String(data.get("title")).trim());
            f.reset();
            location.hash = `#/c/${id}`;
          } catch (err) {
            error.textContent = errorText(err);
          }
        },
      },
      h("label", { for: "new-usernames" }, "Start a conversation with (usernames, comma-separated)"),
      h("div", { class: "row" }, h("input", { id: "new-usernames", name: "usernames", required: true, autocomplete: "off" }), h("button", { type: "submit" }, "Start")),
      h("label", { for: "new-title" }, "Title (optional)"),
      h("input", { id: "new-title", name: "title", maxlength: "100" }),
      error,
    );
    return h("section", { class: "list-pane", "aria-label": "Conversations" }, form, h("ul", { id: "conv-list", class: "conv-list" }));
  }

  private emptyPane(): HTMLElement {
    return h("section", { class: "conv-pane empty" }, h("p", {}, "Choose a conversation, or start one with a username."));
  }

  private conversationPane(conv: string): HTMLElement {
    const input = h("textarea", { id: "composer", name: "text", rows: "1", placeholder: "Message", "aria-label": "Message", maxlength: "4000" });
    const send = async () => {
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      this.app.typingNow(conv, false);
      await this.app.send(conv, text);
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        void send();
      }
    });
    input.addEventListener("input", () => this.app.typingNow(conv, input.value.length > 0));
    const addError = h("p", { class: "error", role: "alert", id: "add-error" });
    const add = h(
      "form",
      {
        class: "add-member",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          const f = e.target as HTMLFormElement;
          const name = String(new FormData(f).get("username")).trim();
          addError.textContent = "";
          try {
            await this.app.addMember(conv, name);
            f.reset();
          } catch (err) {
            addError.textContent = errorText(err);
          }
        },
      },
      h("label", { for: "add-username" }, "Add someone"),
      h("div", { class: "row" }, h("input", { id: "add-username", name: "username", required: true, autocomplete: "off" }), h("button", { type: "submit" }, "Add")),
      addError,
    );
    return h(
      "section",
      { class: "conv-pane", "aria-labelledby": "conv-title" },
      h(
        "div",
        { class: "conv-head" },
        h("a", { href: "#/", class: "back", "aria-label": "Back to conversations" }, "‹"),
        h("div", {}, h("h2", { id: "conv-title" }), h("p", { id: "conv-members", class: "sub" })),
      ),
      h("details", { class: "conv-tools" }, h("summary", {}, "Members"), add),
      h("div", { id: "messages", class: "messages", role: "log", "aria-live": "polite", "aria-label": "Messages", tabindex: "0" }),
      h("p", { id: "typing", class: "typing", "aria-live": "polite" }),
      h(
        "form",
        {
          class: "composer",
          onsubmit: (e: Event) => {
            e.preventDefault();
            void send();
          },
        },
        input,
        h("button", { type: "submit", class: "primary" }, "Send"),
      ),
    );
  }

  private devicesScreen(): HTMLElement {
    const s = this.app.session!;
    const msg = h("p", { class: "error", role: "alert", id: "profile-error" });
    const profile = h(
      "form",
      {
        class: "card",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          msg.textContent = "";
          try {
            await this.app.updateProfile(String(new FormData(e.target as HTMLFormElement).get("display_name")).trim());
            msg.textContent = "Saved.";
          } catch (err) {
            msg.textContent = errorText(err);
          }
        },
      },
      h("h2", {}, "Profile"),
      h("label", { for: "profile-name" }, "Display name"),
      h("div", { class: "row" }, h("input", { id: "profile-name", name: "display_name", value: s.displayName, maxlength: "64", required: true }), h("button", { type: "submit" }, "Save")),
      msg,
    );
    return h(
      "section",
      { class: "devices", "aria-labelledby": "devices-title" },
      profile,
      h("div", { class: "card" }, h("h2", { id: "devices-title" }, "Your devices"), h("ul", { id: "device-list", class: "device-list" }, h("li", {}, "Loading…"))),
    );
  }

  // -- updates -----------------------------------------------------------------------
  private async update(): Promise<void> {
    const conn = this.root.querySelector("#conn");
    if (conn) {
      conn.className = `pill ${this.app.state}`;
      conn.textContent = STATE_TEXT[this.app.state] + (this.app.stateDetail ? ` — ${this.app.stateDetail}` : "");
    }
    const list = this.root.querySelector("#conv-list");
    if (list) this.renderList(list as HTMLElement);
    if (this.route.startsWith("/c/")) await this.renderConversation(this.route.slice(3));
    if (this.route === "/devices") await this.renderDevices();
  }

  private renderList(list: HTMLElement): void {
    const convs = [...this.app.convs.values()].filter((c) => !c.left).sort((a, b) => b.lastTs - a.lastTs);
    const items = convs.map((c) => {
      const current = this.route === `/c/${c.id}`;
      const online = c.members.some((m) => m.user_id !== this.app.session?.userId && this.app.presence.get(m.user_id) === "online");
      return h(
        "li",
        {},
        h(
          "a",
          { href: `#/c/${c.id}`, class: current ? "conv current" : "conv", "aria-current": current ? "true" : false },
          h("span", { class: online ? "dot on" : "dot", "aria-hidden": "true" }),
          h("span", { class: "conv-text" }, h("strong", {}, this.app.title(c)), h("span", { class: "sub" }, c.lastText || "No messages yet")),
          c.unread ? h("span", { class: "badge", "aria-label": `${c.unread} unread` }, String(c.unread)) : null,
        ),
      );
    });
    list.replaceChildren(...(items.length ? items : [h("li", { class: "sub" }, "No conversations yet.")]));
  }

  private async renderConversation(conv: string): Promise<void> {
    const rec = this.app.convs.get(conv);
    const title = this.root.querySelector("#conv-title");
    const members = this.root.querySelector("#conv-members");
    const box = this.root.querySelector("#messages") as HTMLElement | null;
    if (!box || !title || !members) return;
    if (!rec) {
      title.textContent = "Conversation";
      return;
    }
    title.textContent = this.app.title(rec);
    members.textContent = rec.members
      .map((m) => {
        const p = this.app.presence.get(m.user_id);
        const me = m.user_id === this.app.session?.userId;
        return `${m.display_name || m.username}${me ? " (you)" : p && p !== "offline" ? ` · ${p}` : ""}`;
      })
      .join(", ");
    const size = this.pageSize.get(conv) ?? 50;
    const stored = await this.app.messages(conv, size + 1);
    const more = stored.length > size;
    const shown = more ? stored.slice(1) : stored;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const nodes: Node[] = [];
    if (more) {
      nodes.push(
        h(
          "button",
          {
            class: "older",
            onclick: () => {
              this.pageSize.set(conv, size + 50);
              void this.update();
            },
          },
          "Load older messages",
        ),
      );
    }
    for (const m of shown) nodes.push(this.messageNode(rec, m));
    for (const o of [...this.app.outbox.values()].filter((x) => x.conv === conv).sort((a, b) => a.createdAt - b.createdAt)) {
      nodes.push(
        h(
          "div",
          { class: "msg own pending", "data-rid": o.rid },
          h("p", { class: "text" }, o.text),
          h(
            "p",
            { class: "meta" },
            o.failed ? `Not sent: ${o.failed} ` : this.app.state === "online" ? (this.app.hasKeys(conv) ? "Sending…" : "Waiting for encryption keys…") : "Waiting for connection…",
            o.failed ? h("button", { class: "link", onclick: () => void this.app.retry(o.rid) }, "Retry") : null,
          ),
        ),
      );
    }
    if (!nodes.length) nodes.push(h("p", { class: "sub center" }, this.app.hasKeys(conv) ? "No messages yet. Say hello!" : "Setting up encryption…"));
    box.replaceChildren(...nodes);
    if (atBottom || !box.dataset.seen) box.scrollTop = box.scrollHeight;
    box.dataset.seen = "1";
    const typers = this.app.typers(conv);
    const typing = this.root.querySelector("#typing");
    if (typing) typing.textContent = typers.length ? `${typers.join(", ")} ${typers.length > 1 ? "are" : "is"} typing…` : "";
    if (document.visibilityState === "visible") this.app.markRead(conv);
  }

  private messageNode(rec: ConvRecord, m: StoredMessage): HTMLElement {
    if (m.kind === "system") {
      const text = m.subject ? `${this.app.nameOf(rec, m.subject)} ${m.text}` : m.text;
      return h("p", { class: "system", "data-seq": String(m.seq) }, text);
    }
    const own = m.sender === this.app.session?.userId;
    const sender = rec.members.find((x) => x.user_id === m.sender);
    let status = "";
    if (own) status = m.seq <= rec.readByOthersSeq ? "Read" : m.seq <= rec.deliveredSeq ? "Delivered" : "Sent";
    return h(
      "div",
      { class: own ? "msg own" : "msg", "data-seq": String(m.seq) },
      own ? null : h("p", { class: "who" }, sender ? sender.display_name || sender.username : "Someone"),
      m.kind === "unavailable"
        ? h("p", { class: "text muted" }, "🔒 This message can't be decrypted on this device.")
        : h("p", { class: "text" }, m.text),
      h("p", { class: "meta" }, time(m.ts), status ? ` · ${status}` : ""),
    );
  }

  private async renderDevices(): Promise<void> {
    const list = this.root.querySelector("#device-list");
    if (!list || this.app.state !== "online") return;
    let devices;
    try {
      devices = await this.app.devices();
    } catch {
      return;
    }
    devices.sort((a, b) => Number(b.current) - Number(a.current) || b.created_at - a.created_at);
    list.replaceChildren(
      ...devices.map((d) => {
        const when = (ms: number) => new Date(ms).toLocaleString();
        return h(
          "li",
          { class: "device" },
          h(
            "div",
            {},
            h("strong", {}, d.current ? "This device" : `Device ${String(d.device_id).slice(0, 6)}`),
            h("span", { class: d.online ? "tag on" : "tag" }, d.online ? "online" : "offline"),
            h("p", { class: "sub" }, `Added ${when(d.created_at)} · last seen ${when(d.last_seen_at)}`),
          ),
          h(
            "button",
            {
              class: "danger",
              "aria-label": d.current ? "Sign out this device" : `Revoke device ${String(d.device_id).slice(0, 6)}`,
              onclick: async () => {
                if (!confirm(d.current ? "Sign out this device?" : "Sign this device out for good?")) return;
                await this.app.revokeDevice(d.device_id);
                void this.update();
              },
            },
            d.current ? "Sign out" : "Revoke",
          ),
        );
      }),
    );
  }
}
