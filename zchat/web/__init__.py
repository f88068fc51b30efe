"""zchat.web: ``zchat web``, a web chat served by one asyncio process on the same broker.

Each signed-in browser user is one ``zchat.client.Client`` inside the gateway, shared
by all their tabs; the page is plain HTML, CSS and JavaScript in ``static/``. Files:
``app`` (HTTP routes, sign-in, the WebSocket endpoint), ``hub`` (a Client per user, its
tabs), ``tab`` (one WebSocket's bounded queue), ``wire`` (the page<->gateway frames),
``sessions`` (cookies), ``collector`` (the settled heap out of the garbage collector's
full scans). The protocol and the set-up are in docs/web.md.
"""

from zchat.web.app import WebConfig, make_app, tls_context
from zchat.web.hub import Gateway

__all__ = ["Gateway", "WebConfig", "make_app", "tls_context"]
