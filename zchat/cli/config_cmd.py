"""``zchat config``: the effective settings and where each one came from."""

from __future__ import annotations

import json

import click

from zchat import config as cfg


@click.command("config")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML settings file (default: $ZCHAT_CONFIG, else config.toml in the config directory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def config(config_path: str | None, as_json: bool) -> None:
    """Show the effective settings and where each came from.

    Precedence, highest first: command-line flags, ZCHAT_* environment
    variables, the TOML file, defaults. A setting such as log_level is read
    from the variable ZCHAT_LOG_LEVEL; the file uses flat keys
    (log-level = "DEBUG").

    \b
    Examples:
      zchat config
      zchat config --config ./zchat.toml
      ZCHAT_NAME=carol zchat config --json
      zchat config --json | jq -r .settings.broker
    """
    try:
        settings, sources = cfg.load_settings({}, config_path)
    except cfg.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    path, explicit = cfg.resolve_config_path(config_path)
    values = {name: getattr(settings, name) for name in cfg.FIELDS}
    if as_json:
        out = {
            "settings": values,
            "sources": sources,
            "env": {name: cfg.env_var(name) for name in cfg.FIELDS},
            "config_file": str(path),
            "config_file_exists": path.exists(),
            "config_dir": str(cfg.config_dir()),
            "data_dir": str(cfg.data_dir()),
            "db_path": str(settings.db_path()),
        }
        click.echo(json.dumps(out, indent=2))
        return
    state = "" if path.exists() else "  (not found; defaults used)"
    click.echo(f"config file: {path}{state}")
    click.echo(f"config dir:  {cfg.config_dir()}")
    click.echo(f"data dir:    {cfg.data_dir()}")
    click.echo("")
    rows = [(name, _show(name, values[name], settings), sources[name], cfg.env_var(name)) for name in cfg.FIELDS]
    widths = [max(len(r[i]) for r in rows + [("setting", "value", "source", "env var")]) for i in range(3)]
    header = ("setting", "value", "source", "env var")
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)).rstrip())


def _show(name: str, value: object, settings: cfg.Settings) -> str:
    if name == "db" and not value:
        return f"(empty: {settings.db_path()})"
    if name == "name" and not value:
        return "(unset)"
    return str(value)


COMMANDS = [config]
