"""``zchat web``: serve the web chat (zchat.web) on the same broker as every other face."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from zchat.cli.options import settings

log = logging.getLogger(__name__)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@click.command("web")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, envvar="ZCHAT_WEB_LISTEN", help="HOST:PORT the page is served on. [env ZCHAT_WEB_LISTEN]")
@click.option("--broker", "-b", help="Broker address, tcp://HOST:PORT or tcp://HOST:PORT#k=KEY. [env ZCHAT_BROKER; default tcp://127.0.0.1:5555]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file (for broker, log_level).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="ZCHAT_WEB_DATA_DIR",
              help="Where accounts are kept (accounts.json, mode 0600). [env ZCHAT_WEB_DATA_DIR; default: web/ in the user data directory]")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="PEM certificate: serve HTTPS (and Secure cookies).")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="PEM private key for --tls-cert.")
@click.option("--origin", "origins", multiple=True, envvar="ZCHAT_WEB_ORIGIN",
              help="The page's public origin, e.g. https://chat.example.com (behind a reverse proxy); repeatable. [default: the request's own]")
@click.option("--behind-proxy", is_flag=True, help="Behind a reverse proxy: take the client address from X-Forwarded-For's last hop.")
@click.option("--max-users", type=click.IntRange(min=1), default=1000, show_default=True, help="Signed-in users served at once.")
@click.option("--max-tabs", type=click.IntRange(min=1), default=8, show_default=True, help="Open tabs per user.")
@click.option("--sign-in-per-minute", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Sign-in attempts a name, and an address, may make a minute (5 at once); 0: no limit.")
@click.option("--trust-new-broker", is_flag=True, help="Pin an unknown non-loopback broker's key on first use.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env ZCHAT_LOG_LEVEL].")
def web_cmd(
    listen: str, broker: str | None, config_path: str | None, data_dir: str | None, tls_cert: str | None, tls_key: str | None,
    origins: tuple[str, ...], behind_proxy: bool, max_users: int, max_tabs: int, sign_in_per_minute: float, trust_new_broker: bool,
    log_level: str | None,
) -> None:
    """Serve the web chat: a page and a WebSocket, one zchat client per signed-in user.

    Browser users sign up with a name and a password (the name is claimed at the
    broker like any other), then chat in the same rooms and DMs as `zchat talk` users
    and bots. See docs/web.md for the set-up behind a TLS reverse proxy.

    \b
    Examples:
      zchat web                                  # http://127.0.0.1:8080
      zchat web --listen 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem
      zchat web --origin https://chat.example.com --behind-proxy
    """
    from aiohttp import web

    from zchat import config as cfg
    from zchat.guard import raise_fd_limit
    from zchat.logs import setup_logging
    from zchat.web import Gateway, WebConfig, make_app, tls_context

    s = settings(config_path, broker=broker, log_level=log_level)
    setup_logging(s.log_level, s.log_format)
    host, port = _listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    ssl_ctx = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    secure = ssl_ctx is not None or any(o.startswith("https://") for o in origins)
    directory = Path(data_dir) if data_dir else cfg.data_dir() / "web"

    # Each signed-in user costs a few descriptors (their Client's sockets, their tabs'):
    # the usual soft limit of 1,024 would stop a gateway at a couple of hundred users.
    raise_fd_limit()

    async def main() -> None:
        gateway = Gateway(s.broker, max_users=max_users, max_tabs=max_tabs, trust_new_broker=trust_new_broker)
        app = make_app(gateway, WebConfig(
            directory, origins=origins, secure_cookies=secure, trust_proxy=behind_proxy, sign_in_per_minute=sign_in_per_minute,
        ))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
        await site.start()
        scheme = "https" if ssl_ctx else "http"
        log.info("serving the web chat on %s://%s:%d for the broker %s (accounts in %s)", scheme, host, port, s.broker, directory)
        click.echo(f"zchat web: open {scheme}://{host}:{port}/", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


COMMANDS = [web_cmd]
