"""Connection strings in every form libpq takes, and their passwords never printed.

Reliability "Bad input": keyword DSN, URL with ``?password=``, multi-host, ``PGPASSWORD``,
``.pgpass``/``passfile``, service files, the SQLAlchemy forms; valid or not, the password
appears nowhere: logs at debug level in both formats, one-line errors, metrics,
``--help``, ``cdc slot status``, ``cdc verify``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc.telemetry import logs
from devstack.servers import free_port
from schema.dsn import DsnError, parse_dsn
from tests.helpers import ROOT, Daemon, assert_converged, running
from tests.plugins.servers import PostgresEndpoint
from writer.db import InvalidDatabaseUrl, normalize_conninfo

PW = "S3cr3t-pw-xyz"
ODD_PW = "S3cr3t/pw:x@y z'q"  # needs percent-encoding in a URL and quoting in a DSN
WRONG_PW = "Wr0ng-pw-qrs"


def _dsn_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- the normaliser, without servers ----------------------------------------------------------


@pytest.mark.parametrize("password", [PW, ODD_PW])
@pytest.mark.parametrize(
    "template",
    [
        "postgresql://cdc:{url_pw}@db.example:5432/support",
        "postgres://cdc:{url_pw}@db.example/support?sslmode=prefer",
        "postgresql://cdc@db.example/support?password={url_pw}",
        "postgresql://cdc:decoy@db.example/support?password={url_pw}",
        "postgresql://cdc:{url_pw}@a.example:5432,b.example:5433/support"
        "?target_session_attrs=read-write",
        "host=db.example port=5432 dbname=support user=cdc password={dsn_pw}",
        "host=a.example,b.example port=5432,5433 dbname=support user=cdc password={dsn_pw}"
        " target_session_attrs=read-write",
        "postgresql+psycopg://cdc:{url_pw}@db.example/support",
        "postgresql+asyncpg://cdc:{url_pw}@db.example/support",
    ],
)
def test_every_form_parses_and_describes_without_the_password(template: str, password: str) -> None:
    text = template.format(url_pw=quote(password, safe=""), dsn_pw=_dsn_quote(password))
    dsn = parse_dsn(text)
    assert conninfo_to_dict(dsn.conninfo)["password"] == password
    assert conninfo_to_dict(dsn.conninfo)["dbname"] == "support"
    for shown in (dsn.describe(), str(dsn), repr(dsn)):
        assert password not in shown
        assert quote(password, safe="") not in shown
    assert conninfo_to_dict(normalize_conninfo(text))["password"] == password
    assert "password=***" in dsn.describe()
    assert password in dsn.secrets


@pytest.mark.parametrize(
    "text",
    [
        "service=cdc",
        "dbname=support",
        "postgresql:///support?host=/var/run/postgresql",
        "host=db.example user=cdc passfile=/etc/cdc/pgpass dbname=support",
    ],
)
def test_forms_without_a_password_leave_it_to_libpq(text: str) -> None:
    dsn = parse_dsn(text)
    assert "password" not in dsn.params
    assert conninfo_to_dict(dsn.conninfo) == conninfo_to_dict(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"host=db.example password{PW}", "a word without '='"),
        (f"host=db.example password='{PW}", "unterminated quoted value"),
        (f"host=db.example password={PW} nonsense={PW}", "does not know"),
        (f"postgresql://cdc:{PW}@db.example/support?{PW}=1", "does not know"),
        (f"postgresql://cdc:{PW}@db.example:port{PW}/support", "port"),
        (f"mysql://root:{PW}@db.example/support", "must be a postgresql:// URL"),
        (f"postgresql+asyncpg://cdc:{PW}@db.example/x?prepared_statement_cache_size=0", "asyncpg"),
        (f"postgresql+asyncpg://cdc:{PW}@db.example/x?ssl=require", "asyncpg-only"),
        (f"host=a,b,c port=1,2 password={PW}", "3 hosts but 2 ports"),
    ],
)
def test_invalid_strings_are_refused_without_echoing_them(text: str, expected: str) -> None:
    with pytest.raises(DsnError) as caught:
        parse_dsn(text, "CDC_DATABASE_URL")
    message = str(caught.value)
    assert message.startswith("CDC_DATABASE_URL")
    assert expected in message
    assert PW not in message
    assert "\n" not in message
    with pytest.raises(InvalidDatabaseUrl) as writer_error:
        normalize_conninfo(text)
    assert PW not in str(writer_error.value)


def test_scrub_masks_every_encoding_of_a_secret() -> None:
    logs.set_secrets([ODD_PW])
    try:
        assert logs.scrub(f"x {ODD_PW} y") == "x *** y"
        assert logs.scrub(f"x {quote(ODD_PW, safe='')} y") == "x *** y"
    finally:
        logs.set_secrets([])


# -- the real commands, against the test servers -----------------------------------------------


@pytest.fixture
def secret_role(postgres: PostgresEndpoint, database_name: str) -> Iterator[str]:
    """A role with LOGIN REPLICATION and the daemon's grants, password ``PW``."""
    role = f"s_{uuid.uuid4().hex[:10]}"
    subprocess.run(
        [
            "psql",
            "-q",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"role={role}",
            "-v",
            f"password='{PW}'",
            "-d",
            postgres.url(database_name),
        ],
        input=(ROOT / "docker" / "grants" / "10-cdc-daemon.sql").read_bytes(),
        check=True,
        capture_output=True,
    )
    yield role
    with psycopg.connect(postgres.url(database_name), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def _port(postgres: PostgresEndpoint) -> int:
    return int(str(conninfo_to_dict(postgres.admin_url)["port"]))


FORMS = [
    "url",
    "url-query-password",
    "keyword",
    "multi-host",
    "multi-host-url",
    "pgpassword",
    "passfile",
    "pgpassfile",
    "service",
    "sqlalchemy-psycopg",
    "sqlalchemy-asyncpg",
]


def _form(
    form: str, role: str, postgres: PostgresEndpoint, dbname: str, tmp_path: Path
) -> tuple[str, dict[str, str]]:
    """(DATABASE_URL, extra environment) for ``form``, logging in as ``role`` with ``PW``."""
    port = _port(postgres)
    closed = 1  # nothing listens on port 1: the first host of a multi-host list fails
    base = f"host=127.0.0.1 port={port} dbname={dbname} user={role}"
    if form == "url":
        return f"postgresql://{role}:{PW}@127.0.0.1:{port}/{dbname}", {}
    if form == "url-query-password":
        return f"postgresql://{role}@127.0.0.1:{port}/{dbname}?password={PW}&sslmode=disable", {}
    if form == "keyword":
        return f"{base} password={PW} application_name=secrets", {}
    if form == "multi-host":
        return (
            f"host=127.0.0.1,127.0.0.1 port={closed},{port} dbname={dbname} user={role}"
            f" password={PW} target_session_attrs=read-write connect_timeout=5",
            {},
        )
    if form == "multi-host-url":
        return (
            f"postgresql://{role}:{PW}@127.0.0.1:{closed},127.0.0.1:{port}/{dbname}"
            "?target_session_attrs=read-write",
            {},
        )
    if form == "pgpassword":
        return base, {"PGPASSWORD": PW}
    if form in ("passfile", "pgpassfile"):
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{port}:{dbname}:{role}:{PW}\n")
        passfile.chmod(0o600)
        if form == "passfile":
            return f"{base} passfile={passfile}", {}
        return base, {"PGPASSFILE": str(passfile)}
    if form == "service":
        services = tmp_path / "pg_service.conf"
        services.write_text(
            f"[cdcsvc]\nhost=127.0.0.1\nport={port}\ndbname={dbname}\nuser={role}\npassword={PW}\n"
        )
        return "service=cdcsvc", {"PGSERVICEFILE": str(services)}
    if form == "sqlalchemy-psycopg":
        return f"postgresql+psycopg://{role}:{PW}@127.0.0.1:{port}/{dbname}", {}
    if form == "sqlalchemy-asyncpg":
        return f"postgresql+asyncpg://{role}:{PW}@127.0.0.1:{port}/{dbname}", {}
    raise AssertionError(form)


def _cdc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "PG"))}
    base.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_no_secret(text: str, where: str) -> None:
    for form in (PW, quote(PW, safe="")):
        assert form not in text, f"the password appears in {where}:\n{text}"


@pytest.mark.parametrize(
    ("form", "log_format"),
    [(form, "json") for form in FORMS] + [(form, "text") for form in ("url", "keyword", "service")],
)
def test_the_daemon_and_commands_run_with_every_form_and_never_print_the_password(
    form: str,
    log_format: str,
    secret_role: str,
    postgres: PostgresEndpoint,
    database_name: str,
    database_url: str,
    redis_url: str,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    url, extra = _form(form, secret_role, postgres, database_name, tmp_path)
    env = {"DATABASE_URL": url, "CDC_LOG_FORMAT": log_format, "CDC_LOG_LEVEL": "debug", **extra}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tickets (id, title) VALUES ('s-1', 'before the daemon')")
    daemon = make_daemon(**env)
    with running(daemon):
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO tickets (id, title) VALUES ('s-2', 'while streaming')")
        assert_converged(database_url, redis_url)
        _status, metrics = daemon.http("/metrics")
        _assert_no_secret(metrics, "the metrics")
        cli_env = {
            **env,
            "REDIS_URL": redis_url,
            "CDC_SLOT": daemon.slot,
        }
        for args in (
            ("slot", "status"),
            ("slot", "status", "--json"),
            ("verify",),
            ("verify", "--json"),
            ("--help",),
            ("run", "--help"),
        ):
            done = _cdc(cli_env, *args)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            _assert_no_secret(done.stdout + done.stderr, f"cdc {' '.join(args)}")
    log = daemon.log()
    assert '"starting"' in log or "starting" in log
    _assert_no_secret(log, "the daemon's log")


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(
    "bad",
    [
        f"host=127.0.0.1 password{PW}",
        f"host=127.0.0.1 password='{PW}",
        f"host=127.0.0.1 password={PW} bogus_option={PW}",
        f"postgresql://u:{PW}@127.0.0.1:notaport/x",
        f"postgresql://u:{PW}@127.0.0.1/x?bogus={PW}",
        f"mysql://u:{PW}@127.0.0.1/x",
        f"postgresql+asyncpg://u:{PW}@127.0.0.1/x?command_timeout=5",
    ],
)
def test_an_invalid_string_is_refused_in_one_line_without_the_password(
    bad: str, log_format: str, redis_url: str
) -> None:
    for variable in ("DATABASE_URL", "CDC_DATABASE_URL"):
        env = {
            "DATABASE_URL": "dbname=x",
            variable: bad,
            "REDIS_URL": redis_url,
            "CDC_LOG_FORMAT": log_format,
            "CDC_LOG_LEVEL": "debug",
        }
        done = _cdc(env, "run")
        assert done.returncode == 2, done.stderr
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"cdc: {variable}"), lines
        _assert_no_secret(done.stdout + done.stderr, "the refusal")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_wrong_password_is_refused_without_printing_either(
    log_format: str,
    secret_role: str,
    postgres: PostgresEndpoint,
    database_name: str,
    redis_url: str,
) -> None:
    port = _port(postgres)
    for url in (
        f"host=127.0.0.1 port={port} dbname={database_name} user={secret_role} password={WRONG_PW}",
        f"postgresql://{secret_role}@127.0.0.1:{port}/{database_name}?password={WRONG_PW}",
    ):
        env = {
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "CDC_LOG_FORMAT": log_format,
            "CDC_LOG_LEVEL": "debug",
            # Not the default port: another daemon on this machine may hold it.
            "CDC_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        }
        for args in (("run",), ("slot", "status"), ("verify",)):
            done = _cdc(env, *args)
            output = done.stdout + done.stderr
            assert done.returncode == 2, output
            assert "password authentication failed" in output
            assert WRONG_PW not in output
            assert quote(WRONG_PW, safe="") not in output
            assert "Traceback" not in output


def test_redis_passwords_are_never_shown(
    make_daemon: Callable[..., Daemon], database_url: str, tmp_path: Path
) -> None:
    from devstack.servers import RedisServer

    redis_pw = "R3dis-pw-xyz"
    server = RedisServer(tmp_path / "acl")
    with server.running():
        import redis

        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "cdc",
            enabled=True,
            passwords=[f"+{redis_pw}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        admin.close()
        good = f"redis://cdc:{redis_pw}@127.0.0.1:{server.port}/0"
        daemon = make_daemon(REDIS_URL=good, CDC_LOG_LEVEL="debug")
        with running(daemon):
            assert_converged(database_url, good)
            _status, metrics = daemon.http("/metrics")
            assert redis_pw not in metrics
        assert redis_pw not in daemon.log()
        assert "redis://cdc@127.0.0.1" in daemon.log()  # where it points, not the password
        for wrong in (
            f"redis://cdc:{redis_pw}-wrong@127.0.0.1:{server.port}/0",
            f"redis://cdc:{redis_pw}@127.0.0.1:{server.port}/0?socket_timeout=x{redis_pw}",
            f"redis://cdc:{redis_pw}@127.0.0.1:notaport/0",
            f"http://cdc:{redis_pw}@127.0.0.1:{server.port}/0",
        ):
            done = _cdc({"DATABASE_URL": database_url, "REDIS_URL": wrong}, "run")
            assert done.returncode == 2, done.stderr
            assert redis_pw not in done.stdout + done.stderr


# -- the same normaliser in the migrations and the writer -------------------------------------


def test_migrations_and_the_writer_take_a_keyword_dsn_and_pgpassword(
    postgres: PostgresEndpoint, empty_database_url: str, tmp_path: Path
) -> None:
    from writer import Writer

    params = conninfo_to_dict(empty_database_url)
    keyword = (
        f"host={params['host']} port={params['port']} dbname={params['dbname']}"
        f" user={params['user']}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "PG", "DATABASE_URL"))}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": keyword, "PGPASSWORD": str(params["password"])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert str(params["password"]) not in done.stdout + done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": f"{keyword} password='{PW}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert "unterminated quoted value" in refused.stderr
    assert PW not in refused.stdout + refused.stderr
    with Writer.connect(f"{keyword} password={params['password']}") as writer:
        written = writer.create_ticket({"title": "through a keyword DSN"})
        assert written.token
    with Writer.connect("postgresql+asyncpg://" + empty_database_url.split("://", 1)[1]) as writer:
        assert writer.create_ticket({"title": "through the asyncpg form"}).token
