"""The daemon's configuration: one object, read once at start, passed down.

Read from the environment (and ``.env``); nothing reads the environment at import time.
Connection strings are secrets: they are held as :class:`pydantic.SecretStr`, parsed by
:func:`schema.dsn.parse_dsn` (every form libpq takes), and only ever shown rebuilt from
their non-secret parts (:meth:`schema.dsn.Dsn.describe`, :func:`describe_redis_url`).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdc.errors import ConfigError
from schema.dsn import Dsn, DsnError, environment_secrets, parse_dsn
from schema.keys import TrackedTable
from schema.redis_url import RedisTarget

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def redis_secrets(url: str) -> list[str]:
    """The secrets a Redis URL carries (user-info password, ``password=`` parameters)."""
    try:
        parts = urlsplit(url)
        found = [unquote(parts.password)] if parts.password else []
        found += [
            value
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if "password" in key and value
        ]
    except ValueError:
        return []
    return found


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: SecretStr = Field(validation_alias=_env("DATABASE_URL"))
    cdc_database_url: SecretStr | None = Field(
        default=None, validation_alias=_env("CDC_DATABASE_URL")
    )
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"), validation_alias=_env("REDIS_URL")
    )
    slot: str = Field(default="cdc_cache", validation_alias=_env("CDC_SLOT"))
    publication: str = Field(default="cdc_cache", validation_alias=_env("CDC_PUBLICATION"))
    metrics_addr: str = Field(default="127.0.0.1:9464", validation_alias=_env("CDC_METRICS_ADDR"))
    log_format: Literal["text", "json"] = Field(
        default="text", validation_alias=_env("CDC_LOG_FORMAT")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=_env("CDC_LOG_LEVEL")
    )
    plugin: Literal["pgoutput", "wal2json"] = Field(
        default="pgoutput", validation_alias=_env("CDC_PLUGIN")
    )
    # A transaction with more changes than this is applied in several chunks (contract 7.3).
    batch_max_changes: int = Field(
        default=10_000, ge=1, validation_alias=_env("CDC_BATCH_MAX_CHANGES")
    )
    batch_max_bytes: int = Field(
        default=16 << 20, ge=1, validation_alias=_env("CDC_BATCH_MAX_BYTES")
    )
    # A row bigger than this is not cached (its key is dropped; readers use PostgreSQL).
    max_row_bytes: int = Field(default=1 << 20, ge=1, validation_alias=_env("CDC_MAX_ROW_BYTES"))
    status_interval: float = Field(default=1.0, gt=0, validation_alias=_env("CDC_STATUS_INTERVAL"))
    pg_timeout: float = Field(default=30.0, gt=0, validation_alias=_env("CDC_PG_TIMEOUT"))
    redis_timeout: float = Field(default=5.0, gt=0, validation_alias=_env("CDC_REDIS_TIMEOUT"))
    # After each batch, WAIT for this many Redis replicas before confirming (contract 4).
    redis_min_replicas: int = Field(
        default=0, ge=0, validation_alias=_env("CDC_REDIS_MIN_REPLICAS")
    )
    standby: bool = Field(default=False, validation_alias=_env("CDC_STANDBY"))
    slot_busy_timeout: float = Field(
        default=15.0, ge=0, validation_alias=_env("CDC_SLOT_BUSY_TIMEOUT")
    )
    retry_max: float = Field(default=30.0, gt=0, validation_alias=_env("CDC_RETRY_MAX"))
    schema_poll_interval: float = Field(
        default=0.5, gt=0, validation_alias=_env("CDC_SCHEMA_POLL_INTERVAL")
    )
    observe_interval: float = Field(
        default=2.0, gt=0, validation_alias=_env("CDC_OBSERVE_INTERVAL")
    )
    backfill_chunk: int = Field(default=2_000, ge=1, validation_alias=_env("CDC_BACKFILL_CHUNK"))
    config: str | None = Field(default=None, validation_alias=_env("CDC_CONFIG"))
    change_feed: bool = Field(default=False, validation_alias=_env("CDC_CHANGE_FEED"))
    change_feed_maxlen: int = Field(
        default=100_000, ge=1, validation_alias=_env("CDC_CHANGE_FEED_MAXLEN")
    )
    # Every query of the daemon outside the replication stream (catalog, snapshot, backfill,
    # verify) gives up after these, so none can hang behind a lock or a slow server; a
    # backfill that timed out is tried again later while the stream goes on.
    statement_timeout: float = Field(
        default=30.0, gt=0, validation_alias=_env("CDC_STATEMENT_TIMEOUT")
    )
    lock_timeout: float = Field(default=0.5, gt=0, validation_alias=_env("CDC_LOCK_TIMEOUT"))
    # The slot is gone while Redis has a cache (contract section 4; cdc/failover.py).
    on_slot_loss: Literal["auto", "rebuild", "exit"] = Field(
        default="auto", validation_alias=_env("CDC_ON_SLOT_LOSS")
    )
    # Streamed in-progress transactions (PostgreSQL 14+): memory for their changes until
    # commit, then spill files in the state directory (default: the system's temp dir).
    stream_memory: int = Field(default=4 << 20, ge=0, validation_alias=_env("CDC_STREAM_MEMORY"))
    state_dir: str = Field(default="", validation_alias=_env("CDC_STATE_DIR"))

    @field_validator("slot", "publication")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a lower-case identifier (letters, digits, underscore)")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port")
        return value

    # -- derived ------------------------------------------------------------------------------

    def tables(self) -> tuple[TrackedTable, ...]:
        """The tables the cache declares (``CDC_CONFIG``, else the packaged default)."""
        from schema.config import CacheConfigError, load_tables

        try:
            return load_tables(self.config)
        except CacheConfigError as exc:
            raise ConfigError(f"CDC_CONFIG: {exc}") from None

    @property
    def dsn(self) -> Dsn:
        """The daemon's PostgreSQL connection (``CDC_DATABASE_URL`` or ``DATABASE_URL``)."""
        if self.cdc_database_url is not None:
            return parse_dsn(self.cdc_database_url.get_secret_value(), "CDC_DATABASE_URL")
        return parse_dsn(self.database_url.get_secret_value(), "DATABASE_URL")

    @property
    def replication_conninfo(self) -> str:
        """The daemon's libpq keyword DSN (contains the password: never print it)."""
        return self.dsn.conninfo

    @property
    def catalog_conninfo(self) -> str:
        """The daemon's DSN for ordinary (non-replication) sessions: catalog, snapshot,
        backfill and verify queries, with ``statement_timeout`` and ``lock_timeout``."""
        dsn = self.dsn
        timeouts = (
            f"-c statement_timeout={max(1, round(self.statement_timeout * 1000))}"
            f" -c lock_timeout={max(1, round(self.lock_timeout * 1000))}"
        )
        options = " ".join(o for o in (dsn.params.get("options", ""), timeouts) if o)
        return dsn.with_params(options=options).conninfo

    @property
    def redis(self) -> str:
        return self.redis_url.get_secret_value()

    @property
    def metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only if asked for

    def describe(self) -> dict[str, object]:
        """The settings without secrets (for the startup log line)."""
        return {
            "database": self.dsn.describe(),
            "redis": describe_redis_url(self.redis),
            "slot": self.slot,
            "publication": self.publication,
            "plugin": self.plugin,
            "metrics": self.metrics_addr,
            "batch_max_changes": self.batch_max_changes,
            "config": self.config or "default",
            "change_feed": self.change_feed,
        }

    def postgres_urls(self) -> list[tuple[str, str]]:
        """(variable, value) of each PostgreSQL connection string that is set."""
        urls = [("DATABASE_URL", self.database_url.get_secret_value())]
        if self.cdc_database_url is not None:
            urls.append(("CDC_DATABASE_URL", self.cdc_database_url.get_secret_value()))
        return urls

    def secrets(self) -> list[str]:
        """Every secret the configuration carries, to be masked wherever text is printed."""
        found: list[str] = []
        for name, value in self.postgres_urls():
            with contextlib.suppress(DsnError):
                found += parse_dsn(value, name).secrets
        found += redis_secrets(self.redis)
        found += environment_secrets(os.environ)
        return found


_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "cdc_database_url": "CDC_DATABASE_URL",
    "redis_url": "REDIS_URL",
}


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, or a :class:`ConfigError` naming the bad variable."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        name = _ENV_NAMES.get(field, "CDC_" + field.upper())
        if first["type"] == "missing":
            raise ConfigError(f"{name} is not set") from None
        raise ConfigError(f"{name}: {first['msg']}") from None
    if not settings.database_url.get_secret_value().strip():
        raise ConfigError("DATABASE_URL is not set")
    for name, value in settings.postgres_urls():
        try:
            parse_dsn(value, name)
        except DsnError as exc:
            raise ConfigError(str(exc)) from None
    _check_redis_url(settings.redis)
    return settings


def describe_redis_url(url: str) -> str:
    """Where ``url`` points, without password or query (safe for logs)."""
    try:
        return RedisTarget.parse(url).describe()
    except ValueError:
        return "<invalid REDIS_URL>"


def _check_redis_url(url: str) -> None:
    try:
        RedisTarget.parse(url)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL is not valid: {exc}") from None
