"""``--poll-interval``: keep the served models in step with the repository directory.

Every interval the poller fingerprints each model directory (every file's relative path,
size and modification time, and where each symlink points) and compares with what it saw:
a new model directory is loaded, a removed one unloaded, a changed one reloaded. A change is
acted on once it has held still for one whole interval, so a model being copied in is not
loaded half-written. Loads go through ``Repository.load`` like the RPCs do: the new version
is built before it replaces the old one, and new files that fail keep the old version
serving (RepositoryIndex says why). A model unloaded by RPC stays unloaded until its files
change. Hidden files and directories (``.name``) are ignored, like editors' swap files.
While a writer holds the repository's write lock (``writelock.py``) no round runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tensorgate.errors import TensorgateError

from .repository import Repository, walk_tree
from .writelock import WriteState, write_state

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, str, int, int], ...]
_GONE: Fingerprint | None = None


def fingerprint(directory: Path, root: Path) -> Fingerprint:
    """(relative path, symlink target or "", size, mtime in ns) of every file and directory
    under ``directory``, following symlinks only while they stay inside ``root``."""
    entries: list[tuple[str, str, int, int]] = []
    for path in walk_tree(directory, root):
        target = os.readlink(path) if os.path.islink(path) else ""
        try:
            st = os.stat(path)
        except OSError:  # a dangling symlink, or removed while we looked
            entries.append((os.path.relpath(path, directory), target, -1, -1))
            continue
        size = st.st_size if not os.path.isdir(path) else 0
        entries.append((os.path.relpath(path, directory), target, size, st.st_mtime_ns))
    return tuple(entries)


class RepositoryPoller:
    """Polls ``repository`` every ``interval`` seconds; ``changed`` runs after each change."""

    def __init__(
        self,
        repository: Repository,
        interval: float,
        changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"poll interval must be positive, not {interval}")
        self.repository = repository
        self.interval = interval
        self._changed = changed
        self._known: dict[str, Fingerprint] = {}

    def snapshot(self) -> dict[str, Fingerprint]:
        root = self.repository.root
        out: dict[str, Fingerprint] = {}
        for name in self.repository.scan():
            try:
                out[name] = fingerprint(root / name, root)
            except OSError as e:  # removed while we looked: next time
                log.debug("cannot fingerprint %s: %s", name, e)
        return out

    def prime(self) -> None:
        """Record the directory as it is before the start-up load, which loads exactly that."""
        self._known = self.snapshot()

    async def run(self) -> None:
        """Poll until cancelled."""
        pending: dict[str, Fingerprint | None] = {}  # seen changed once, waiting to settle
        while True:
            await asyncio.sleep(self.interval)
            state = write_state(self.repository.root)
            if state is not WriteState.NONE:  # half-written files: look again when whole
                log.debug("poll: skipped, the repository's write lock says %s", state)
                continue
            try:
                current = await asyncio.to_thread(self.snapshot)
            except TensorgateError as e:  # the repository directory itself went away
                log.error("polling the repository: %s", e)
                continue
            names = sorted(set(current) | set(self._known))
            acted = False
            for name in names:
                now = current.get(name, _GONE)
                if now == self._known.get(name, _GONE):
                    pending.pop(name, None)
                    continue
                if name not in pending or pending[name] != now:
                    pending[name] = now  # changed since the last look: let it settle
                    continue
                del pending[name]
                await self._apply(name, now)
                acted = True
            if acted and self._changed is not None:
                await self._changed()

    async def _apply(self, name: str, now: Fingerprint | None) -> None:
        repo = self.repository
        if now is None:
            self._known.pop(name, None)
            if name in repo.models:
                log.info("poll: model directory %s removed: unloading it", name)
                await repo.unload(name)
            return
        self._known[name] = now
        verb = "reloading" if name in repo.models else "loading"
        log.info("poll: model directory %s changed: %s it", name, verb)
        try:
            model = await repo.load(name)
        except TensorgateError as e:  # recorded on the model (RepositoryIndex) and logged
            log.error("poll: %s", e)
            return
        if not model.ready:
            log.error("poll: model %s did not load: %s", name, model.reason or "see its variants")
