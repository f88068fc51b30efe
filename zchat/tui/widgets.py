"""The pieces of the chat screen and the per-conversation state they show.

``Buffer`` is one window: a room or a direct conversation, with its lines (messages
in seq order plus local notes), unread count, mention mark and members. The widgets
only draw buffers: ``MessageLog`` the lines, ``RoomList`` the windows, ``MemberList``
the members, ``StatusBar`` the connection; ``ChatInput`` adds Tab completion and
Up/Down recall to Textual's Input.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
import re
import time
import zlib
from typing import Callable, Iterable

import msgspec
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, RichLog, Static

from zchat import protocol as p
from zchat import render
from zchat.tui.commands import Completer, InputHistory, split_lines

#: Nick colours: readable on dark and light backgrounds; a name always gets the same one.
PALETTE = (
    "#e06c75", "#98c379", "#e5c07b", "#61afef", "#c678dd", "#56b6c2", "#d19a66", "#f0a6ca",
    "#7ec699", "#ff9e64", "#9ece6a", "#7aa2f7", "#bb9af7", "#8abeb7", "#b294bb", "#e0af68",
)
NICK_WIDTH = 12
#: The "new since you left" line sorts after every entry of its seq, before the next seq.
_AFTER_SEQ = 2**62
NEW_SINCE = "── new since you left ──"
#: Edits kept for lines not in a window yet (a history page may bring them later).
MAX_PENDING_EDITS = 1000
#: Lines a window keeps (scrollback, like irssi's scrollback_lines): past it, live lines
#: push the oldest out, TRIM_TO kept; scrolling up fetches them again from history.
MAX_ENTRIES = 5000
TRIM_TO = 4000
EDITABLE = ("text", "me")


def nick_colour(name: str) -> str:
    """A stable colour for ``name`` (crc32, not hash(): the same in every process)."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def mentions(name: str, text: str) -> bool:
    """Whether ``text`` names ``name`` as a word (``carol``, ``@carol``, ``Carol:``)."""
    return re.search(rf"(?<![a-z0-9_-]){re.escape(name)}(?![a-z0-9_-])", text.lower()) is not None


# ------------------------------------------------------------------ model


@dataclasses.dataclass
class Note:
    """A line of our own (an error, command output, a connection change), not a message."""

    text: str
    ts: float
    style: str = "info"  # info, error, state, gap


@dataclasses.dataclass(order=True)
class Entry:
    key: tuple[int, int]
    item: p.Msg | Note = dataclasses.field(compare=False)


class Buffer:
    """One window: a room (``key`` = room name) or a conversation (``key`` = ``@a:b``)."""

    def __init__(self, key: str, me: str) -> None:
        self.key = key
        self.me = me
        peers = p.dm_peers(key)
        self.is_dm = peers is not None
        self.peer = (peers[1] if peers[0] == me else peers[0]) if peers else ""
        self.title = f"@{self.peer}" if self.is_dm else f"#{key}"
        self.entries: list[Entry] = []
        self.seqs: set[int] = set()
        self.unread = 0
        self.mentioned = False
        self.members: dict[str, bool] = {me: True, self.peer: False} if self.is_dm else {}
        self.loaded = False  # its recent history was fetched once
        self.complete = False  # nothing older to fetch
        self.cleared_below = 0  # /clear: the newest seq when the window was cleared
        self.epoch = ""  # the broker history's epoch the seqs belong to
        self.topic = ""  # the room's topic, as its operators set it
        #: Where talk left off in an earlier run: (epoch, last seq shown, head at start).
        #: Lines seq with last < seq <= head were said while away: the marker goes above them.
        self.since: tuple[str, int, int] | None = None
        self.marked = False  # the "new since you left" line is in entries
        self.focus = 0  # the seq a search jumped to: drawn highlighted
        self._edits: OrderedDict[int, p.Msg] = OrderedDict()  # seq -> its latest edit line, line not shown yet
        self._notes = 0
        self.trimmed = False  # old lines went out since the window was last drawn: draw it afresh

    @property
    def oldest(self) -> int:
        """The lowest seq shown (0 when none)."""
        for entry in self.entries:
            if isinstance(entry.item, p.Msg):
                return entry.item.seq
        return 0

    @property
    def newest(self) -> int:
        return max(self.seqs, default=self.cleared_below)

    def add(self, msg: p.Msg) -> int | None:
        """Insert ``msg`` in seq order; its index, or None if already there.

        Seqs count within an epoch: a message of a new epoch (the broker's history was
        replaced) starts the window afresh, since its seqs start again from 1."""
        if msg.epoch and msg.epoch != self.epoch:
            if self.epoch:
                self.entries.clear()
                self.seqs.clear()
                self.complete = False
                self.cleared_below = 0
                self.epoch = msg.epoch
                self.note("the broker's history was reset: earlier lines are gone", "error", ts=msg.ts)
            self.epoch = msg.epoch
        if msg.seq in self.seqs:
            return None
        self.seqs.add(msg.seq)
        if msg.kind == "deleted":
            return None  # a tombstone: the line is hidden
        if msg.kind == "edit":
            self._edit(msg)
            return None  # the edit line changes its line; it is not one of its own
        edit = self._edits.pop(msg.seq, None)
        if edit is not None and msg.kind in EDITABLE and edit.seq > msg.edited:
            msg = msgspec.structs.replace(msg, text=edit.text, edited=edit.seq)
        hidden = render.deleted_seq(msg)
        if hidden:
            self.hide(hidden)
        elif msg.kind == "topic":
            self.topic = msg.text
        entry = Entry((msg.seq, 0), msg)
        index = bisect.bisect(self.entries, entry)
        self.entries.insert(index, entry)
        index += self._mark_new(msg)
        if len(self.entries) > MAX_ENTRIES and index == len(self.entries) - 1:  # a live line at the bottom
            index -= self._trim()
        return index

    def _trim(self) -> int:
        """Keep the newest TRIM_TO entries; how many went. Their seqs go too (what is
        older than the window is history again, fetched when scrolled up)."""
        gone = len(self.entries) - TRIM_TO
        del self.entries[:gone]
        oldest = self.oldest
        self.seqs = {seq for seq in self.seqs if seq >= oldest}
        self.complete = False
        self.trimmed = True
        return gone

    def _mark_new(self, msg: p.Msg) -> bool:
        """Put the "new since you left" line above the first line said while away
        (it sorts before ``msg``); whether it was put there now."""
        if self.since is None or self.marked:
            return False
        epoch, last, head = self.since
        if not last < msg.seq <= head or (msg.epoch and epoch and msg.epoch != epoch):
            return False
        self.marked = True
        bisect.insort(self.entries, Entry((last, _AFTER_SEQ), Note(NEW_SINCE, msg.ts, "new")))
        return True

    def _edit(self, edit: p.Msg) -> None:
        """An edit line: its line takes the new text (if this edit is newer than the text
        shown), now or when the line arrives."""
        for entry in reversed(self.entries):
            item = entry.item
            if isinstance(item, p.Msg) and item.seq == edit.ref:
                if item.kind in EDITABLE and edit.seq > item.edited:
                    entry.item = msgspec.structs.replace(item, text=edit.text, edited=edit.seq)
                return
        if edit.ref in self.seqs:
            return  # deleted, or cleared from the window
        held = self._edits.get(edit.ref)
        if held is None or held.seq < edit.seq:
            self._edits[edit.ref] = edit
            if len(self._edits) > MAX_PENDING_EDITS:
                self._edits.popitem(last=False)

    def last_own(self) -> p.Msg | None:
        """Our newest text or /me line in this window (what /edit and /delete change)."""
        for entry in reversed(self.entries):
            item = entry.item
            if isinstance(item, p.Msg) and item.sender == self.me and item.kind in EDITABLE:
                return item
        return None

    def hide(self, seq: int) -> None:
        """A broker admin deleted line ``seq``: it goes from the window (and stays out)."""
        self.seqs.add(seq)
        self.entries = [e for e in self.entries if not (isinstance(e.item, p.Msg) and e.item.seq == seq)]

    def note(self, text: str, style: str = "info", ts: float | None = None) -> Entry:
        self._notes += 1
        entry = Entry((self.newest, self._notes), Note(text, time.time() if ts is None else ts, style))
        self.entries.append(entry)
        return entry

    def gap(self, first: int, last: int, reason: str) -> int:
        """A line where messages ``first..last`` would be (the client could not recover
        them); its index in ``entries``. If some of them are shown (a reset of the
        broker's history reports everything before it) the line goes last, where the
        break happened, not above lines that are there."""
        self._notes += 1
        count = last - first + 1
        text = f"— {count} message{'' if count == 1 else 's'} missing ({reason}) —"
        shown = any(first <= seq <= last for seq in self.seqs)
        entry = Entry((self.newest if shown else first - 1, self._notes), Note(text, time.time(), "gap"))
        index = bisect.bisect(self.entries, entry)
        self.entries.insert(index, entry)
        return index

    def clear(self) -> None:
        self.cleared_below = self.newest
        self.entries.clear()
        self.seqs.clear()

    def count_unread(self, msg: p.Msg) -> None:
        """A live message arrived while this window is not shown."""
        if msg.sender == self.me or msg.kind not in ("text", "me"):
            return
        self.unread += 1
        if self.is_dm or mentions(self.me, msg.text):
            self.mentioned = True

    def seen(self) -> None:
        self.unread = 0
        self.mentioned = False

    def live(self, msg: p.Msg) -> None:
        """Keep the member list in step with a live message."""
        if msg.kind == "join":
            self.members[msg.sender] = True
        elif msg.kind == "part":
            self.members.pop(msg.sender, None)
        elif msg.kind in ("kick", "ban"):
            self.members.pop(msg.to, None)
        elif msg.kind in render.ACTIONS:
            return
        elif msg.sender not in self.members or not self.is_dm:
            self.members[msg.sender] = True


# ------------------------------------------------------------------ rendering


def _clock(ts: float) -> str:
    return time.strftime("%H:%M", time.localtime(ts))


def _nick_cell(text: str, style: str) -> Text:
    if len(text) > NICK_WIDTH:
        text = text[: NICK_WIDTH - 1] + "…"
    return Text(text, style=style, justify="right")


def render_entry(entry: Entry, me: str, focus: int = 0) -> RenderableType:
    """One line of the log: time, nick column, text (wrapped under the text column);
    the line of seq ``focus`` (a search result gone to) highlighted."""
    item = entry.item
    grid = Table.grid(padding=(0, 1), expand=True)
    if focus and isinstance(item, p.Msg) and item.seq == focus:
        grid.style = "on #264f78"
    grid.add_column(width=5, style="dim")
    grid.add_column(width=NICK_WIDTH, no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    if isinstance(item, Note):
        styles = {"error": ("!!", "bold red", "red"), "state": ("--", "bold yellow", "yellow"), "info": ("--", "dim", ""),
                  "gap": ("!!", "bold yellow", "bold yellow"), "new": ("", "", "bold cyan")}
        mark, mark_style, text_style = styles.get(item.style, styles["info"])
        grid.add_row(_clock(item.ts), _nick_cell(mark, mark_style), Text(item.text, style=text_style))
        return grid
    colour = nick_colour(item.sender)
    where = "" if p.is_dm_room(item.room) else f" #{item.room}"
    edited = (" (edited)", "dim") if item.edited else ""
    if item.kind == "me":
        body = Text.assemble((item.sender, f"bold {colour}"), " ", (item.text, "italic"), edited)
        grid.add_row(_clock(item.ts), _nick_cell("*", f"bold {colour}"), body)
    elif item.kind == "join":
        body = Text.assemble((item.sender, colour), (f" joined{where}", "green"))
        grid.add_row(_clock(item.ts), _nick_cell("-->", "bold green"), body)
    elif item.kind == "part":
        body = Text.assemble((item.sender, colour), (f" left{where}", "red"))
        grid.add_row(_clock(item.ts), _nick_cell("<--", "bold red"), body)
    elif item.kind in render.ACTIONS:
        grid.add_row(_clock(item.ts), _nick_cell("-!-", "bold magenta"), Text(render.action(item), style="magenta"))
    else:
        text = Text(item.text)
        if item.sender != me and mentions(me, item.text):
            text.stylize("bold reverse")
        if edited:
            text.append(*edited)
        grid.add_row(_clock(item.ts), _nick_cell(item.sender, f"bold {colour}"), text)
    return grid


def day_of(ts: float) -> str:
    return time.strftime("%a %d %b %Y", time.localtime(ts))


# ------------------------------------------------------------------ widgets


class MessageLog(RichLog):
    """The lines of one buffer; asks for older history when scrolled to the top."""

    class NeedOlder(Message):
        """The user scrolled to the top of what is loaded."""

    can_focus = False

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(wrap=True, min_width=20, auto_scroll=False, **kwargs)
        self.buffer: Buffer | None = None
        self._last_day = ""
        self.line_of: dict[int, int] = {}  # seq -> its first line in the log (to scroll to it)

    def show(self, buffer: Buffer | None, keep_bottom: bool = True) -> None:
        """Draw ``buffer`` from scratch (a switch, a resize, older lines above)."""
        self.buffer = buffer
        old_lines, old_y, at_end = len(self.lines), self.scroll_y, self.is_vertical_scroll_end
        self.clear()
        self._last_day = ""
        self.line_of = {}
        if buffer is None or not self._size_known:
            return
        for entry in buffer.entries:
            self._write(entry)
        if keep_bottom or at_end:
            self.scroll_end(animate=False, immediate=True)
        else:  # older lines were added above: keep the same lines in view
            self.scroll_to(y=old_y + len(self.lines) - old_lines, animate=False, immediate=True)

    def append(self, entry: Entry) -> None:
        at_end = self.is_vertical_scroll_end or self.max_scroll_y == 0
        self._write(entry)
        if at_end:
            self.scroll_end(animate=False, immediate=True)

    def _write(self, entry: Entry) -> None:
        day = day_of(entry.item.ts)
        if self._last_day and day != self._last_day:
            self.write(Text(f"─── {day} ───", style="dim", justify="center"), width=self._width(), scroll_end=False)
        self._last_day = day
        me, focus = (self.buffer.me, self.buffer.focus) if self.buffer else ("", 0)
        if isinstance(entry.item, p.Msg):
            self.line_of[entry.item.seq] = len(self.lines)
        self.write(render_entry(entry, me, focus), width=self._width(), scroll_end=False)

    def scroll_to_seq(self, seq: int) -> bool:
        """Bring line ``seq`` to the middle of the view; False if it is not drawn."""
        y = self.line_of.get(seq)
        if y is None:
            return False
        self.scroll_to(y=max(0, y - self.scrollable_content_region.height // 2), animate=False, immediate=True)
        return True

    def _width(self) -> int:
        return max(20, self.scrollable_content_region.width)

    def plain_lines(self) -> list[str]:
        """The text on screen, line by line (tests and the line-mode parity check)."""
        return [strip.text.rstrip() for strip in self.lines]

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self.show, self.buffer)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 < old_value:
            self.post_message(self.NeedOlder())


class RoomList(Static):
    """The windows, numbered: unread counts, ``!`` for a mention of your name or a DM."""

    plain = ""  # what is shown, as plain text

    class Picked(Message):
        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.keys: list[str] = []

    def show(self, buffers: Iterable[Buffer], current: str) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        self.keys = []
        for n, buf in enumerate(buffers, 1):
            self.keys.append(buf.key)
            if n > 1:
                text.append("\n")
            selected = buf.key == current
            style = "bold reverse" if selected else ("bold magenta" if buf.mentioned else ("bold" if buf.unread else ""))
            text.append(f"{n:>2} {buf.title}", style=style)
            if buf.unread:
                text.append(f" ({buf.unread}{'!' if buf.mentioned else ''})", style="bold magenta" if buf.mentioned else "bold cyan")
            elif buf.mentioned:
                text.append(" (!)", style="bold magenta")
        if text.plain == self.plain:  # the usual second: nothing changed, so no repaint (idle CPU)
            return
        self.plain = text.plain
        self.update(text)

    def on_click(self, event: events.Click) -> None:
        if 0 <= event.y < len(self.keys):
            self.post_message(self.Picked(self.keys[event.y]))


class MemberList(Static):
    plain = ""
    def show(self, buffer: Buffer | None) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        if buffer is not None:
            members = sorted(buffer.members.items(), key=lambda kv: (not kv[1], kv[0]))
            online = sum(1 for _, on in members if on)
            text.append(f"{online}/{len(members)} online\n", style="dim")
            for name, on in members:
                text.append("● " if on else "○ ", style="green" if on else "dim")
                text.append(name + "\n", style=f"bold {nick_colour(name)}" if on else "dim")
        if text.plain == self.plain:  # the usual second: nothing changed, so no repaint (idle CPU)
            return
        self.plain = text.plain
        self.update(text)


class StatusBar(Static):
    """broker │ connection state and for how long │ queued │ name │ window │ recovered."""

    plain = ""

    def show(self, broker: str, state: str, since: float, name: str, where: str, recovered: int, queued: int, detail: str = "") -> None:
        icons = {"connected": ("●", "green"), "reconnecting": ("⟳", "yellow"), "connecting": ("…", "yellow"),
                 "offline": ("✕", "red"), "closed": ("✕", "red")}
        icon, colour = icons.get(state, ("?", "red"))
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {broker} ", style="dim")
        text.append("│ ", style="dim")
        text.append(f"{icon} {state}", style=f"bold {colour}")
        if state != "connected":
            text.append(f" {_ago(time.time() - since)}", style=colour)
            if detail:
                text.append(f" ({detail})", style=colour)
        if queued:  # early in the line: it matters while the broker is away
            text.append(" │ ", style="dim")
            text.append(f"{queued} queued", style="bold yellow")
        text.append(" │ ", style="dim")
        text.append(name, style=f"bold {nick_colour(name)}")
        text.append(" │ ", style="dim")
        text.append(where or "-", style="bold")
        text.append(" │ ", style="dim")
        text.append(f"recovered {recovered}", style="cyan" if recovered else "dim")
        if text.plain == self.plain:  # the usual second: nothing changed, so no repaint (idle CPU)
            return
        self.plain = text.plain
        self.update(text)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ChatInput(Input):
    """The input line: Enter sends, Up/Down recall, Tab completes names and commands.

    Every key that does something here runs when the line reaches it, in the order
    typed: Textual runs a widget's key bindings only after the key has bubbled up to
    the app, by which time faster typing may already be in the line (Textual issue
    6605: "yes, 1.4 is out" + Enter + "/me celebrates" was sent as one merged line).
    A finished line goes to ``on_line`` at once, with the input already cleared.
    """

    #: A blinking cursor repaints the input twice a second, idle or not: most of an idle
    #: talk's CPU. A steady cursor shows where typing goes just as well.
    cursor_blink = reactive(False, init=False)

    BINDINGS = [
        Binding("tab", "complete", "Complete", show=False),
        Binding("up", "recall(-1)", "Earlier line", show=False),
        Binding("down", "recall(1)", "Later line", show=False),
        # window keys here too, so that a line typed before them goes to the window it was typed in
        Binding("ctrl+n,alt+right", "app.cycle(1)", "Next window", show=False),
        Binding("ctrl+p,alt+left", "app.cycle(-1)", "Previous window", show=False),
    ]

    class CompleteRequest(Message):
        """Asks the app for the names and rooms to complete from."""

    class Leave(Message):
        """Quit, once the keys typed before it have been handled (posted by the app's ctrl+q)."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.completer = Completer()
        self.recall = InputHistory()
        self.nicks: list[str] = []
        self.rooms: list[str] = []
        #: Called with each finished line (Enter); without it a Submitted message is posted.
        self.on_line: Callable[[str], None] | None = None
        #: Called with the lines of a multi-line paste and the input's text before it.
        self.on_paste_lines: Callable[[list[str], str], None] | None = None
        self.on_leave: Callable[[], None] | None = None
        #: The text of our last line in the window, for Up on an empty input (as Slack).
        self.last_own: Callable[[], str | None] | None = None
        self._offered = ""  # the "/edit ..." line Up put in the empty input

    async def _on_key(self, event: events.Key) -> None:
        """Run this widget's own bindings for ``event`` now, not after it bubbled up."""
        for binding in self._bindings.key_to_bindings.get(event.key, ()):
            if not binding.priority and await self.app.run_action(binding.action, self):
                event.stop()
                event.prevent_default()  # neither Input's handler nor the app's bindings see it again
                return

    async def action_submit(self) -> None:
        """Take the line and clear the input in one step, so the next key starts a new line."""
        line = self.value
        self.value = ""
        self.cursor_position = 0
        if self.on_line is not None:
            self.on_line(line)
        else:
            self.post_message(self.Submitted(self, line))

    def _on_paste(self, event: events.Paste) -> None:
        """A paste of several lines is several lines to send (Input keeps only the first)."""
        event.stop()
        event.prevent_default()
        parts = split_lines(event.text)
        if not parts:
            return
        start, end = sorted(self.selection)
        if len(parts) == 1 or self.on_paste_lines is None:
            text = " ".join(parts)
            if start != end:
                self.replace(text, start, end)
            else:
                self.insert_text_at_cursor(text)
            return
        before = self.value
        parts[0] = before[:start] + parts[0]
        parts[-1] = parts[-1] + before[end:]
        self.value = ""
        self.cursor_position = 0
        self.on_paste_lines(parts, before)

    def _on_chat_input_leave(self, message: "ChatInput.Leave") -> None:
        message.stop()
        if self.on_leave is not None:
            self.on_leave()

    def action_complete(self) -> None:
        done = self.completer.complete(self.value, self.cursor_position, self.nicks, self.rooms)
        if done is not None:
            self.value = done.value
            self.cursor_position = done.cursor

    def action_recall(self, step: int) -> None:
        """Up/Down through earlier lines. Up on an empty input first offers to edit our
        last line in this window (``/edit TEXT``, as Slack does); Up again goes on to
        the earlier lines, Down takes the offer back."""
        if self._offered and self.value == self._offered:
            self._offered = ""
            self.value = ""
            if step > 0:
                return
        elif step < 0 and not self.value and not self.recall.browsing and self.last_own is not None:
            text = self.last_own()
            if text is not None:
                self.value = self._offered = f"/edit {text}"
                self.cursor_position = len(self.value)
                return
        self._offered = ""
        line = self.recall.previous(self.value) if step < 0 else self.recall.next(self.value)
        if line is not None:
            self.value = line
            self.cursor_position = len(line)

    def remember(self, line: str) -> None:
        self.recall.add(line)
        self.completer.reset()

