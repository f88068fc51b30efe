"""The zchat benchmark: zchat side by side with the systems a user would otherwise pick.

Run it as ``zchat bench`` or ``python scripts/bench.py`` (``--quick`` under 2 minutes,
the default full mode under 15). Nothing here is imported by the broker or the client.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from zchat.bench.runner import main as run

    return run(argv)
