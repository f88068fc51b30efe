import sys

from zchat.bench import main

sys.exit(main())
