#!/usr/bin/env python3
"""Benchmark zchat against libzmq's proxy, a Python forwarder, Redis pub/sub and the
classic threaded chat, in one run: ``python scripts/bench.py [--quick] [--out DIR]``.

The logic lives in the ``zchat.bench`` package (so an installed ``zchat bench`` has it
too); this script only makes the checkout importable and calls it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zchat.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
