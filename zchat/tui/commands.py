"""What the user typed, as plain values: slash commands, Tab completion, input history.

Nothing here touches the screen or the network, so the full-screen app and the line
mode share one parser and the tests need neither. ``parse(line)`` returns an action
(``Say``, ``Join``, ``Msg``...) or raises ``CommandError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from zchat import protocol as p


class CommandError(ValueError):
    """A line that cannot be run; ``str(exc)`` is the one line to show."""


# ------------------------------------------------------------------ actions


@dataclasses.dataclass(frozen=True)
class Say:
    """Text for the current conversation (``me`` for an action, ``/me``)."""

    text: str
    me: bool = False


@dataclasses.dataclass(frozen=True)
class Join:
    room: str
    private: bool = False  # /create ROOM, /join -private ROOM: a new private room


@dataclasses.dataclass(frozen=True)
class Moderate:
    """A room operator's action on the current room: ``action`` is invite, kick, ban,
    unban, op, deop (on ``name``) or topic (``text``; None with no text: show it)."""

    action: str
    name: str = ""
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class Part:
    room: str | None = None  # None: the current room


@dataclasses.dataclass(frozen=True)
class Msg:
    """A direct message; without ``text`` it only opens the conversation."""

    to: str
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class Who:
    room: str | None = None


@dataclasses.dataclass(frozen=True)
class Rooms:
    pass


@dataclasses.dataclass(frozen=True)
class Switch:
    """``target`` is a room (``general``), a conversation (``@bob``) or a 1-based number."""

    target: str


@dataclasses.dataclass(frozen=True)
class History:
    count: int


@dataclasses.dataclass(frozen=True)
class Clear:
    pass


@dataclasses.dataclass(frozen=True)
class Help:
    command: str | None = None


@dataclasses.dataclass(frozen=True)
class Quit:
    pass


Action = Say | Join | Part | Msg | Who | Rooms | Switch | History | Clear | Help | Quit | Moderate


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    usage: str
    summary: str
    completes: str = ""  # what the first argument completes to: "room", "nick", "target", "command"


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("join", "/join ROOM", "join a room (created if new; /join -private ROOM: a new private room) and switch to it", "room"),
        Spec("create", "/create ROOM", "create a private room (you are its operator) and switch to it", "room"),
        Spec("part", "/part [ROOM]", "leave a room (the current one by default)", "room"),
        Spec("msg", "/msg NAME [TEXT]", "open a direct conversation with NAME, sending TEXT", "nick"),
        Spec("me", "/me TEXT", "send an action: '* you TEXT'"),
        Spec("who", "/who [ROOM]", "list the members of a room and who is online", "room"),
        Spec("rooms", "/rooms", "list the broker's rooms"),
        Spec("switch", "/switch ROOM|@NAME|N", "show another room or conversation (also Ctrl-N / Ctrl-P)", "target"),
        Spec("history", "/history N", f"load N earlier messages of this conversation (1-{p.MAX_HISTORY})"),
        Spec("clear", "/clear", "clear this conversation's window"),
        Spec("invite", "/invite NAME", "invite NAME to this room (operators; a private room admits them at once)", "nick"),
        Spec("kick", "/kick NAME [REASON]", "remove NAME from this room (operators)", "nick"),
        Spec("ban", "/ban NAME [REASON]", "remove NAME from this room and keep them out (operators)", "nick"),
        Spec("unban", "/unban NAME", "lift NAME's ban from this room (operators)", "nick"),
        Spec("topic", "/topic [TEXT]", "show this room's topic, or set it (operators)"),
        Spec("op", "/op NAME", "make NAME an operator of this room (operators)", "nick"),
        Spec("deop", "/deop NAME", "take operator status from NAME (operators)", "nick"),
        Spec("help", "/help [COMMAND]", "list the commands, or explain one", "command"),
        Spec("quit", "/quit", "leave zchat (also Ctrl-Q)"),
    )
}

ALIASES: dict[str, str] = {
    "j": "join",
    "leave": "part",
    "query": "msg",
    "names": "who",
    "list": "rooms",
    "buffer": "switch",
    "exit": "quit",
}

COMMAND_NAMES: tuple[str, ...] = tuple(sorted(SPECS))


def split_lines(text: str) -> list[str]:
    """The lines of a paste or of a chunk of input: split at CR LF, LF or a lone CR (a
    CR inside a message would overwrite the start of its line on every screen); a
    final line break ends the last line rather than starting an empty one."""
    parts = re.split(r"\r\n|\r|\n", text)
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return [] if parts == [""] else parts


def counted(n: int, word: str) -> str:
    """``1 member``, ``0 members``, ``2 members``: a count with its noun agreeing."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def room_name(value: str) -> str:
    """``#General`` -> ``general``; raises CommandError for a name the broker would refuse."""
    room = value.strip().lstrip("#").lower()
    if not p.valid_room(room):
        raise CommandError(f"bad room name {value!r}: use a-z, 0-9, '_', '-', '.' (at most {p.MAX_ROOM_LEN})")
    return room


def user_name(value: str) -> str:
    name = value.strip().lstrip("@").lower()
    if not p.valid_name(name):
        raise CommandError(f"bad user name {value!r}: use a-z, 0-9, '_', '-' (at most {p.MAX_NAME_LEN})")
    return name


def switch_target(value: str) -> str:
    """A room (``general``), a conversation (``@bob``) or a window number (``2``)."""
    value = value.strip()
    if value.isdigit():
        if int(value) < 1:
            raise CommandError("window numbers start at 1")
        return str(int(value))
    if value.startswith("@"):
        return "@" + user_name(value)
    return room_name(value)


def parse(line: str) -> Action | None:
    """The action for one input line; None for a blank line.

    A line starting with ``/`` is a command; ``//text`` sends ``/text`` as it is.
    """
    if not line.strip():
        return None
    if not line.startswith("/") or line.startswith("//"):
        return Say(line[1:] if line.startswith("//") else line)
    head, _, rest = line[1:].partition(" ")
    word = head.lower()
    rest = rest.strip()
    name = ALIASES.get(word, word)
    spec = SPECS.get(name)
    if spec is None:
        close = difflib.get_close_matches(word, list(SPECS) + list(ALIASES), n=1)
        hint = f": did you mean /{ALIASES.get(close[0], close[0])}?" if close else ": /help lists the commands"
        raise CommandError(f"unknown command /{head}{hint}")
    args = rest.split()
    try:
        return _build(name, rest, args)
    except CommandError as exc:
        raise CommandError(f"{exc} (usage: {spec.usage})") from None


def _build(name: str, rest: str, args: list[str]) -> Action:
    if name == "join":
        private = bool(args) and args[0].lower() in ("-private", "-p")
        if len(args) != 1 + private:
            raise CommandError("/join needs one room")
        return Join(room_name(args[-1]), private)
    if name == "create":
        if len(args) != 1:
            raise CommandError("/create needs one room")
        return Join(room_name(args[0]), True)
    if name in ("invite", "kick", "ban", "unban", "op", "deop"):
        reason = name in ("kick", "ban")
        if not args or (len(args) > 1 and not reason):
            raise CommandError(f"/{name} needs one name")
        text = rest[len(args[0]):].strip()
        if len(text) > p.MAX_TOPIC_LEN:
            raise CommandError(f"a reason has at most {p.MAX_TOPIC_LEN} characters")
        return Moderate(name, user_name(args[0]), text if reason else None)
    if name == "topic":
        if len(rest) > p.MAX_TOPIC_LEN:
            raise CommandError(f"a topic has at most {p.MAX_TOPIC_LEN} characters")
        return Moderate("topic", "", rest or None)
    if name == "part":
        if len(args) > 1:
            raise CommandError("/part takes at most one room")
        return Part(room_name(args[0]) if args else None)
    if name == "msg":
        if not args:
            raise CommandError("/msg needs a name")
        to = user_name(args[0])
        text = rest[len(args[0]):].strip()
        return Msg(to, text or None)
    if name == "me":
        if not rest:
            raise CommandError("/me needs some text")
        return Say(rest, me=True)
    if name == "who":
        if len(args) > 1:
            raise CommandError("/who takes at most one room")
        return Who(room_name(args[0]) if args else None)
    if name == "switch":
        if len(args) != 1:
            raise CommandError("/switch needs one room, @name or number")
        return Switch(switch_target(args[0]))
    if name == "history":
        if len(args) != 1 or not args[0].isdigit() or not 1 <= int(args[0]) <= p.MAX_HISTORY:
            raise CommandError(f"/history needs a number from 1 to {p.MAX_HISTORY}")
        return History(int(args[0]))
    if name == "help":
        if len(args) > 1:
            raise CommandError("/help takes at most one command")
        return Help(args[0].lstrip("/").lower() if args else None)
    if args:
        raise CommandError(f"/{name} takes no arguments")
    return {"rooms": Rooms, "clear": Clear, "quit": Quit}[name]()


def help_lines(command: str | None = None) -> list[str]:
    """``/help`` output, one line each."""
    if command:
        spec = SPECS.get(ALIASES.get(command, command))
        if spec is None:
            raise CommandError(f"no command /{command}: /help lists the commands")
        aliases = [f"/{a}" for a, n in sorted(ALIASES.items()) if n == spec.name]
        return [f"{spec.usage}  {spec.summary}" + (f" (also {', '.join(aliases)})" if aliases else "")]
    width = max(len(s.usage) for s in SPECS.values())
    lines = [f"{s.usage:<{width}}  {s.summary}" for s in SPECS.values()]
    lines.append("Keys: Tab completes names and commands, Up/Down recall lines, PageUp/PageDown scroll "
                 "(older history loads at the top), Ctrl-N/Ctrl-P switch windows, Ctrl-Q quits.")
    lines.append("Start a line with // to send a line that begins with /.")
    return lines


# ------------------------------------------------------------------ completion


@dataclasses.dataclass(frozen=True)
class Completion:
    value: str
    cursor: int


class Completer:
    """Tab completion in the style of irssi: the word before the cursor is completed to
    the first match; pressing Tab again (with nothing else typed) cycles the matches.

    The first word of a ``/`` line completes to command names; the first argument of
    ``/join``, ``/part``, ``/who`` to rooms, of ``/switch`` to rooms and ``@names``, of
    ``/msg`` to names; anything else to names. A name completed at the start of a line
    gets ``": "`` after it (addressing someone), elsewhere a space.
    """

    def __init__(self) -> None:
        self._last: Completion | None = None
        self._start = 0
        self._candidates: list[str] = []
        self._index = 0
        self._suffix = ""
        self._tail = ""

    def reset(self) -> None:
        self._last = None

    def complete(self, value: str, cursor: int, nicks: list[str], rooms: list[str]) -> Completion | None:
        if self._last is not None and self._last == Completion(value, cursor) and len(self._candidates) > 1:
            self._index = (self._index + 1) % len(self._candidates)
            return self._apply(value)
        start = cursor
        while start > 0 and not value[start - 1].isspace():
            start -= 1
        word = value[start:cursor]
        if not word:
            self._last = None
            return None
        before = value[:start]
        candidates, suffix = self._candidates_for(before, word, nicks, rooms)
        if not candidates:
            self._last = None
            return None
        self._start, self._candidates, self._index, self._suffix = start, candidates, 0, suffix
        self._tail = value[cursor:]
        return self._apply(value)

    def _apply(self, value: str) -> Completion:
        head = value[: self._start] + self._candidates[self._index] + self._suffix
        tail = self._tail.lstrip(" ") if self._suffix.endswith(" ") else self._tail
        self._last = Completion(head + tail, len(head))
        return self._last

    @staticmethod
    def _candidates_for(before: str, word: str, nicks: list[str], rooms: list[str]) -> tuple[list[str], str]:
        words = before.split()
        if not words and word.startswith("/"):
            typed = word[1:].lower()
            return [f"/{n}" for n in COMMAND_NAMES if n.startswith(typed)], " "
        kind = "nick"
        if len(words) == 1 and words[0].startswith("/"):
            command = words[0][1:].lower()
            kind = SPECS[ALIASES.get(command, command)].completes if ALIASES.get(command, command) in SPECS else "nick"
        if kind == "command":
            typed = word.lstrip("/").lower()
            return [n for n in COMMAND_NAMES if n.startswith(typed)], " "
        if kind in ("room", "target") and not word.startswith("@"):
            typed = word.lstrip("#").lower()
            return [f"#{r}" for r in sorted(rooms) if r.startswith(typed)], " "
        at = word.startswith("@")
        if kind == "target" and not at:
            return [], " "
        typed = word.lstrip("@").lower()
        found = [n for n in sorted(set(nicks)) if n.startswith(typed)]
        if at:
            return [f"@{n}" for n in found], " "
        return found, (": " if not before.strip() else " ")


# ------------------------------------------------------------------ history


class InputHistory:
    """Up/Down recall of earlier lines; what was being typed comes back past the newest."""

    def __init__(self, limit: int = 500) -> None:
        self.limit = limit
        self.lines: list[str] = []
        self._pos: int | None = None  # index into lines while browsing
        self._draft = ""

    def add(self, line: str) -> None:
        if line.strip() and (not self.lines or self.lines[-1] != line):
            self.lines.append(line)
            del self.lines[: -self.limit]
        self._pos = None

    def previous(self, current: str) -> str | None:
        """The line before (Up); None when there is nothing older."""
        if not self.lines:
            return None
        if self._pos is None:
            self._draft = current
            self._pos = len(self.lines)
        if self._pos == 0:
            return None
        self._pos -= 1
        return self.lines[self._pos]

    def next(self, current: str) -> str | None:
        """The line after (Down); the draft past the newest; None when not browsing."""
        if self._pos is None:
            return None
        self._pos += 1
        if self._pos >= len(self.lines):
            self._pos = None
            return self._draft
        return self.lines[self._pos]
