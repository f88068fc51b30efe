"""``zchat talk``: the full-screen chat client (Textual) over ``zchat.client``.

The app and the client share one asyncio loop: the Client is created in a worker
when the app mounts, a second worker reads ``client.events()`` into the buffers, and
a third sends queued lines one at a time (in the order typed; while the broker is
away they wait in the queue and the status line counts them). Commands that need the
broker run in their own workers, so the screen never waits on the network. Every
failure ends up as one line in the log, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Awaitable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from zchat import protocol as p
from zchat import render
from zchat.client import AuthError, Client, ClientError, ConnectError, Problem, Recovered, StateChange, split_addresses
from zchat.recovery import Gap
from zchat.tui import commands as c
from zchat.tui.cursors import CursorFile
from zchat.tui.notify import Notifier, NotifySettings
from zchat.tui.search import SearchResults
from zchat.tui.widgets import Buffer, ChatInput, MemberList, MessageLog, RoomList, StatusBar

log = logging.getLogger(__name__)

OLDER_PAGE = 50  # messages fetched when scrolling past the top
PASTE_ASK_LINES = 5  # a paste of more lines than this asks before sending
MAX_HELD = 1000  # lines typed while a paste prompt waits (bounded like every queue)
MAX_QUEUED = 1000  # lines waiting to be sent (typed while the broker is away, pasted)
RATE_RETRIES = 50  # a line refused as too fast is tried again this often, slower each time
SAVE_EVERY = 30.0  # seconds between saves of the read positions (and one on leaving)
SEARCH_LIMIT = 100  # results /search lists
AROUND = 20  # lines before and after a search result loaded with it


class _ToLog(logging.Handler):
    """zchat's own warnings, shown as lines in the current window instead of on stderr
    (which would tear the screen)."""

    def __init__(self, app: "ChatApp") -> None:
        super().__init__(logging.WARNING)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.app.note(f"{record.name}: {record.getMessage()}", "error")
        except Exception:  # never let logging break the screen
            pass


class PasteConfirm(ModalScreen[bool]):
    """"Send these N pasted lines?" Enter or y sends, Esc or n cancels."""

    BINDINGS = [
        Binding("enter,y", "answer(True)", "Send", show=False),
        Binding("escape,n", "answer(False)", "Cancel", show=False),
    ]
    PREVIEW = 3

    def __init__(self, count: int, where: str, lines: list[str]) -> None:
        super().__init__()
        self.count = count
        self.question = f"Paste {count} lines to {where}?"
        self.preview = lines[: self.PREVIEW] + ([f"… and {count - self.PREVIEW} more"] if count > self.PREVIEW else [])

    def compose(self) -> ComposeResult:
        with Vertical(id="paste-box"):
            yield Static(self.question, id="paste-question")
            yield Static("\n".join(self.preview), id="paste-preview", markup=False)
            yield Static("Enter/y send · Esc/n cancel", id="paste-keys")

    def action_answer(self, send: bool) -> None:
        self.dismiss(send)


class ChatApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "zchat"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        # not priority: the input line runs these itself, after the keys typed before them
        Binding("ctrl+n,alt+right", "cycle(1)", "Next window"),
        Binding("ctrl+p,alt+left", "cycle(-1)", "Previous window"),
        Binding("pageup", "page(-1)", "Scroll up", show=False),
        Binding("pagedown", "page(1)", "Scroll down", show=False),
        Binding("ctrl+q", "leave", "Quit", priority=True),
    ]

    def __init__(
        self,
        broker: str,
        name: str,
        rooms: list[str] | None = None,
        *,
        secret: str | None = None,
        history: int = 50,
        connect_timeout: float = 3.0,
        data_dir: Path | None = None,
        recover_limit: int = 1000,
        notify: NotifySettings | None = None,
    ) -> None:
        """``data_dir``: keep read positions there (cursors.py) and show what was said
        while away, up to ``recover_limit`` lines a window; None remembers nothing.
        ``notify``: bell and desktop notification on a mention or a DM (notify.py)."""
        super().__init__()
        split_addresses(broker)  # ValueError for a bad address, before the screen opens
        if not p.valid_name(name):
            raise ValueError(f"bad name {name!r}: use a-z, 0-9, '_', '-' (1-{p.MAX_NAME_LEN} characters)")
        self.broker = broker
        self.me = name
        self.secret = secret
        self.history = history
        self.connect_timeout = connect_timeout
        self.recover_limit = recover_limit
        self.cursor_file = CursorFile(data_dir, name, broker) if data_dir is not None else None
        self.left_at = self.cursor_file.load() if self.cursor_file is not None else {}
        self._away: dict[str, tuple[str, int, int]] = {}  # window -> (epoch, last seq shown, head on return)
        self.notifier = Notifier(name, notify or NotifySettings(), self._to_terminal, self._run_detached)
        self.start_rooms = list(dict.fromkeys(rooms or ["general"]))
        self.client: Client | None = None
        self.buffers: dict[str, Buffer] = {}
        self.current = ""
        self.state, self.state_since, self.state_detail = "connecting", time.time(), ""
        self.fatal = ""  # set when the app gave up (the name is taken); talk prints it
        self.fatal_code = ""
        self.sendq: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue(MAX_QUEUED)
        self.sending = 0
        self._online = asyncio.Event()
        self._fetching: set[str] = set()
        self._closing = False
        self._asking: PasteConfirm | None = None  # a long paste waiting for yes or no
        self._held: list[str] = []  # lines typed while it waits, run after the answer
        self._batch = False  # taking the lines of a paste: refresh the screen once, after
        self._log_handler = _ToLog(self)
        for room in self.start_rooms:
            self._buffer(room)
        self.current = self.start_rooms[0]

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="side"):
                yield Static("Windows", classes="heading")
                yield RoomList(id="rooms")
                yield Static("Members", classes="heading")
                with VerticalScroll(id="members-box"):
                    yield MemberList(id="members")
            with Vertical(id="main"):
                yield Static(id="topic")
                yield MessageLog(id="log")
                yield StatusBar(id="status")
                yield ChatInput(placeholder="Type a message, or /help", id="input")

    @property
    def log_view(self) -> MessageLog:
        return self.query_one("#log", MessageLog)

    @property
    def input(self) -> ChatInput:
        return self.query_one("#input", ChatInput)

    def on_mount(self) -> None:
        zlog = logging.getLogger("zchat")
        zlog.addHandler(self._log_handler)
        self._old_propagate, zlog.propagate = zlog.propagate, False
        self.input.on_line = self.take_line
        self.input.on_paste_lines = self.take_paste
        self.input.on_leave = self._leave
        self.input.last_own = self._last_own_text
        self.input.focus()
        self._redraw()
        self.set_interval(1.0, self._refresh_status)
        if self.cursor_file is not None:
            self.set_interval(SAVE_EVERY, self.save_cursors)
        self.run_worker(self._run_client(), name="client", group="client")
        self.run_worker(self._sender(), name="sender", group="client")

    async def on_unmount(self) -> None:
        self._closing = True
        zlog = logging.getLogger("zchat")
        zlog.removeHandler(self._log_handler)
        zlog.propagate = self._old_propagate
        await self._close_client()

    # ------------------------------------------------------------ state shown

    def _buffer(self, key: str) -> Buffer:
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = Buffer(key, self.me)
            buf.since = self._away.get(key)
            self._order()
        return buf

    def _note_away(self, heads: dict[str, int]) -> None:
        """From the broker's heads on return: the windows with lines said while away,
        so each can put its "new since you left" line above the first of them."""
        for key, (epoch, last) in self.left_at.items():
            head = heads.get(key, 0)
            if head > last:
                self._away[key] = (epoch, last, head)
                if key in self.buffers:
                    self.buffers[key].since = self._away[key]

    def _to_terminal(self, text: str) -> None:
        """Bytes for the terminal itself (the bell, an OSC notification), past the screen."""
        if not self.is_headless and self._driver is not None:
            self._driver.write(text)
            self._driver.flush()

    def _run_detached(self, argv: list[str]) -> None:
        """Start ``argv`` (notify-send) without waiting on it; it is reaped, and killed
        if it hangs, in a worker."""

        async def run() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )
            except OSError as exc:
                log.debug("could not run %s: %s", argv[0], exc)
                return
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

        self.run_worker(run(), group="notify")

    def save_cursors(self) -> None:
        """Write the read positions (atomically: cursors.py), if there is anything to write."""
        client = self.client
        if self.cursor_file is None or client is None:
            return
        try:
            self.cursor_file.save(client.cursors())
        except OSError as exc:
            log.warning("could not save read positions to %s: %s", self.cursor_file.path, exc)

    def _order(self) -> None:
        """Rooms first (in the order joined), then conversations."""
        rooms = {k: b for k, b in self.buffers.items() if not b.is_dm}
        dms = {k: b for k, b in self.buffers.items() if b.is_dm}
        self.buffers = {**rooms, **dms}

    @property
    def buffer(self) -> Buffer | None:
        return self.buffers.get(self.current)

    def note(self, text: str, style: str = "info", key: str | None = None) -> None:
        """A line of our own in window ``key`` (the current one by default)."""
        buf = self.buffers.get(key or self.current) or self.buffer
        if buf is None:
            self.notify(text, severity="error" if style == "error" else "information")
            return
        entry = buf.note(text, style)
        if buf is self.buffer and self._screen_up():
            self.log_view.append(entry)

    def error(self, text: str, key: str | None = None) -> None:
        self.note(text, "error", key)

    def _redraw(self) -> None:
        """The whole screen for the current window (after a switch or a bigger change)."""
        buf = self.buffer
        if buf is not None:
            buf.seen()
        if self._screen_up():
            self.log_view.show(buf)
        self._refresh_side()

    def _screen_up(self) -> bool:
        """Whether the widgets are there (not before mount, not while shutting down)."""
        return self.is_mounted and not self._closing and bool(self.screen_stack) and bool(self.query("#status"))

    def _refresh_side(self) -> None:
        if not self._screen_up():
            return
        buf = self.buffer
        self.query_one("#rooms", RoomList).show(self.buffers.values(), self.current)
        self.query_one("#members", MemberList).show(buf)
        topic = self.query_one("#topic", Static)
        if buf is None:
            topic.update("no window: /join ROOM or /msg NAME")
        elif buf.is_dm:
            topic.update(f"{buf.title} · direct conversation with {buf.peer}")
        else:
            online = sum(1 for on in buf.members.values() if on)
            topic.update(f"{buf.title} · {c.counted(len(buf.members), 'member')}, {online} online")
        names = set()
        for b in self.buffers.values():
            names.update(b.members)
            if b.peer:
                names.add(b.peer)
        names.discard(self.me)
        current = [n for n in sorted(buf.members) if n != self.me] if buf else []
        self.input.nicks = current + sorted(names - set(current))
        self.input.rooms = [k for k, b in self.buffers.items() if not b.is_dm]
        self._refresh_status()

    def _refresh_status(self) -> None:
        if not self._screen_up():
            return
        buf = self.buffer
        recovered = self.client.recovered if self.client is not None else 0
        self.query_one("#status", StatusBar).show(
            self.client.broker if self.client is not None else self.broker, self.state, self.state_since, self.me, buf.title if buf else "",
            recovered, self.sendq.qsize() + self.sending, self.state_detail,
        )

    def _set_state(self, state: str, since: float, detail: str = "") -> None:
        if state == self.state:
            return
        first = self.state == "connecting" and state == "connected"
        self.state, self.state_since, self.state_detail = state, since, detail
        if first:  # the usual start: the status line says it, the log need not
            self._refresh_status()
            return
        text = {
            "connected": f"connected to {self.broker}",
            "reconnecting": f"lost the broker{' (' + detail + ')' if detail else ''}; reconnecting, your lines are queued",
            "offline": f"cannot reach {self.broker}{': ' + detail if detail else ''}; retrying",
            "closed": "disconnected",
        }.get(state, state)
        self.note(text, "state")
        self._refresh_status()

    # ------------------------------------------------------------ connection

    async def _run_client(self) -> None:
        delay = 0.5
        while True:
            client = Client(
                self.broker, self.me, self.secret, label="zchat-talk", cursors=self.left_at, recover_limit=self.recover_limit,
            )
            try:
                await client.connect(timeout=self.connect_timeout)
                break
            except AuthError as exc:
                self.fatal, self.fatal_code = exc.message, "refused"
                self.exit()
                return
            except ConnectError:
                self._set_state("offline", self.state_since if self.state == "offline" else time.time(), "no answer")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.client = client
        self._set_state("connected", client.state_since)
        reader = asyncio.ensure_future(self._read_events(client))
        try:
            welcome = client.welcome
            known = dict(welcome.rooms) if welcome is not None else {}
            self._note_away(known)
            rooms = self.start_rooms + sorted(r for r in known if not p.is_dm_room(r) and r not in self.start_rooms)
            for room in rooms:
                try:
                    await self._join(room, retry=True)
                except ClientError as exc:
                    self.error(f"could not join #{room}: {exc.message} [{exc.code}]", room)
                except asyncio.TimeoutError:
                    self.error(f"#{room}: the broker did not send its history in time; switch to it again to retry", room)
            for room in sorted(r for r in known if p.is_dm_room(r)):
                self._buffer(room)
            self._online.set()
            self._refresh_side()
            if self.buffer is not None and not self.buffer.loaded:
                self._spawn(self._load_recent(self.buffer))
            await reader
        except Exception as exc:  # a bug here must not take the screen down with a traceback
            log.debug("client set-up failed", exc_info=True)
            self.error(f"client set-up failed: {exc!r}")
            self._online.set()
        finally:
            reader.cancel()

    async def _close_client(self) -> None:
        self.save_cursors()
        client, self.client = self.client, None
        self._online.clear()
        if client is not None:
            # bounded: if the client's close never finishes, leaving must still work
            closing = asyncio.ensure_future(client.close())
            await asyncio.wait({closing}, timeout=3.0)
            if closing.done() and not closing.cancelled() and closing.exception() is not None:
                log.debug("closing the client failed: %r", closing.exception())

    async def _read_events(self, client: Client) -> None:
        async for chunk in client.batches():
            # lines filled from history (a catch-up after being away, a gap) come with a
            # Recovered: shown, but not rung for
            replay = any(isinstance(event, Recovered) for event in chunk)
            for event in chunk:
                try:
                    self._on_event(event, replay)
                except Exception as exc:  # a bug must not kill the reader
                    log.debug("event handling failed", exc_info=True)
                    self.error(f"could not show an event: {exc!r}")

    def _on_event(self, event: Any, replay: bool = False) -> None:
        if isinstance(event, p.Msg):
            self._on_msg(event, replay)
        elif isinstance(event, p.Presence):
            buf = self.buffers.get(event.room)
            if buf is not None and event.name != self.me:  # this client is the truth about me
                buf.members[event.name] = event.online
                if buf is self.buffer:
                    self._refresh_side()
        elif isinstance(event, StateChange):
            self._set_state(event.state, event.since, event.detail)
            if event.state == "connected":
                self._spawn(self._refresh_members())
        elif isinstance(event, Recovered):
            s = "" if event.count == 1 else "s"
            self.note(f"{event.count} message{s} recovered from history", "state", key=event.room)
            self._refresh_status()
        elif isinstance(event, Gap):
            self._on_gap(event)
        elif isinstance(event, Problem):  # names no line and no request: say it where the user is
            self.error(f"broker: {event.message} ({event.code})")

    def _on_gap(self, gap: Gap) -> None:
        """Messages the client library could not recover: one line where they would be."""
        if gap.room not in self.buffers and not p.is_dm_room(gap.room):
            log.debug("gap in %s, a room no longer shown: %s", gap.room, gap)
            return
        buf = self._buffer(gap.room)
        reason = gap.reason
        if reason == "beyond the recovery limit":
            reason = f"more than {self.recover_limit} since you left; PageUp at the top loads them"
        index = buf.gap(gap.first, gap.last, reason)
        if buf is not self.buffer:
            self._refresh_side()
        elif self._screen_up():
            if index == len(buf.entries) - 1:
                self.log_view.append(buf.entries[index])
            else:
                self.log_view.show(buf, keep_bottom=False)

    def _on_msg(self, msg: p.Msg, replay: bool = False) -> None:
        if msg.kind == "invite" and msg.to == self.me and msg.room not in self.buffers:
            self.note(f"{msg.sender} invited you to #{msg.room}: /join {msg.room}", "state")
            return
        if msg.room not in self.buffers and not p.is_dm_room(msg.room):
            return  # a room we just left
        buf = self._buffer(msg.room)
        buf.live(msg)  # even if a history page showed it already: members follow live order
        epoch, marked = buf.epoch, buf.marked
        index = buf.add(msg)
        if index is not None and not replay:
            self.notifier.on_msg(msg)
        if epoch and buf.epoch != epoch and buf is self.buffer:
            self._redraw()  # the broker's history was reset: the window starts afresh
            return
        if buf.trimmed and buf is self.buffer and self._screen_up():
            buf.trimmed = False
            self.log_view.show(buf, keep_bottom=False)  # the oldest lines went out of the window (MAX_ENTRIES)
            return
        if buf.marked != marked and buf is self.buffer and self._screen_up():
            self.log_view.show(buf, keep_bottom=False)  # the "new since you left" line went in above
            return
        if index is None:
            if buf is self.buffer and msg.kind in ("join", "part"):
                self._refresh_side()
            elif buf is self.buffer and msg.kind == "edit" and self._screen_up():
                self.log_view.show(buf, keep_bottom=False)  # a line above took its new text
            return
        if msg.kind in ("kick", "ban") and msg.to == self.me:
            self.note(f"{render.action(msg)}: you are out of #{msg.room}", "error", key=msg.room)
        if msg.kind in ("delete", "kick", "ban", "topic") and buf is self.buffer:
            self._redraw()  # a line went, a member went, the title changed
            return
        if buf is self.buffer:
            if not self._screen_up():
                return
            if index == len(buf.entries) - 1:
                self.log_view.append(buf.entries[index])
            else:
                self.log_view.show(buf, keep_bottom=False)
            if msg.kind in ("join", "part"):
                self._refresh_side()
        else:
            buf.count_unread(msg)
            self._refresh_side()

    async def _refresh_members(self) -> None:
        client = self.client
        if client is None:
            return
        for buf in list(self.buffers.values()):
            if buf.is_dm:
                continue
            try:
                members = await client.who(buf.key)
            except (ClientError, asyncio.TimeoutError):
                continue
            buf.members = {m.name: m.online for m in members}
        self._refresh_side()

    # ------------------------------------------------------------ sending

    async def _sender(self) -> None:
        """Send queued lines one at a time, in the order typed; waits while offline."""
        while True:
            key, text, me = await self.sendq.get()
            self.sending = 1
            try:
                await self._online.wait()
                client = self.client
                assert client is not None
                await self._send_one(client, key, text, me)
            except ClientError as exc:
                self._send_failed(key, text, exc)
            except Exception as exc:
                self.error(f"not sent: {exc!r}", key)
            finally:
                self.sending = 0
                self._refresh_status()

    async def _send_one(self, client: Client, key: str, text: str, me: bool) -> None:
        """Send one line; a line refused as too fast (a long paste past the broker's
        burst) waits and goes again, so it is neither dropped nor overtaken."""
        for attempt in range(RATE_RETRIES):
            buf = self.buffers.get(key)
            try:
                if buf is not None and buf.is_dm:
                    await client.send_dm(buf.peer, text, me=me)
                elif buf is not None:
                    await client.send(key, text, me=me)
                else:
                    self.error(f"not sent (that window is closed): {text}")
                return
            except ClientError as exc:
                if exc.code != p.ErrorCode.RATE_LIMITED or attempt + 1 == RATE_RETRIES:
                    raise
                wait = getattr(exc, "retry_after", 0.0) or min(2.0, 0.1 * (attempt + 1))
                await asyncio.sleep(wait)

    def _send_failed(self, key: str, text: str, exc: ClientError) -> None:
        buf = self.buffers.get(key)
        message = f"not sent: {exc.message} [{exc.code}]"
        if buf is not None and buf.is_dm and exc.code in (p.ErrorCode.UNKNOWN_USER, p.ErrorCode.BAD_NAME) and not buf.seqs:
            del self.buffers[key]  # no such person: do not keep an empty conversation open
            if self.current == key:
                self.current = next(iter(self.buffers), "")
                self._redraw()
            key = self.current
        if not self.input.value:
            self.input.value = text
            self.input.cursor_position = len(text)
            message += " (text kept in the input line)"
        self.error(message, key)

    def _queue(self, key: str, text: str, me: bool = False) -> None:
        try:
            self.sendq.put_nowait((key, text, me))
        except asyncio.QueueFull:
            self.error(f"not sent: {MAX_QUEUED} lines are already waiting to be sent: {text}", key)
            return
        if not self._batch:
            self._refresh_status()

    # ------------------------------------------------------------ input

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Only when the input line has no ``on_line`` (it calls take_line directly)."""
        event.stop()
        self.take_line(event.value)

    def take_line(self, line: str) -> None:
        """One finished line, as typed (the input line is already empty): run or send it.

        Called by the input line the moment Enter is handled, so lines keep the order
        they were typed in, also relative to window switches."""
        if self._asking is not None:
            if len(self._held) >= MAX_HELD:
                self.error(f"not sent (a paste is waiting for yes or no): {line}")
                return
            self._held.append(line)  # after the paste it was typed after
            return
        self.input.remember(line)
        try:
            action = c.parse(line)
        except c.CommandError as exc:
            self.error(str(exc))
            return
        if action is not None:
            self.run_action_for(action)

    def take_paste(self, lines: list[str], before: str) -> None:
        """A multi-line paste: each line as if typed and sent; more than PASTE_ASK_LINES
        ask first (weechat's paste_max_lines). ``before`` is the input's text before the
        paste, put back if the user says no."""
        if self._asking is not None:  # a second paste while asking: it waits behind the first
            room = MAX_HELD - len(self._held)
            self._held.extend(lines[:room])
            if len(lines) > room:
                self.error(f"{len(lines) - room} pasted lines not sent: too many waiting for the paste prompt")
            return
        count = sum(1 for line in lines if line.strip())
        room = MAX_QUEUED - self.sendq.qsize()
        if count > room:
            self.error(f"paste of {count} lines not sent: at most {room} more lines can wait to be sent")
            if not self.input.value:
                self.input.value = before
                self.input.cursor_position = len(before)
            return
        if count <= PASTE_ASK_LINES:
            self._take_lines(lines)
            return
        where = self.buffer.title if self.buffer is not None else "nowhere"
        self._asking = PasteConfirm(count, where, [line for line in lines if line.strip()])

        def answered(send: bool | None) -> None:
            self._asking = None
            if send:
                self._take_lines(lines)
            else:
                self.note(f"paste of {count} lines cancelled (nothing sent)")
                if not self.input.value:
                    self.input.value = before
                    self.input.cursor_position = len(before)
            held, self._held = self._held, []
            for line in held:
                self.take_line(line)
            self.input.focus()

        self.push_screen(self._asking, answered)

    def _take_lines(self, lines: list[str]) -> None:
        self._batch = True
        try:
            for line in lines:
                self.take_line(line)
        finally:
            self._batch = False
        self._refresh_status()

    def action_leave(self) -> None:
        """Ctrl-Q: quit after the keys typed before it (they may finish a line to send)."""
        if self._screen_up():
            self.input.post_message(ChatInput.Leave())
        else:
            self._leave()

    def _leave(self) -> None:
        self.run_worker(self.action_quit(), group="quit")

    def run_action_for(self, action: c.Action) -> None:
        """Do what a parsed line asks: locally at once, or in a worker if the broker is needed."""
        if isinstance(action, c.Say):
            if self.buffer is None:
                self.error("no window to send to: /join ROOM or /msg NAME first")
            else:
                self._queue(self.current, action.text, action.me)
        elif isinstance(action, c.Msg):
            key = self._open_dm(action.to)
            if action.text is not None:
                self._queue(key, action.text)
        elif isinstance(action, c.Switch):
            self._switch_to(action.target)
        elif isinstance(action, c.Clear):
            if self.buffer is not None:
                self.buffer.clear()
                self._redraw()
        elif isinstance(action, c.Help):
            try:
                for text in c.help_lines(action.command):
                    self.note(text)
            except c.CommandError as exc:
                self.error(str(exc))
        elif isinstance(action, c.Quit):
            self.run_worker(self.action_quit(), group="quit")
        elif isinstance(action, c.Join):
            self._spawn(self._join(action.room, switch=True, private=action.private))
        elif isinstance(action, c.Moderate):
            self._moderate(action)
        elif isinstance(action, c.Part):
            self._spawn(self._part(action.room))
        elif isinstance(action, c.Who):
            self._spawn(self._who(action.room))
        elif isinstance(action, c.Rooms):
            self._spawn(self._rooms())
        elif isinstance(action, c.Search):
            self._spawn(self._search(action.text))
        elif isinstance(action, c.Edit):
            self._edit_last(action.text)
        elif isinstance(action, c.History):
            if self.buffer is not None:
                self._spawn(self._older(self.buffer, action.count, announce=True))

    def _spawn(self, work: Awaitable[Any], key: str | None = None) -> None:
        """Run broker work in a worker; any failure becomes one line in window ``key``."""
        where = key or self.current

        async def guarded() -> None:
            try:
                await work
            except ClientError as exc:
                self.error(f"{exc.message} [{exc.code}]", where)
            except asyncio.TimeoutError:
                self.error("the broker did not answer in time (it may be restarting); try again", where)
            except Exception as exc:
                log.debug("command failed", exc_info=True)
                self.error(f"failed: {exc!r}", where)

        self.run_worker(guarded(), group="commands")

    def _client(self) -> Client:
        if self.client is None:
            raise ClientError("offline", f"not connected to {self.broker} yet; try again when the status line says connected")
        return self.client

    def _open_dm(self, to: str) -> str:
        key = p.dm_room(self.me, to)
        buf = self._buffer(key)
        self.current = key
        self._redraw()
        if not buf.loaded and self.client is not None:
            self._spawn(self._load_recent(buf))
        return key

    def _switch_to(self, target: str) -> None:
        keys = list(self.buffers)
        if target.isdigit():
            index = int(target) - 1
            if index >= len(keys):
                self.error(f"no window {target}: there are {len(keys)}")
                return
            key = keys[index]
        elif target.startswith("@"):
            self._open_dm(target[1:])
            return
        elif target in self.buffers:
            key = target
        else:
            self.error(f"not in #{target}: /join {target} first")
            return
        self.show_window(key)

    def show_window(self, key: str) -> None:
        if key not in self.buffers:
            return
        self.current = key
        self._redraw()
        buf = self.buffers[key]
        if not buf.loaded and self.client is not None:
            self._spawn(self._load_recent(buf))
        self.input.focus()

    def action_cycle(self, step: int) -> None:
        keys = list(self.buffers)
        if not keys:
            return
        index = keys.index(self.current) if self.current in keys else 0
        self.show_window(keys[(index + step) % len(keys)])

    def action_page(self, step: int) -> None:
        view = self.log_view
        if step < 0:
            if view.scroll_y <= 0 and self.buffer is not None:
                self._spawn(self._older(self.buffer, OLDER_PAGE))
            else:
                view.scroll_page_up(animate=False)
        else:
            view.scroll_page_down(animate=False)

    def on_message_log_need_older(self, event: MessageLog.NeedOlder) -> None:
        if self.buffer is not None:
            self._spawn(self._older(self.buffer, OLDER_PAGE))

    def on_room_list_picked(self, event: RoomList.Picked) -> None:
        self.show_window(event.key)

    async def action_quit(self) -> None:
        """Leave: give queued lines a moment to reach the broker, say goodbye, exit."""
        if self.sendq.qsize() + self.sending and self.state == "connected":
            deadline = time.monotonic() + 3.0
            while self.sendq.qsize() + self.sending and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self._close_client()
        self.exit()

    # ------------------------------------------------------------ broker work

    def _moderate(self, action: c.Moderate) -> None:
        """An operator's action on the current room (the broker says forbidden to others)."""
        buf = self.buffer
        if buf is None or buf.is_dm:
            self.error(f"/{action.action} works in a room: switch to one first")
            return
        room = buf.key
        if action.action == "topic" and action.text is None:
            self.note(f"topic of #{room}: {buf.topic}" if buf.topic else f"#{room} has no topic")
            return
        client = self.client
        if client is None:
            self.error(f"not connected to {self.broker} yet; try again when the status line says connected")
            return
        if action.action == "topic":
            work = client.set_topic(room, action.text or "")
        elif action.action in ("kick", "ban"):
            work = getattr(client, action.action)(room, action.name, action.text or "")
        else:
            work = getattr(client, action.action)(room, action.name)
        self._spawn(work, room)

    async def _join(self, room: str, switch: bool = False, retry: bool = False, private: bool = False) -> None:
        while True:
            try:
                client = self.client
                if client is None:
                    raise ClientError("offline", f"not connected to {self.broker} yet")
                members = await client.join(room, private=private)
                break
            except asyncio.TimeoutError:
                if not retry:
                    raise
                await asyncio.sleep(1.0)
        buf = self._buffer(room)
        buf.members = {m.name: m.online for m in members}
        joined = client.joined_info.get(room)
        if joined is not None and joined.topic:
            buf.topic = joined.topic
        if private:
            self.note(f"created private #{room}: /invite NAME lets people in", key=room)
        if switch:
            self.current = room
            self._redraw()
        else:
            self._refresh_side()
        if not buf.loaded:
            await self._load_recent(buf)

    async def _load_recent(self, buf: Buffer) -> None:
        """The last ``history`` messages of a window, once."""
        if buf.loaded or buf.key in self._fetching:
            return
        client = self._client()
        self._fetching.add(buf.key)
        try:
            if buf.is_dm:
                try:
                    members = await client.who(buf.key)
                    buf.members = {m.name: m.online for m in members} | {self.me: True}
                except ClientError as exc:
                    if exc.code != p.ErrorCode.UNKNOWN_ROOM:
                        raise
                    buf.complete = True  # a new conversation: nothing to fetch
                    buf.loaded = True
                    return
            msgs = await client.history(buf.key, limit=self.history) if self.history > 0 else []
            buf.loaded = True
            for msg in msgs:
                buf.add(msg)
            if not msgs or msgs[0].seq <= 1:
                buf.complete = True
        finally:
            self._fetching.discard(buf.key)
        if buf is self.buffer:
            self._redraw()
        else:
            self._refresh_side()

    async def _older(self, buf: Buffer, count: int, announce: bool = False) -> None:
        """Load up to ``count`` messages before the oldest shown (scrollback, /history N)."""
        if buf.key in self._fetching:
            return
        before = buf.oldest or (buf.cleared_below + 1 if buf.cleared_below else 0)
        if buf.complete or before == 1:
            buf.complete = True
            if announce:
                self.note("no earlier messages", key=buf.key)
            return
        client = self._client()
        self._fetching.add(buf.key)
        try:
            try:
                msgs = await client.history(buf.key, limit=count, before=before)
            except ClientError as exc:
                if exc.code != p.ErrorCode.UNKNOWN_ROOM:
                    raise
                msgs = []
        finally:
            self._fetching.discard(buf.key)
        added = sum(1 for m in msgs if buf.add(m) is not None)
        if len(msgs) < count or (msgs and msgs[0].seq <= 1):
            buf.complete = True
        if buf is self.buffer and self._screen_up():
            self.log_view.show(buf, keep_bottom=False)
            if announce:
                self.log_view.scroll_home(animate=False)
        if announce:
            self.note(f"loaded {added} earlier message{'s' if added != 1 else ''}" + (" (the beginning)" if buf.complete else ""), key=buf.key)

    def _last_own_text(self) -> str | None:
        buf = self.buffer
        line = buf.last_own() if buf is not None else None
        return line.text if line is not None else None

    def _edit_last(self, text: str | None) -> None:
        """``/edit TEXT`` (or Up on an empty input, then Enter) and ``/delete``: our last
        line in this window; every client shows the change when the broker sends it."""
        buf = self.buffer
        line = buf.last_own() if buf is not None else None
        if buf is None or line is None:
            self.error(f"nothing of yours to {'edit' if text is not None else 'delete'} in this window")
            return
        client = self.client
        if client is None:
            self.error(f"not connected to {self.broker} yet; try again when the status line says connected")
            return
        if text is None:
            self._spawn(client.delete_own(buf.key, line.seq), buf.key)
        elif text != line.text:
            self._spawn(client.edit(buf.key, line.seq, text), buf.key)

    async def _search(self, text: str) -> None:
        """``/search``: the results in a list; the one picked is shown in its window."""
        hits, more = await self._client().search(text, limit=SEARCH_LIMIT)
        if not hits:
            self.note(f"nothing found for {text!r}")
            return

        def picked(hit: p.Msg | None) -> None:
            self.input.focus()
            if hit is not None:
                self._spawn(self.jump_to(hit), hit.room)

        self.push_screen(SearchResults(text, hits, bool(more), self.me), picked)

    async def jump_to(self, hit: p.Msg) -> None:
        """Show line ``hit`` in its window (joining its room if need be), with the lines
        around it loaded from history, highlighted in the middle of the view."""
        key = hit.room
        if key not in self.buffers and not p.is_dm_room(key):
            await self._join(key)
        buf = self._buffer(key)
        await self._load_recent(buf)
        if hit.seq not in buf.seqs:
            await self._around(buf, hit.seq)
        buf.focus = hit.seq
        self.current = key
        self._redraw()
        if self._screen_up():
            self.log_view.scroll_to_seq(hit.seq)

    async def _around(self, buf: Buffer, seq: int) -> None:
        """Load the lines around ``seq``: up to the oldest shown if that is near enough
        (so the window stays whole), else AROUND either side and a line for the rest."""
        client = self._client()
        oldest = buf.oldest
        after = max(0, seq - AROUND - 1)
        if seq < oldest and oldest - after - 1 <= p.MAX_HISTORY:
            msgs = await client.history(buf.key, limit=oldest - after - 1, after=after, before=oldest)
        else:
            msgs = await client.history(buf.key, limit=2 * AROUND + 1, after=after)
        for msg in msgs:
            buf.add(msg)
        if msgs and oldest > msgs[-1].seq + 1:
            buf.gap(msgs[-1].seq + 1, oldest - 1, "not loaded: the search jumped past them")

    async def _part(self, room: str | None) -> None:
        key = room or self.current
        buf = self.buffers.get(key)
        if buf is not None and buf.is_dm:
            self._close_window(key)  # a conversation cannot be left, only closed
            return
        if not key:
            raise ClientError("usage", "no room to leave")
        await self._client().part(key)
        self._close_window(key)
        self.note(f"left #{key}")

    def _close_window(self, key: str) -> None:
        keys = list(self.buffers)
        if key not in self.buffers:
            return
        index = keys.index(key)
        del self.buffers[key]
        if self.current == key:
            rest = list(self.buffers)
            self.current = rest[min(index, len(rest) - 1)] if rest else ""
        self._redraw()

    async def _who(self, room: str | None) -> None:
        key = room or self.current
        if not key:
            raise ClientError("usage", "/who needs a room here")
        try:
            members = await self._client().who(key)
        except ClientError as exc:
            if exc.code == p.ErrorCode.UNKNOWN_ROOM and p.is_dm_room(key):
                self.note("nothing said in this conversation yet")
                return
            raise
        buf = self.buffers.get(key)
        if buf is not None:
            buf.members = {m.name: m.online for m in members}
            self._refresh_side()
        online = [m.name for m in members if m.online]
        offline = [m.name for m in members if not m.online]
        title = buf.title if buf is not None else f"#{key}"
        self.note(f"{title}: {c.counted(len(members), 'member')}; online: {', '.join(online) or 'nobody'}"
                  + (f"; offline: {', '.join(offline)}" if offline else ""))

    async def _rooms(self) -> None:
        rooms = await self._client().rooms()
        if not rooms:
            self.note("no rooms yet: /join ROOM makes one")
        for info in rooms:
            mark = " (joined)" if info.name in self.buffers else ""
            self.note(f"#{info.name}: {c.counted(info.members, 'member')}, {info.online} online{mark}")

