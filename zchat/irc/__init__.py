"""zchat.irc: an IRC server face for zchat (``zchat irc``).

Each IRC connection is one ``zchat.client.Client``; this package only translates.
``lines`` parses and formats IRC lines, ``numerics`` names the replies, ``names``
maps nicks and channels to zchat names and rooms, ``session`` is the sans-I/O
per-connection state machine (CAP, SASL, PASS, registration, command checks),
``translate`` turns zchat events into IRC lines, ``gateway`` runs one connection over
asyncio, ``server`` listens (optionally with TLS) and ``signin`` checks accounts.
"""
