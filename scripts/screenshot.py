"""Make docs/screenshot.png: the full-screen client with three users chatting.

Starts a broker in this process (SQLite in a temporary directory, free ports), runs
the real ChatApp for alice headless at 120x36, has bob and carol talk to her through
zchat.client, then saves Textual's SVG screenshot and converts it to PNG with
``rsvg-convert`` (Debian: ``apt-get install librsvg2-bin``) or, failing that, the
``cairosvg`` module. Neither is a zchat dependency.

    python scripts/screenshot.py                             # writes docs/screenshot.png
    python scripts/screenshot.py --out /tmp/s.png --svg /tmp/s.svg
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zchat.broker import Broker  # noqa: E402
from zchat.client import Client  # noqa: E402
from zchat.core import Limits  # noqa: E402
from zchat.storage.sqlite import SqliteStorage  # noqa: E402
from zchat.tui.app import ChatApp  # noqa: E402

SIZE = (120, 36)


async def until(pilot, predicate, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshot: timed out waiting for {what}")
        await pilot.pause()
        await asyncio.sleep(0.02)


async def main(svg_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker("tcp://127.0.0.1:0", SqliteStorage(Path(tmp) / "history.db"), Limits(heartbeat=1.0))
        await broker.start()
        served = asyncio.create_task(broker.run())
        bob = Client(broker.endpoint, "bob", "bob-secret-0123456789")
        carol = Client(broker.endpoint, "carol", "carol-secret-0123456789")
        dave = Client(broker.endpoint, "dave", "dave-secret-0123456789")
        for c in (bob, carol, dave):
            await c.connect()
        for c, rooms in ((bob, ("general", "dev")), (carol, ("general", "random")), (dave, ("general",))):
            for room in rooms:
                await c.join(room)
        await dave.close()  # a member who is offline
        await bob.send("general", "morning all! the new broker is up on staging")
        await carol.send("general", "nice. does history survive a restart now?")
        await bob.send("general", "yes: SQLite in WAL mode, and clients fill the gap by seq when they come back")
        await bob.send("dev", "PR for the reconnect indicator is ready for review")

        app = ChatApp(broker.endpoint, "alice", ["general", "dev", "random"], secret="alice-secret-0123456789")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state == "connected" and all(b.loaded for b in app.buffers.values()), "alice to join")
            app.input.value = "good morning! just catching up"
            await pilot.press("enter")
            await carol.send("general", "welcome back alice: we're testing the restart story today")
            await carol.send("general", "I'll kill the broker at 10:30, shout if your client does not say 'reconnecting'", me=False)
            await bob.send("general", "grabs popcorn", me=True)
            await bob.send_dm("alice", "can you look at my PR after standup?")
            await carol.send("random", "who wants coffee?")
            await carol.send("random", "alice, you in?")
            await until(pilot, lambda: any("grabs popcorn" in line for line in app.log_view.plain_lines()), "the chat to arrive")
            await until(pilot, lambda: any(b.is_dm and b.unread for b in app.buffers.values()), "bob's DM")
            await until(pilot, lambda: app.buffers["random"].unread == 2, "#random unread")
            app.input.value = "/msg bob sure, after standup"
            await pilot.pause()
            svg_path.parent.mkdir(parents=True, exist_ok=True)
            app.save_screenshot(filename=svg_path.name, path=str(svg_path.parent))
        for c in (bob, carol):
            await c.close()
        broker.stop()
        await served


def to_png(svg: Path, png: Path) -> None:
    # Textual writes runs of spaces as &#160; at the start of <text> elements; librsvg
    # drops those unless told to keep white space, which shifts right-aligned columns.
    text = svg.read_text()
    if 'xml:space="preserve"' not in text:
        svg.write_text(text.replace("<svg ", '<svg xml:space="preserve" ', 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("rsvg-convert"):
        subprocess.run(["rsvg-convert", "-o", str(png), str(svg)], check=True)
        return
    try:
        import cairosvg  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("install librsvg2-bin (rsvg-convert) or cairosvg to make the PNG (--svg keeps the SVG)") from None
    cairosvg.svg2png(url=str(svg), write_to=str(png))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png", help="the PNG to write")
    parser.add_argument("--svg", type=Path, help="also keep Textual's SVG here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        svg = args.svg or Path(scratch) / "screenshot.svg"
        asyncio.run(main(svg))
        to_png(svg, args.out)
    print(f"wrote {args.out}" + (f" and {args.svg}" if args.svg else ""))
