#!/usr/bin/env python3
"""The abuse benchmark: hostile clients against fresh zchat brokers, and what they cost a
normal user: ``python scripts/abuse.py [--quick] [--seconds S] [--only A,B] [--json PATH]``.

The logic lives in ``zchat.bench.abuse`` (so an installed ``zchat bench --abuse`` has it
too); this script only makes the checkout importable and calls it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zchat.bench.abuse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
