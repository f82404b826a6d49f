"""Folders and files that hold users' chats, private to the app's user whatever the umask.

The database, DuckDB's WAL beside it, the vote journal and exports hold transcripts and session
hashes. Their folder is made 0700 and the files 0600 by `chmod`, so neither the process umask nor
a file that existed with wider rights decides it. DuckDB creates its WAL afresh after every
checkpoint with the umask's mode; the private folder is what keeps that one from other users.
An operator who wants a group to read them must grant it after the app made them (a default ACL
on the folder does not widen a file created 0600: the mode caps the ACL's mask).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from storage.errors import StoreError

log = logging.getLogger(__name__)

FOLDER_MODE = 0o700
FILE_MODE = 0o600


def private_folder(path: Path, *, ours: bool = False) -> Path:
    """Create `path` (and its parents) if needed, 0700. An existing folder is made 0700 only when
    it is `ours` (the data directory), owned by this user and not a shared one (sticky, as /tmp);
    otherwise a folder open to other users is left as it is and the log says how to close it."""
    created = not path.exists()
    try:
        path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise StoreError(
            f"cannot create the folder {path}: {exc.strerror}. Pass --data-dir (or --db) with a "
            "writable path."
        ) from exc
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return path
    if created or (ours and info.st_uid == os.geteuid() and not mode & stat.S_ISVTX):
        try:
            os.chmod(path, FOLDER_MODE)
        except OSError as exc:  # a read-only file system: opening the database says so
            log.warning("cannot make %s private: %s", path, exc)
        else:
            if not created:
                log.warning("made %s private (%o -> 700): it holds users' chats", path, mode)
    else:
        log.warning(
            "%s is open to other users (mode %o) and holds users' chats (the database's WAL is "
            "created with the umask's mode): run `chmod 700 %s`, or put the database in a "
            "folder of its own", path, mode, path,
        )  # fmt: skip
    return path


def private_file(path: Path) -> None:
    """Make an existing file 0600 (the log says so when it cannot)."""
    try:
        os.chmod(path, FILE_MODE)
    except OSError as exc:
        log.warning("cannot make %s private (mode 600): %s", path, exc)


def private_fd(path: Path, flags: int) -> int:
    """`os.open(path, flags | O_CREAT)`, the file 0600 even if it existed with wider rights."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
