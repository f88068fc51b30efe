"""``zchat backup PATH``: a consistent copy of a running broker's SQLite history."""

from __future__ import annotations

import json

import click

from zchat.cli.options import settings

REDIS_ADVICE = (
    "this broker keeps its history in Redis ({url}): back up the Redis server instead, for example "
    "`redis-cli -u URL BGSAVE` then copy dump.rdb once `LASTSAVE` has changed, or copy the appendonly "
    "files (see docs/operations.md, Backup and restore)"
)


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--db", help="SQLite history file to copy. [default: the broker's, from the settings]")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@click.option("--step-pages", type=click.IntRange(1), default=256, show_default=True,
              help="Pages copied at a time (4 KiB each).")
@click.option("--pause", type=click.FloatRange(0), default=0.005, show_default=True,
              help="Seconds of pause between steps (spares the broker's disk and CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML settings file.")
def backup(path: str, db: str | None, force: bool, step_pages: int, pause: float, as_json: bool,
           config_path: str | None) -> None:
    """Copy the broker's SQLite history to PATH while it runs (it is neither stopped nor
    blocked). The copy is checked, complete as of the moment the backup began, and gets
    a new history epoch. To restore: stop the broker, move the copy to its --db path
    (removing any -wal and -shm files beside the old one), start the broker.

    \b
    Examples:
      zchat backup /srv/backups/zchat-$(date +%F).db
      zchat backup --db /srv/zchat/history.db /srv/backups/latest.db --force
    """
    from pathlib import Path

    from zchat.storage import StorageError
    from zchat.storage.backup import backup_sqlite

    import os

    try:  # a copy is never urgent: the broker gets the CPU first
        os.nice(10)
    except (AttributeError, OSError):
        pass
    s = settings(config_path, db=db)
    if s.storage != "sqlite":
        raise click.ClickException(REDIS_ADVICE.format(url=s.storage))
    try:
        result = backup_sqlite(s.db_path(), Path(path), pages=step_pages, pause=pause, force=force)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({
            "path": str(result.path), "bytes": result.bytes, "messages": result.messages, "epoch": result.epoch,
            "source_epoch": result.source_epoch, "seconds": round(result.seconds, 3), "steps": result.steps,
        }))
    else:
        click.echo(
            f"backed up {s.db_path()} to {result.path}: {result.messages} messages, {result.bytes} bytes "
            f"in {result.seconds:.2f}s ({result.steps} steps); the copy's epoch is {result.epoch}"
        )


COMMANDS = [backup]
