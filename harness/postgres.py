"""A throwaway PostgreSQL cluster on a Unix socket in a folder of its own, for the tests and the
benchmarks that run the app on Postgres (`--db postgresql://...`).

Debian's `postgresql` package provides the server binaries (`make postgres` installs it). The
cluster listens on no TCP port at all: its socket lives in the cluster's folder, so two runs
never meet and nothing outside the machine can reach it. Postgres refuses to run as root; as
root the cluster belongs to the `postgres` system user the package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

DATABASE = "assistant"


def server_binaries() -> Path | None:
    """The folder of Debian's newest installed server (pg_ctl, initdb), or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_major, reverse=True)
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


@dataclass
class PostgresCluster:
    """`initdb` + `pg_ctl start` in `root`; `url` names database `assistant` over the socket."""

    root: Path
    user: str = "postgres"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.data = self.root / "data"
        # a Unix socket's path has at most 107 bytes: a short folder of its own, not in `root`
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
        self.log = self.root / "postgres.log"
        bins = server_binaries()
        if bins is None:
            raise RuntimeError(
                "PostgreSQL's server is not installed: `make postgres` (Debian: apt-get install "
                "postgresql) provides initdb and pg_ctl"
            )
        self.bin = bins

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{self.user}@{host}/{name}"

    def start(self) -> PostgresCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.root, self.socket_dir)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--no-instructions"]
            )  # fmt: skip
        self.restart_server()
        self.create_database(DATABASE)
        return self

    def restart_server(self) -> None:
        """Start the server (again, after `stop_server`) on the same folder and socket."""
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c fsync=on -c synchronous_commit=on -c max_connections=200"
        )
        self._run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
             "-t", "60", "-o", options, "start"]
        )  # fmt: skip

    def stop_server(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast` (or `immediate`: as if the machine lost power)."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.database_url("postgres"), autocommit=True) as con:
            exists = con.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if not exists:
                con.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.database_url("postgres"), autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server and remove the cluster's folder."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop_server("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _own(self, *paths: Path) -> None:
        if self._as_root():
            account = pwd.getpwnam("postgres")
            for path in paths:
                os.chown(path, account.pw_uid, account.pw_gid)
            # the server's user must be able to reach its folder through its parents
            parent = self.root.parent
            while parent != parent.parent:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                parent = parent.parent

    def _run(self, argv: list[str]) -> None:
        if self._as_root():
            argv = ["runuser", "-u", "postgres", "--", *argv]
        for attempt in range(3):
            result = subprocess.run(argv, capture_output=True, text=True, cwd="/")
            if result.returncode == 0:
                return
            if attempt < 2 and "lock file" in result.stderr:
                time.sleep(1)
                continue
            raise subprocess.CalledProcessError(
                result.returncode, argv, result.stdout, result.stderr + self._log_tail()
            )

    def _log_tail(self) -> str:
        try:
            return "\n" + self.log.read_text()[-2000:]
        except OSError:
            return ""
