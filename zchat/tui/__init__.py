"""``zchat talk``: the full-screen client (``app``), its widgets and commands, and the
line mode for pipes (``linemode``). Everything here talks to the broker through
``zchat.client`` only."""
