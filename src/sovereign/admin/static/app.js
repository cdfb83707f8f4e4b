// The admin panel: a hash-routed single page over the admin API (SPEC §10).
import { ApiError, DELETE, GET, POST, PUT } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { ago, badge, bytes, confirmDialog, duration, emptyState, h, icon, when } from "./dom.js";
import { explain, get as getPasskey, supported } from "./webauthn.js";

const app = document.getElementById("app");
let me = null;
let refreshTimer = null;

const PAGES = [
  ["dashboard", "Dashboard", dashboard],
  ["users", "Users", users],
  ["sessions", "Sessions", sessions],
  ["invites", "Invites", invites],
  ["settings", "Settings", settings],
  ["mls", "MLS health", mlsHealth],
];

// -- boot and routing -------------------------------------------------------------
async function boot() {
  try {
    me = await GET("/me");
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return signIn(err.status === 403);
    return fatal(err);
  }
  route();
}

window.addEventListener("hashchange", () => me && route());

function route() {
  clearInterval(refreshTimer);
  const [name, arg] = location.hash.replace(/^#\/?/, "").split("/");
  const page = PAGES.find((p) => p[0] === name) || PAGES[0];
  const main = h("main", { class: "main", id: "main" });
  app.replaceChildren(shell(page[0]), main);
  app.className = "shell";
  app.removeAttribute("aria-busy");
  document.title = `${page[1]} · ${me.server_name} admin`;
  page[2](main, arg ? decodeURIComponent(arg) : undefined).catch((err) => showError(main, err));
}

function shell(active) {
  return h(
    "aside",
    { class: "sidebar" },
    h("div", { class: "brand" }, h("img", { src: "/admin/static/logo.svg", alt: "" }), h("div", {}, me.server_name, h("small", {}, "Administration"))),
    h(
      "nav",
      { class: "nav", "aria-label": "Sections" },
      PAGES.map(([id, label]) => h("a", { href: `#/${id}`, class: id === active ? "active" : "", "aria-current": id === active ? "page" : null }, icon(id), h("span", {}, label))),
    ),
    h("div", { class: "spacer" }),
    h("div", { class: "who" }, h("div", { class: "name muted small" }, "Signed in as ", h("strong", {}, me.user.username)), h("button", { class: "small", id: "sign-out", onclick: signOut }, "Sign out")),
  );
}

function head(title, subtitle, ...actions) {
  return h("div", { class: "page-head" }, h("div", {}, h("h1", {}, title), subtitle ? h("p", { class: "muted" }, subtitle) : null), h("div", { class: "row" }, actions));
}

function showError(where, err) {
  if (err instanceof ApiError && err.status === 401) return signIn(false);
  where.replaceChildren(h("div", { class: "notice error", role: "alert" }, err.message || String(err)));
}

function notice(where, text, kind = "") {
  const n = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  where.querySelector(".notice")?.remove();
  where.prepend(n);
  return n;
}

function fatal(err) {
  app.replaceChildren(h("main", { class: "auth-page" }, h("div", { class: "card auth-card" }, h("h1", {}, "Cannot load the panel"), h("p", { class: "form-error" }, err.message || String(err)), h("button", { class: "primary wide", onclick: () => location.reload() }, "Try again"))));
}

// -- sign-in / sign-out (SPEC §12.28) --------------------------------------------------
function signIn(notAdmin) {
  me = null;
  clearInterval(refreshTimer);
  app.className = "";
  app.removeAttribute("aria-busy");
  document.title = "Sign in · Sovereign admin";
  const error = h("p", { class: "form-error", role: "alert", hidden: !notAdmin }, notAdmin ? "That account is not a server admin." : "");
  const button = h("button", { class: "primary wide", id: "sign-in", type: "submit" }, "Sign in with a passkey");
  const form = h(
    "form",
    { class: "card auth-card", onsubmit: async (ev) => {
      ev.preventDefault();
      error.hidden = true;
      button.disabled = true;
      button.textContent = "Waiting for your passkey…";
      try {
        const options = await POST("/login/options");
        await POST("/login/verify", await getPasskey(options));
        location.hash = "#/dashboard";
        await boot();
      } catch (err) {
        error.textContent = err instanceof ApiError && err.code === 2003 ? "That passkey belongs to an account that is not a server admin." : explain(err);
        error.hidden = false;
        button.disabled = false;
        button.textContent = "Sign in with a passkey";
      }
    } },
    h("img", { src: "/admin/static/logo.svg", alt: "", class: "auth-logo", width: 48, height: 48 }),
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Use the passkey of a server admin account. Nothing to type: your device asks for your fingerprint, face or PIN."),
    error,
    button,
    supported() ? null : h("p", { class: "form-error" }, "This browser has no passkey support."),
  );
  app.replaceChildren(h("main", { class: "auth-page" }, form));
}

async function signOut() {
  try {
    await POST("/logout");
  } finally {
    location.hash = "";
    signIn(false);
  }
}

// -- dashboard -------------------------------------------------------------------------
async function dashboard(main) {
  main.append(head("Dashboard", "Live overview of this server. Refreshes every 10 seconds."));
  const body = h("div");
  main.append(body);
  async function draw() {
    const [info, stats] = await Promise.all([GET("/info"), GET("/stats")]);
    const tiles = [
      ["Connections now", info.active_connections],
      ["Users", info.total_users],
      ["Conversations", info.total_conversations],
      ["Messages stored", info.total_messages],
      ["Database", bytes(info.database_size_bytes)],
      ["Uptime", duration(info.uptime_seconds)],
    ];
    body.replaceChildren(
      h("div", { class: "grid stats" }, tiles.map(([label, value]) => h("div", { class: "card stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value)))),
      h(
        "div",
        { class: "grid charts" },
        lineChart("Connections", "connections", stats.points.map((p) => ({ value: p.connections }))),
        barChart("Messages per minute", "messages", stats.points.map((p) => ({ value: p.messages }))),
      ),
      h("p", { class: "muted small" }, `Sovereign ${info.version} · running since ${when(info.started_at)}`),
    );
  }
  await draw();
  refreshTimer = setInterval(() => draw().catch((err) => notice(main, err.message, "error")), 10000);
}

// -- users -----------------------------------------------------------------------------
function pager(pagination, go) {
  const { offset, limit, total } = pagination;
  if (total <= limit) return document.createDocumentFragment();
  return h(
    "div",
    { class: "pager" },
    h("span", {}, `${offset + 1}–${Math.min(offset + limit, total)} of ${total}`),
    h("div", { class: "row" }, h("button", { class: "small", disabled: offset === 0, onclick: () => go(Math.max(0, offset - limit)) }, "Previous"), h("button", { class: "small", disabled: offset + limit >= total, onclick: () => go(offset + limit) }, "Next")),
  );
}

function roleBadges(u) {
  return [u.is_admin ? badge("admin", "accent") : null, u.enabled ? badge("active", "ok") : badge("disabled", "danger")];
}

async function users(main, id) {
  if (id) return userDetail(main, id);
  const search = h("input", { type: "search", placeholder: "Search by username or name", "aria-label": "Search users", id: "user-search" });
  const list = h("div", { class: "card" });
  main.append(head("Users", "Everyone with an account on this server."), h("div", { class: "toolbar" }, search), list);
  async function load(offset = 0) {
    const q = encodeURIComponent(search.value.trim());
    const page = await GET(`/users?search=${q}&offset=${offset}&limit=25`);
    if (!page.data.length) {
      list.replaceChildren(search.value ? emptyState("No match", `No user matches “${search.value.trim()}”.`) : emptyState("No users yet", "Create an invite and share it: new users appear here."));
      return;
    }
    list.replaceChildren(
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "User"), h("th", {}, "Status"), h("th", { class: "hide-sm" }, "Joined"))),
        h("tbody", {}, page.data.map((u) => h("tr", {},
          h("td", {}, h("a", { href: `#/users/${encodeURIComponent(u.id)}` }, h("strong", {}, u.username)), h("div", { class: "muted small" }, u.display_name)),
          h("td", {}, h("div", { class: "row" }, roleBadges(u))),
          h("td", { class: "hide-sm muted" }, ago(u.created_at)),
        ))),
      )),
      pager(page.pagination, load),
    );
  }
  let t;
  search.addEventListener("input", () => { clearTimeout(t); t = setTimeout(() => load().catch((e) => showError(list, e)), 250); });
  await load();
}

async function userDetail(main, id) {
  const u = await GET(`/users/${encodeURIComponent(id)}`);
  const act = async (label, fn, confirmText) => {
    if (confirmText && !(await confirmDialog(label, confirmText, label))) return;
    try {
      await fn();
      main.replaceChildren();
      await userDetail(main, id);
      notice(main, `${label}: done.`);
    } catch (err) {
      notice(main, err.message, "error");
    }
  };
  const put = (body) => PUT(`/users/${encodeURIComponent(id)}`, body);
  main.append(
    head(
      u.username,
      u.display_name,
      u.enabled
        ? h("button", { id: "disable-user", onclick: () => act("Disable account", () => put({ enabled: false }), `${u.username} is signed out everywhere at once and cannot sign in until enabled again.`) }, "Disable")
        : h("button", { id: "enable-user", onclick: () => act("Enable account", () => put({ enabled: true })) }, "Enable"),
      u.is_admin
        ? h("button", { onclick: () => act("Remove admin", () => put({ is_admin: false }), `${u.username} will no longer manage this server.`) }, "Remove admin")
        : h("button", { id: "make-admin", onclick: () => act("Make admin", () => put({ is_admin: true }), `${u.username} will be able to manage this server, its users and settings.`, false) }, "Make admin"),
      h("button", { onclick: () => act("Revoke sessions", () => DELETE(`/users/${encodeURIComponent(id)}/sessions`), `Every device of ${u.username} is signed out and must sign in again with a passkey.`) }, "Revoke sessions"),
      h("button", { class: "danger", id: "delete-user", onclick: async () => {
        if (!(await confirmDialog("Delete user", `${u.username} is removed from every conversation, and their passkeys, devices and key packages are deleted. This cannot be undone.`, "Delete user"))) return;
        try {
          await DELETE(`/users/${encodeURIComponent(id)}`);
          location.hash = "#/users";
        } catch (err) {
          notice(main, err.message, "error");
        }
      } }, "Delete"),
    ),
    h("div", { class: "grid charts" },
      h("div", { class: "card" }, h("h2", {}, "Account"), h("dl", { class: "kv" },
        h("dt", {}, "Status"), h("dd", {}, h("div", { class: "row" }, roleBadges(u), u.online ? badge("online", "ok") : badge("offline"))),
        h("dt", {}, "User id"), h("dd", { class: "mono" }, u.id),
        h("dt", {}, "Joined"), h("dd", {}, when(u.created_at)),
        h("dt", {}, "Key packages"), h("dd", {}, String(u.key_packages)),
      )),
      h("div", { class: "card" }, h("h2", {}, "Passkeys"), u.credentials.length
        ? h("ul", {}, u.credentials.map((c) => h("li", {}, `Added ${when(c.created_at)}`, h("span", { class: "muted small" }, c.last_used_at ? ` · last used ${ago(c.last_used_at)}` : " · never used"))))
        : emptyState("No passkey", "This account was created by an operator and has no passkey yet.")),
    ),
    h("div", { class: "card section" }, h("h2", {}, "Devices"), u.sessions.length ? sessionTable(u.sessions, () => { main.replaceChildren(); return userDetail(main, id); }, false) : emptyState("No active device", "This user is signed in nowhere.")),
    h("div", { class: "card section" }, h("h2", {}, "Conversations"), u.conversations.length
      ? h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Title"), h("th", {}, "Role"), h("th", {}, "Members"))),
          h("tbody", {}, u.conversations.map((c) => h("tr", {}, h("td", {}, c.title || h("span", { class: "muted" }, "(untitled)")), h("td", {}, c.role), h("td", {}, String(c.members)))))))
      : emptyState("No conversations", "This user is in no conversation.")),
  );
}

// -- sessions --------------------------------------------------------------------------
function sessionTable(rows, reload, withUser = true) {
  return h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, withUser ? h("th", {}, "User") : null, h("th", {}, "Device"), h("th", { class: "hide-sm" }, "Last seen"), h("th", {}, "Status"), h("th", {}))),
    h("tbody", {}, rows.map((s) => h("tr", {},
      withUser ? h("td", {}, h("a", { href: `#/users/${encodeURIComponent(s.user_id)}` }, s.username || s.user_id)) : null,
      h("td", {}, h("div", {}, s.kind === "admin" ? `Admin panel · ${describeAgent(s.user_agent)}` : describeAgent(s.user_agent)), h("div", { class: "muted small mono" }, s.device_id.slice(0, 10))),
      h("td", { class: "hide-sm muted" }, ago(s.last_seen_at)),
      h("td", {}, s.kind === "admin" ? badge("panel", "accent") : s.online ? badge("online", "ok") : badge("offline")),
      h("td", { class: "actions" }, h("button", { class: "small danger", onclick: async (ev) => {
        if (!(await confirmDialog("Revoke session", "The device is signed out at once and must sign in again with a passkey.", "Revoke"))) return;
        ev.target.disabled = true;
        try {
          await DELETE(`/sessions/${encodeURIComponent(s.id)}`);
          await reload();
        } catch (err) {
          ev.target.closest(".card")?.prepend(h("div", { class: "notice error", role: "alert" }, err.message));
        }
      } }, "Revoke")),
    ))),
  ));
}

function describeAgent(ua) {
  if (!ua) return "Client app";
  if (ua === "cli" || ua === "test") return "Operator token";
  if (/HeadlessChrome\//.test(ua)) return "Headless Chrome";
  const browser = /Edg\//.test(ua) ? "Edge" : /Chrome\//.test(ua) ? "Chrome" : /Firefox\//.test(ua) ? "Firefox" : /Safari\//.test(ua) ? "Safari" : null;
  const os = /Android/.test(ua) ? "Android" : /iPhone|iPad/.test(ua) ? "iOS" : /Mac OS X/.test(ua) ? "macOS" : /Windows/.test(ua) ? "Windows" : /Linux/.test(ua) ? "Linux" : null;
  return browser ? `${browser}${os ? ` on ${os}` : ""}` : ua.slice(0, 40);
}

async function sessions(main) {
  const list = h("div", { class: "card" });
  main.append(head("Sessions", "Signed-in devices. Revoking one signs it out at once."), list);
  async function load(offset = 0) {
    const page = await GET(`/sessions?offset=${offset}&limit=50`);
    list.replaceChildren(page.data.length ? sessionTable(page.data, () => load(offset)) : emptyState("No active sessions", "Nobody is signed in right now."), pager(page.pagination, load));
  }
  await load();
}

// -- invites ---------------------------------------------------------------------------
async function invites(main) {
  const expiry = h("select", { id: "invite-expiry", "aria-label": "Expires after" },
    h("option", { value: "24" }, "Expires in 1 day"),
    h("option", { value: "168", selected: true }, "Expires in 7 days"),
    h("option", { value: "720" }, "Expires in 30 days"),
    h("option", { value: "0" }, "Never expires"));
  const created = h("div");
  const list = h("div", { class: "card section" });
  const createButton = h("button", { class: "primary", id: "create-invite", onclick: async () => {
    createButton.disabled = true;
    try {
      const inv = await POST("/invites", { expires_in_hours: Number(expiry.value) });
      const link = `${me.client_origin}/?invite=${encodeURIComponent(inv.code)}`;
      const codeBox = h("input", { readonly: true, value: inv.code, id: "invite-code", "aria-label": "Invite code" });
      const linkBox = h("input", { readonly: true, value: link, id: "invite-link", "aria-label": "Invite link" });
      const copy = (box) => async (ev) => {
        box.select();
        try { await navigator.clipboard.writeText(box.value); ev.target.textContent = "Copied"; } catch { document.execCommand?.("copy"); ev.target.textContent = "Selected"; }
      };
      created.replaceChildren(h("div", { class: "card section" },
        h("h2", {}, "Invite created"),
        h("p", { class: "muted" }, `Share it with one person. It works once${inv.expires_at ? ` and expires ${ago(inv.expires_at)}` : " and never expires"}. It is shown only now.`),
        h("label", {}, "Link"), h("div", { class: "copy-box" }, linkBox, h("button", { onclick: copy(linkBox) }, "Copy")),
        h("label", {}, "Code"), h("div", { class: "copy-box" }, codeBox, h("button", { onclick: copy(codeBox) }, "Copy"))));
      await load();
    } catch (err) {
      notice(main, err.message, "error");
    } finally {
      createButton.disabled = false;
    }
  } }, "Create invite");
  main.append(head("Invites", "Single-use codes that let someone register when registration is by invite."), h("div", { class: "card" }, h("div", { class: "row" }, expiry, createButton)), created, list);
  async function load(offset = 0) {
    const page = await GET(`/invites?offset=${offset}&limit=50`);
    if (!page.data.length) {
      list.replaceChildren(emptyState("No invites yet", "Create one above and share the link."));
      return;
    }
    const kind = { open: "ok", used: "", expired: "warn" };
    list.replaceChildren(h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Created"), h("th", {}, "Expires"), h("th", {}, "Status"), h("th", {}))),
      h("tbody", {}, page.data.map((i) => h("tr", {},
        h("td", {}, when(i.created_at), i.bootstrap ? h("div", { class: "muted small" }, "first-admin setup code") : null),
        h("td", { class: "muted" }, i.expires_at ? ago(i.expires_at) : "never"),
        h("td", {}, badge(i.status, kind[i.status])),
        h("td", { class: "actions" }, i.status === "open" ? h("button", { class: "small danger", onclick: async () => {
          if (!(await confirmDialog("Revoke invite", "The code stops working at once.", "Revoke"))) return;
          try { await DELETE(`/invites/${i.id}`); await load(offset); } catch (err) { notice(main, err.message, "error"); }
        } }, "Revoke") : null),
      ))))), pager(page.pagination, load));
  }
  await load();
}

// -- settings --------------------------------------------------------------------------
const SETTING_HELP = {
  server_name: ["Server name", "Shown to clients after sign-in."],
  registration: ["Registration", "Who may create an account."],
  max_connections: ["Max connections", "All sockets together. Lowering it never drops live ones."],
  max_connections_per_user: ["Max connections per user", "The oldest is closed beyond this."],
  rate_limit_per_second: ["Messages per second", "Per connection; applies to new connections."],
  rate_limit_burst: ["Burst", "Messages a connection may send at once."],
  max_message_size_bytes: ["Max message size (bytes)", "Largest encrypted message payload."],
  session_timeout_hours: ["Session lifetime (hours)", "Sliding; a device signs in again after this idle time."],
  min_key_packages: ["Min key packages", "Below this, devices are told to upload more."],
};
const SOURCE_TEXT = { default: "default", file: "config file", env: "environment", flag: "command line", admin: "set here" };

async function settings(main) {
  const { data } = await GET("/settings");
  const inputs = {};
  const fields = data.map((s) => {
    const [label, help] = SETTING_HELP[s.key] || [s.key, ""];
    const input = s.key === "registration"
      ? h("select", { id: `set-${s.key}`, name: s.key }, ["open", "invite", "closed"].map((v) => h("option", { value: v, selected: v === s.value }, v)))
      : h("input", { id: `set-${s.key}`, name: s.key, value: s.value, inputmode: typeof s.value === "number" ? "decimal" : null });
    inputs[s.key] = { input, original: s.value };
    return h("div", {},
      h("label", { for: `set-${s.key}` }, label, h("span", { class: `badge source ${s.source === "admin" ? "accent" : ""}` }, SOURCE_TEXT[s.source] || s.source)),
      input,
      h("div", { class: "field-hint" }, help, s.source === "admin" ? [" ", h("a", { href: "#", onclick: async (ev) => { ev.preventDefault(); await DELETE(`/settings/${s.key}`); main.replaceChildren(); await settings(main); notice(main, `${label} reset to its start-up value.`); } }, "Reset")] : null));
  });
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const save = h("button", { class: "primary", type: "submit", id: "save-settings" }, "Save changes");
  const form = h("form", { class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    for (const { input } of Object.values(inputs)) input.removeAttribute("aria-invalid");
    const body = {};
    for (const [key, { input, original }] of Object.entries(inputs)) {
      let v = input.value.trim();
      if (typeof original === "number") v = v === "" ? NaN : Number(v);
      if (typeof original === "number" && Number.isInteger(original) && !Number.isInteger(v) && key !== "rate_limit_per_second") v = input.value;
      if (v !== original) body[key] = Number.isNaN(v) ? input.value : v;
    }
    if (!Object.keys(body).length) { notice(main, "Nothing changed."); return; }
    save.disabled = true;
    try {
      await PUT("/settings", body);
      main.replaceChildren();
      await settings(main);
      notice(main, "Saved. The new values apply now, and survive a restart.");
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
      if (err.field && inputs[err.field]) { inputs[err.field].input.setAttribute("aria-invalid", "true"); inputs[err.field].input.focus(); }
    } finally {
      save.disabled = false;
    }
  } }, h("div", { class: "settings-grid" }, fields), error, h("div", { class: "row", style: "margin-top:1.25rem" }, save));
  main.append(head("Settings", "Changes apply at once, without a restart, and win over the config file until reset."), form);
}

// -- MLS health (SPEC §12.24) ------------------------------------------------------------
async function mlsHealth(main) {
  const convCard = h("div", { class: "card" });
  const devCard = h("div", { class: "card section" });
  main.append(head("MLS health", "Group state the server can see without decrypting anything."), convCard, devCard);
  async function loadConvs(offset = 0) {
    const page = await GET(`/mls/conversations?offset=${offset}&limit=50`);
    convCard.replaceChildren(h("h2", {}, "Conversations"), page.data.length
      ? h("div", { class: "table-wrap" }, h("table", { id: "mls-conversations" },
          h("thead", {}, h("tr", {}, h("th", {}, "Conversation"), h("th", {}, "Epoch"), h("th", { class: "hide-sm" }, "Last commit"), h("th", {}, "Refused (24 h)"), h("th", {}, "GroupInfo"), h("th", { class: "hide-sm" }, "Pending welcomes"))),
          h("tbody", {}, page.data.map((c) => h("tr", {},
            h("td", {}, h("strong", {}, c.title || "(untitled)"), h("div", { class: "muted small" }, `${c.member_count} member${c.member_count === 1 ? "" : "s"}${c.mls_group_id ? "" : " · no MLS group yet"}`)),
            h("td", { class: "epoch" }, String(c.epoch)),
            h("td", { class: "hide-sm muted" }, c.last_commit_at ? ago(c.last_commit_at) : "never"),
            h("td", {}, c.commits_rejected_24h ? badge(String(c.commits_rejected_24h), c.commits_rejected_24h > 10 ? "danger" : "warn") : badge("0", "ok")),
            h("td", {}, c.group_info_stored ? badge("stored", "ok") : badge(c.mls_group_id ? "missing" : "—", c.mls_group_id ? "warn" : "")),
            h("td", { class: "hide-sm" }, String(c.pending_welcomes)),
          )))))
      : emptyState("No conversations yet", "Conversations appear here once users create groups."), pager(page.pagination, loadConvs));
  }
  async function loadDevices(offset = 0) {
    const page = await GET(`/mls/devices?offset=${offset}&limit=50`);
    devCard.replaceChildren(h("h2", {}, "Devices' key packages"), page.data.length
      ? h("div", { class: "table-wrap" }, h("table", { id: "mls-devices" },
          h("thead", {}, h("tr", {}, h("th", {}, "User"), h("th", { class: "hide-sm" }, "Device"), h("th", {}, "Key packages"), h("th", {}, "Last resort"), h("th", {}, "Pool"))),
          h("tbody", {}, page.data.map((d) => h("tr", {},
            h("td", {}, h("a", { href: `#/users/${encodeURIComponent(d.user_id)}` }, d.username)),
            h("td", { class: "hide-sm mono muted" }, d.device_id.slice(0, 10)),
            h("td", {}, String(d.key_packages)),
            h("td", {}, d.has_last_resort ? "yes" : "no"),
            h("td", {}, d.below_min ? badge("below minimum", "warn") : badge("ok", "ok")),
          )))))
      : emptyState("No devices", "No device is signed in."), pager(page.pagination, loadDevices));
  }
  await Promise.all([loadConvs(), loadDevices()]);
}

boot();
