// zchat web page: plain JavaScript, no build step. Talks to the gateway over one
// WebSocket (docs/web.md, "The WebSocket"). Every piece of user text goes into the
// page with textContent, never innerHTML: names, rooms and messages are text.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function randomRef() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const S = {
  name: "",
  ws: null,
  open: false,          // the WebSocket is up and welcomed
  brokerState: "connected",
  rooms: new Map(),     // room -> {room, epoch, msgs: Map(seq -> msg), seqs: [], unread, mention, more, members: Map, notes: []}
  current: "",
  outbox: [],           // {ref, room, to, text, me, node, failed}
  retry: 500,
  loadingOlder: false,
};

// ------------------------------------------------------------------ rooms

function isDm(room) { return room.startsWith("@"); }

function dmPeer(room) {
  const [a, b] = room.slice(1).split(":");
  return a === S.name ? b : a;
}

function label(room) { return isDm(room) ? dmPeer(room) : "#" + room; }

function roomOf(room, epoch) {
  let r = S.rooms.get(room);
  if (!r) {
    r = { room, epoch: epoch || "", msgs: new Map(), seqs: [], unread: 0, mention: false, more: false, members: new Map(), notes: [] };
    S.rooms.set(room, r);
    renderRoomList();
  }
  if (epoch && r.epoch && epoch !== r.epoch) { // the broker's history was reset: start over
    r.msgs.clear(); r.seqs = []; r.notes = [];
    if (room === S.current) renderLog();
  }
  if (epoch) r.epoch = epoch;
  return r;
}

function lastSeq(r) { return r.seqs.length ? r.seqs[r.seqs.length - 1] : 0; }

function mentions(text) {
  const re = new RegExp("(^|[^a-z0-9_-])@?" + S.name.replace(/[-]/g, "\\-") + "($|[^a-z0-9_-])", "i");
  return re.test(text);
}

// Insert a message once (by seq) in order; true if it was new.
function addMsg(m, live) {
  const r = roomOf(m.room);
  if (r.msgs.has(m.seq)) return false;
  if (m.kind === "delete") hide(r, Number(m.text));
  r.msgs.set(m.seq, m);
  let i = r.seqs.length;
  while (i > 0 && r.seqs[i - 1] > m.seq) i--;
  r.seqs.splice(i, 0, m.seq);
  const mine = m.sender === S.name;
  if (live && !mine && (m.room !== S.current || document.hidden) && (m.kind === "text" || m.kind === "me")) {
    r.unread++;
    if (mentions(m.text) || isDm(m.room)) r.mention = true;
    renderRoomList();
  }
  if (m.room === S.current) insertNode(r, m, i);
  return true;
}

// A moderator deleted line SEQ: show it as the tombstone history now holds.
function hide(r, seq) {
  const old = r.msgs.get(seq);
  if (!old) return;
  r.msgs.set(seq, { ...old, kind: "deleted", text: "", action: "(message deleted)" });
  const node = r.room === S.current && $("log").querySelector(`li.msg[data-seq="${seq}"]`);
  if (node) node.replaceWith(msgNode(r.msgs.get(seq)));
}

function msgNode(m) {
  const li = el("li", "msg kind-" + m.kind);
  li.dataset.seq = String(m.seq);
  li.dataset.room = m.room;
  const when = new Date(m.ts * 1000);
  const time = el("time", "ts", when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  li.append(time, " ");
  if (m.action) { // a moderation line (kick, topic, delete...), worded by the gateway
    li.classList.add("action");
    li.append(el("span", "text", m.action));
  } else if (m.kind === "me") {
    li.append(el("span", "star", "* "), el("span", "sender", m.sender), " ", el("span", "text", m.text));
  } else if (m.kind === "join" || m.kind === "part") {
    li.append(el("span", "sender", m.sender), el("span", "text", m.kind === "join" ? " joined" : " left"));
  } else {
    li.append(el("span", "sender", m.sender), el("span", "sep", ": "), el("span", "text", m.text));
  }
  if (m.sender !== S.name && (m.kind === "text" || m.kind === "me") && mentions(m.text)) li.classList.add("mention");
  return li;
}

function nearBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 60;
}

function insertNode(r, m, index) {
  const log = $("log");
  const stick = nearBottom();
  const node = msgNode(m);
  const nextSeq = r.seqs[index + 1];
  const next = nextSeq === undefined ? null : log.querySelector(`li.msg[data-seq="${nextSeq}"]`);
  log.insertBefore(node, next || log.querySelector("li.note"));
  if (stick) log.scrollTop = log.scrollHeight;
}

function note(text, room) {
  const r = S.rooms.get(room || S.current);
  if (r) r.notes.push(text);
  if (!room || room === S.current) {
    const stick = nearBottom();
    $("log").append(el("li", "note", text));
    if (stick) $("log").scrollTop = $("log").scrollHeight;
  }
}

function renderLog() {
  const log = $("log");
  log.replaceChildren();
  const r = S.rooms.get(S.current);
  if (!r) return;
  for (const seq of r.seqs) log.append(msgNode(r.msgs.get(seq)));
  for (const text of r.notes) log.append(el("li", "note", text));
  log.scrollTop = log.scrollHeight;
}

function renderRoomList() {
  const rooms = $("room-list"), dms = $("dm-list");
  rooms.replaceChildren(); dms.replaceChildren();
  for (const r of [...S.rooms.values()].sort((a, b) => label(a.room).localeCompare(label(b.room)))) {
    const li = el("li");
    const b = el("button", "room" + (r.room === S.current ? " current" : "") + (r.mention ? " mentioned" : ""));
    b.type = "button";
    b.dataset.room = r.room;
    b.append(el("span", "name", label(r.room)));
    if (r.unread) b.append(el("span", "unread", String(r.unread)));
    if (r.mention) b.append(el("span", "mark", "@"));
    if (r.room === S.current) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => { switchTo(r.room); closePanels(); });
    li.append(b);
    (isDm(r.room) ? dms : rooms).append(li);
  }
}

function renderMembers() {
  const list = $("member-list");
  list.replaceChildren();
  const r = S.rooms.get(S.current);
  if (!r) return;
  const names = isDm(r.room) ? r.room.slice(1).split(":") : [...r.members.keys()];
  for (const name of names.sort()) {
    const online = isDm(r.room) ? (r.members.get(name) ?? null) : r.members.get(name);
    const li = el("li", online ? "online" : "offline");
    li.append(el("span", "dot", online ? "\u25cf" : "\u25cb"), " ", el("span", "name", name));
    li.title = online ? "online" : "offline";
    list.append(li);
  }
}

function switchTo(room) {
  if (!S.rooms.has(room)) return;
  S.current = room;
  const r = S.rooms.get(room);
  r.unread = 0; r.mention = false;
  $("room-title").textContent = label(room);
  document.title = label(room) + " \u2013 zchat";
  renderRoomList(); renderLog(); renderMembers();
  if (!isDm(room)) request({ t: "who", room });
  localStorage.setItem("zchat-room", room);
}

// ------------------------------------------------------------------ the socket

function request(frame) {
  if (S.ws && S.open) S.ws.send(JSON.stringify(frame));
  else note("not connected: try again when the chat is back");
}

function setIndicator() {
  const down = !S.open || S.brokerState !== "connected";
  document.body.classList.toggle("offline", down);
  $("conn").textContent = down ? "reconnecting\u2026" : "connected";
}

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  S.ws = ws;
  ws.onopen = () => {
    const since = {};
    for (const r of S.rooms.values()) if (r.epoch && r.seqs.length) since[r.room] = [r.epoch, lastSeq(r)];
    ws.send(JSON.stringify({ t: "hello", since }));
  };
  ws.onmessage = (ev) => onFrame(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    S.open = false; S.ws = null; setIndicator();
    if (ev.code === 4001) { showSignIn(); return; }
    if (ev.code === 4003) { $("conn").textContent = "too many open tabs: close one and reload"; return; }
    fetch("/api/me").then((resp) => {
      if (resp.status === 401) showSignIn();
      else { setTimeout(connect, S.retry); S.retry = Math.min(S.retry * 2, 5000); }
    }, () => { setTimeout(connect, S.retry); S.retry = Math.min(S.retry * 2, 5000); });
  };
}

function onFrame(f) {
  switch (f.t) {
    case "welcome":
      S.open = true; S.retry = 500; S.brokerState = f.state === "connected" ? "connected" : "reconnecting";
      for (const r of f.rooms) roomOf(r.room, r.epoch);
      for (const r of S.rooms.values()) r.fresh = false;
      if (!S.current || !S.rooms.has(S.current)) {
        const saved = localStorage.getItem("zchat-room");
        const first = f.rooms.find((r) => !isDm(r.room));
        switchTo(S.rooms.has(saved) ? saved : first ? first.room : f.rooms.length ? f.rooms[0].room : "");
      } else if (!isDm(S.current)) request({ t: "who", room: S.current });
      setIndicator();
      for (const item of S.outbox) sendItem(item); // typed while away: the same refs, so sent once
      break;
    case "events":
      for (const item of f.items) onItem(item);
      break;
    case "reset": { // what follows replaces what this page holds of the room up to upto
      const r = roomOf(f.room, f.epoch);
      for (const seq of r.seqs) if (seq <= f.upto) r.msgs.delete(seq);
      r.seqs = r.seqs.filter((s) => r.msgs.has(s));
      r.more = f.more;
      r.fresh = true;
      if (f.room === S.current) renderLog();
      break;
    }
    case "replay": { // after a reset: the newest page; else what this page missed (unread)
      const r = roomOf(f.room, f.epoch);
      for (const m of f.items) addMsg(m, !r.fresh);
      break;
    }
    case "older": {
      const r = roomOf(f.room);
      const log = $("log");
      const before = log.scrollHeight;
      r.more = f.more;
      for (const m of f.items) addMsg(m, false);
      if (f.room === S.current) log.scrollTop += log.scrollHeight - before;
      S.loadingOlder = false; $("older").hidden = true;
      break;
    }
    case "joined": {
      const r = roomOf(f.room);
      r.members = new Map(f.members.map((m) => [m.name, m.online]));
      switchTo(f.room);
      break;
    }
    case "parted":
      S.rooms.delete(f.room);
      if (S.current === f.room) {
        S.current = "";
        const next = [...S.rooms.keys()][0];
        if (next) switchTo(next); else { renderLog(); renderMembers(); $("room-title").textContent = ""; }
      }
      renderRoomList();
      break;
    case "members": {
      const r = roomOf(f.room);
      r.members = new Map(f.members.map((m) => [m.name, m.online]));
      if (f.room === S.current) renderMembers();
      if (S.askedWho === f.room) {
        S.askedWho = "";
        note(`${f.members.length} in #${f.room}: ` + f.members.map((m) => m.name + (m.online ? "" : " (away)")).join(", "));
      }
      break;
    }
    case "sent":
    case "failed": {
      const i = S.outbox.findIndex((o) => o.ref === f.ref);
      if (i < 0) break;
      const item = S.outbox[i];
      if (f.t === "sent") { S.outbox.splice(i, 1); item.node.remove(); }
      else { S.outbox.splice(i, 1); item.node.remove(); note(`not sent (${f.code}): ${f.message}`, item.room || S.current); }
      break;
    }
    case "error":
      note(`${f.about ? f.about + ": " : ""}${f.message}`);
      break;
  }
}

function onItem(item) {
  if (item.t === "msg") addMsg(item, true);
  else if (item.t === "presence") {
    const r = S.rooms.get(item.room);
    if (r) { r.members.set(item.name, item.online); if (item.room === S.current) renderMembers(); }
  } else if (item.t === "state") {
    S.brokerState = item.state === "connected" ? "connected" : "reconnecting";
    setIndicator();
  } else if (item.t === "gap") note(`${item.last - item.first + 1} messages could not be recovered (${item.reason})`, item.room);
  else if (item.t === "problem") note(`${item.code}: ${item.message}`);
}

// ------------------------------------------------------------------ sending

function queueLine(room, text, me) {
  const item = { ref: randomRef(), text, me: !!me, room: "", to: "" };
  if (isDm(room)) item.to = dmPeer(room); else item.room = room;
  return queueItem(item, label(room));
}

function queueItem(item, where) {
  item.node = el("li", "pending", `${where}: ${item.me ? "* " + S.name + " " : ""}${item.text}`);
  item.node.append(el("span", "state", " (sending\u2026)"));
  $("outbox").append(item.node);
  S.outbox.push(item);
  sendItem(item);
}

function sendItem(item) {
  if (!S.ws || !S.open) return; // sent by the welcome of the next connection
  S.ws.send(JSON.stringify({ t: "send", ref: item.ref, room: item.room, to: item.to, text: item.text, me: item.me }));
}

const HELP = "/join ROOM, /part [ROOM], /msg NAME TEXT, /me TEXT, /who [ROOM]; Enter sends, Shift-Enter starts a new line, Alt-Up/Down changes room, Escape comes back here.";

function command(line) {
  const [cmd, ...rest] = line.slice(1).split(" ");
  const arg = rest.join(" ");
  switch (cmd.toLowerCase()) {
    case "join": if (arg.trim()) request({ t: "join", room: arg.trim().replace(/^#/, "") }); else note("/join ROOM"); break;
    case "part": case "leave": {
      const room = arg.trim().replace(/^#/, "") || S.current;
      if (room) request({ t: "part", room });
      break;
    }
    case "msg": case "query": {
      const [to, ...words] = rest;
      if (!to || !words.join(" ").trim()) { note("/msg NAME TEXT"); break; }
      queueItem({ ref: randomRef(), to, room: "", text: words.join(" "), me: false }, to);
      break;
    }
    case "me": if (arg.trim() && S.current) queueLine(S.current, arg, true); break;
    case "who": {
      const room = arg.trim().replace(/^#/, "") || S.current;
      if (room && !isDm(room)) { S.askedWho = room; request({ t: "who", room }); }
      break;
    }
    case "help": note(HELP); break;
    default: note(`unknown command /${cmd}: ${HELP}`);
  }
}

function submit() {
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  input.value = "";
  autosize();
  if (text.startsWith("/") && !text.startsWith("//")) command(text.trim());
  else if (S.current) queueLine(S.current, text.startsWith("//") ? text.slice(1) : text, false);
  else note("join a room first: /join ROOM");
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

// ------------------------------------------------------------------ sign-in

function showSignIn(message) {
  $("chat").hidden = true; $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("signin-name").focus();
}

function showChat(name) {
  S.name = name;
  $("me").textContent = name;
  $("signin").hidden = true; $("chat").hidden = false;
  setIndicator();
  connect();
  $("input").focus();
}

async function sign(path) {
  const body = { name: $("signin-name").value.trim(), password: $("signin-password").value, invite: $("signin-invite").value.trim() };
  $("signin-error").textContent = path === "/api/signup" ? "creating the account\u2026" : "signing in\u2026";
  let resp, data;
  try {
    resp = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    data = await resp.json();
  } catch (e) {
    $("signin-error").textContent = "the chat is not reachable: " + e;
    return;
  }
  if (resp.ok) { $("signin-password").value = ""; showChat(data.name); }
  else $("signin-error").textContent = data.error || "refused";
}

function closePanels() {
  for (const id of ["rooms", "members"]) { $(id).classList.remove("open"); $("toggle-" + id).setAttribute("aria-expanded", "false"); }
}

function togglePanel(id) {
  const open = !$(id).classList.contains("open");
  closePanels();
  $(id).classList.toggle("open", open);
  $("toggle-" + id).setAttribute("aria-expanded", String(open));
  const first = open && $(id).querySelector("button, input");
  if (first) first.focus(); // keyboard users land in the panel they opened
}

function moveRoom(step) {
  const list = [...$("room-list").querySelectorAll("button"), ...$("dm-list").querySelectorAll("button")].map((b) => b.dataset.room);
  const i = list.indexOf(S.current);
  if (list.length) switchTo(list[(i + step + list.length) % list.length]);
}

function init() {
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); sign("/api/signin"); });
  $("signup-button").addEventListener("click", () => sign("/api/signup"));
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  $("input").addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => {
    if (e.altKey && e.key === "ArrowUp") { e.preventDefault(); moveRoom(-1); }
    else if (e.altKey && e.key === "ArrowDown") { e.preventDefault(); moveRoom(1); }
    else if (e.key === "Escape") { closePanels(); if (!$("chat").hidden) $("input").focus(); }
  });
  $("btn-me").addEventListener("click", () => {
    const text = $("input").value;
    if (text.trim() && S.current) { $("input").value = ""; queueLine(S.current, text, true); }
    $("input").focus();
  });
  $("btn-who").addEventListener("click", () => { command("/who"); $("input").focus(); });
  $("btn-part").addEventListener("click", () => command("/part"));
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const room = $("join-room").value.trim();
    if (room) { command("/join " + room); $("join-room").value = ""; closePanels(); }
  });
  $("toggle-rooms").addEventListener("click", () => togglePanel("rooms"));
  $("toggle-members").addEventListener("click", () => togglePanel("members"));
  $("signout").addEventListener("click", async () => {
    await fetch("/api/signout", { method: "POST" });
    if (S.ws) S.ws.close();
    S.rooms.clear(); S.current = ""; S.outbox = []; $("outbox").replaceChildren();
    showSignIn("signed out");
  });
  $("log").addEventListener("scroll", () => {
    const r = S.rooms.get(S.current);
    if (!r || !r.more || S.loadingOlder || $("log").scrollTop > 40 || !r.seqs.length) return;
    S.loadingOlder = true; $("older").hidden = false;
    request({ t: "history", room: r.room, before: r.seqs[0], limit: 50 });
  });
  document.addEventListener("visibilitychange", () => {
    const r = S.rooms.get(S.current);
    if (!document.hidden && r && r.unread) { r.unread = 0; r.mention = false; renderRoomList(); }
  });
  fetch("/api/me").then((resp) => resp.ok ? resp.json().then((d) => showChat(d.name)) : showSignIn(), () => showSignIn("the chat is not reachable"));
}

document.addEventListener("DOMContentLoaded", init);
