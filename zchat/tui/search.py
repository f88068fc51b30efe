"""``/search`` in talk: the results as a list over the chat (newest first), Enter to
go to a line in its window, Esc to close. The app fetches the results and does the
jump; this screen only shows them and says which one was picked."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from zchat import protocol as p
from zchat import render
from zchat.tui.widgets import nick_colour

#: Characters of a line a result shows at most.
PREVIEW = 200


def result_line(msg: p.Msg, me: str) -> Text:
    """``01 Dec 14:02  #ops  alice  the deploy failed``: one result."""
    when = time.strftime("%d %b %H:%M", time.localtime(msg.ts))
    text = msg.text if len(msg.text) <= PREVIEW else msg.text[: PREVIEW - 1] + "…"
    return Text.assemble(
        (when, "dim"), "  ", (render.label(msg.room, me), "bold"), "  ", (msg.sender, f"bold {nick_colour(msg.sender)}"), "  ",
        ("* " if msg.kind == "me" else "", "italic"), text.replace("\n", " "),
    )


class SearchResults(ModalScreen[p.Msg | None]):
    """The hits of one search; dismissed with the picked line, or None (Esc)."""

    BINDINGS = [Binding("escape", "close", "Close", show=False)]

    def __init__(self, text: str, hits: list[p.Msg], more: bool, me: str) -> None:
        super().__init__()
        self.text = text
        self.hits = hits
        self.more = more
        self.me = me

    def compose(self) -> ComposeResult:
        count = f"{len(self.hits)}{'+' if self.more else ''}"
        with Vertical(id="search-box"):
            yield Static(f"{count} found for {self.text!r}, newest first · Enter goes there · Esc closes", id="search-title", markup=False)
            yield OptionList(*(Option(result_line(hit, self.me), id=str(i)) for i, hit in enumerate(self.hits)), id="search-list")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(self.hits[event.option_index])

    def action_close(self) -> None:
        self.dismiss(None)
