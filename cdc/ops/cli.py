"""The ``cdc`` command line (also ``python -m cdc``).

Configuration comes from the environment (and ``.env``), never from ``--help``: secrets
stay out of process listings and help output. Misconfiguration exits with code 2 and one
line on stderr that says what to fix.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cdc.errors import CdcError, ConfigError
from cdc.settings import Settings, load_settings
from cdc.telemetry import logs

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CONFIG = 2


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    click.echo(logs.scrub(f"cdc: {message}"), err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from None
    logs.configure(settings.log_format, settings.log_level, settings.secrets())
    return settings


def _guard(fn: F) -> F:
    """Turn the daemon's errors into exit codes and one line, never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc))
        except CdcError as exc:
            fail(str(exc), code=getattr(exc, "exit_code", 1))
        return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """PostgreSQL-to-Redis change data capture.

    Configuration is read from the environment (or .env): DATABASE_URL,
    CDC_DATABASE_URL, REDIS_URL, CDC_SLOT, CDC_PUBLICATION, CDC_METRICS_ADDR,
    CDC_LOG_FORMAT, CDC_LOG_LEVEL. DATABASE_URL takes every form libpq takes (URL,
    keyword DSN, service, PGPASSWORD/.pgpass). See the README for the full list.
    """


@main.command()
@_guard
def run() -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT: finish the batch, confirm, exit 0)."""
    from cdc.runtime.daemon import run as run_daemon

    settings = _settings()
    sys.exit(run_daemon(settings))


@main.group()
def slot() -> None:
    """Inspect or reset the logical replication slot."""


@slot.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_guard
def slot_status(as_json: bool) -> None:
    """Slot name, plugin, activity, confirmed LSN, lag, retained WAL, wal_status."""
    from cdc.ops.slot import status

    report = status(_settings())
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
    if not report.exists:
        sys.exit(1)


@slot.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Only print what would be done.")
@click.option("--force", is_flag=True, help="Terminate the daemon holding the slot first.")
@_guard
def slot_reset(yes: bool, dry_run: bool, force: bool) -> None:
    """Drop and recreate the slot, rebuild the cache from a snapshot consistent with it."""
    from cdc.ops.checks import publication_mirror
    from cdc.ops.slot import plan_reset, reset
    from schema.keys import state_key
    from schema.lsn import format_lsn

    settings = _settings()
    declared = settings.tables()
    # Only the tables this slot's publication holds: another daemon's stay as they are.
    tables = publication_mirror(settings, declared)
    key = state_key(settings.slot, len(tables) == len(declared))
    plan = plan_reset(settings, force, tables)
    click.echo("\n".join(("would " if dry_run else "") + line for line in plan.lines()))
    if dry_run:
        return
    if not yes:
        # Asked on a terminal and on a pipe alike (``printf 'y\n' | cdc slot reset``);
        # no answer at all (stdin closed or empty) is a refusal.
        click.echo("Reset the slot and rebuild the cache? [y/N] ", nl=False, err=True)
        answer = sys.stdin.readline()
        if not answer:
            click.echo(err=True)
            fail("refusing to reset without confirmation: pass --yes", code=1)
        if answer.strip().lower() not in ("y", "yes"):
            fail("aborted", code=1)
    report = reset(settings, plan, tables, key)
    click.echo(
        f"slot {settings.slot} recreated at {format_lsn(report.consistent_point)}; "
        f"loaded {sum(report.rows.values())} rows "
        f"({', '.join(f'{k}={v}' for k, v in report.rows.items())}), "
        f"removed {report.swept} stale keys in {report.seconds:.1f}s"
    )


@main.command()
@click.option("--repair", is_flag=True, help="Rewrite the keys that differ.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_guard
def verify(repair: bool, as_json: bool) -> None:
    """Compare every tracked row with its Redis key (exit 0 equal, 1 differences)."""
    from cdc.ops.verify import verify as run_verify

    report = run_verify(_settings(), repair)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
    if not report.equal:
        sys.exit(1)


@main.group()
def config() -> None:
    """The declared cache (CDC_CONFIG): tables, keys, lookups, views."""


@config.command("check")
@_guard
def config_check() -> None:
    """Validate CDC_CONFIG against the database without starting (exit 0 valid, 2 not)."""
    from cdc.ops.checks import check_config

    settings = _settings()
    tables = settings.tables()
    mirrored = check_config(settings, tables)
    source = settings.config or "the packaged default"
    views = sum(len(t.views) for t in tables)
    click.echo(
        f"{source}: valid ({len(tables)} tables: {', '.join(t.name for t in tables)};"
        f" {views} views)"
    )
    if len(mirrored) < len(tables):
        others = ", ".join(t.name for t in tables if t not in mirrored)
        click.echo(
            f'publication "{settings.publication}" holds {", ".join(t.name for t in mirrored)}:'
            f" a daemon on it mirrors those only ({others}: another publication's daemon)"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
