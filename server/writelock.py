"""The write lock of a model repository: the file ``ROOT/.tensorgate-writing``.

A tool that writes a repository in place (``tensorgate demo DIR``, where DIR may be a
mount point that cannot be renamed onto) holds the lock for the whole write: the file
exists, with an exclusive flock(2) on it, from before the first model file is written
until after the last one; the writer deletes it while still holding the lock. So a server
never reads half a repository:

- start-up waits (health NOT_SERVING) until the lock is gone, then loads;
- ``--poll-interval`` skips its rounds while the lock is there;
- ``RepositoryModelLoad`` answers UNAVAILABLE meanwhile.

A lock file that nobody holds was left by a writer that died (killed, out of memory): an
interrupted write. A server refuses to start on it; running the writer again clears it.
Any tool can take part, e.g. ``flock ROOT/.tensorgate-writing sh -c 'cp -r NEW/. ROOT
&& rm ROOT/.tensorgate-writing'`` (the file is removed while the lock is held).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import grpc

from tensorgate.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

LOCK_FILE = ".tensorgate-writing"


class WriteState(StrEnum):
    NONE = "none"  # no writer: the repository is whole
    WRITING = "writing"  # a live writer holds the lock
    INTERRUPTED = "interrupted"  # the lock file is there but its writer is gone


class BeingWritten(Unavailable):
    """The repository is being written; retry once the writer is done."""


class InterruptedWrite(ConfigError):
    """A writer died half-way: the repository holds part of what it was writing."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, root: Path) -> None:
        super().__init__(
            f"model repository {root} holds an interrupted write: {root / LOCK_FILE} exists "
            "but no process holds its lock. Run the writer again (e.g. `tensorgate demo "
            f"{root}`, which clears it), or check the files and delete {LOCK_FILE}"
        )


def write_state(root: Path) -> WriteState:
    """Whether ``root`` is being written now (without waiting)."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return WriteState.NONE
    except PermissionError:  # it exists, so something writes or wrote: do not read yet
        return WriteState.WRITING
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return WriteState.WRITING
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:  # the writer finished while we looked
            return WriteState.NONE
        if current != os.fstat(fd).st_ino:  # a new writer took over meanwhile
            return WriteState.WRITING
        return WriteState.INTERRUPTED
    finally:
        os.close(fd)


def check_not_written(root: Path) -> None:
    """Raise ``BeingWritten`` or ``InterruptedWrite`` unless ``root`` is whole."""
    state = write_state(root)
    if state is WriteState.WRITING:
        raise BeingWritten(
            f"model repository {root} is being written ({LOCK_FILE} is locked): retry once "
            "the writer is done"
        )
    if state is WriteState.INTERRUPTED:
        raise InterruptedWrite(root)


async def wait_until_written(root: Path, every: float = 0.25) -> None:
    """Return once no writer holds ``root``'s lock; raise ``InterruptedWrite`` if one died."""
    waiting = False
    while (state := write_state(root)) is WriteState.WRITING:
        if not waiting:
            log.info("model repository %s is being written: waiting for the writer", root)
            waiting = True
        await asyncio.sleep(every)
    if state is WriteState.INTERRUPTED:
        raise InterruptedWrite(root)
    if waiting:
        log.info("model repository %s is written: loading it", root)


@contextlib.contextmanager
def holding(root: Path) -> Iterator[bool]:
    """Hold ``root``'s write lock, waiting while another writer holds it. Yields whether
    the previous writer was interrupted (its partial files are still there, for this one
    to clear). The lock file is deleted when the block exits normally; when it raises, the
    lock file stays, and the repository reads as an interrupted write until a writer runs
    again."""
    path = root / LOCK_FILE
    fd, interrupted = _acquire(path)
    try:
        yield interrupted
        path.unlink()
    finally:
        os.close(fd)


def _acquire(path: Path) -> tuple[int, bool]:
    while True:
        # Create and lock it under a private name, then link it into place: the lock file
        # is never visible unlocked while its writer lives.
        mine = path.with_name(f"{LOCK_FILE}.{secrets.token_hex(4)}")
        fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: servers of any uid must read it
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.link(mine, path)
            return fd, False
        except FileExistsError:  # another writer's, live or dead
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
        finally:
            mine.unlink(missing_ok=True)
        existing = _lock_existing(path)
        if existing is not None:
            return existing, True


def _lock_existing(path: Path) -> int | None:
    """Lock the lock file another writer made, waiting while that writer lives. The file
    descriptor when the file is still in place (so its writer died), or None when that
    writer finished and deleted it meanwhile."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None
