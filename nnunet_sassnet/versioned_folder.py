"""A folder that several processes read while one of them replaces it: versions, a writer lock and leases.

``PATH`` is a symbolic link to ``PATH_versions/<version>``. Whoever (re)builds the content holds the writer lock
(``fcntl.flock`` on ``PATH.lock``); the others wait for it. A new version is built in a ``.tmp_*`` folder beside
the versions and published by replacing the link in one ``rename``, so a reader sees the old version or the new
one, never a half-written one. A reader holds a lease (a shared ``flock`` on ``PATH_versions/<version>.lease``)
for as long as it reads; a version that is not current is deleted only once no lease is held on it. The kernel
drops a process's locks when it ends, however it ends (``SIGKILL`` included), so neither a lock nor a lease
outlives its owner, and a ``.tmp_*`` folder found while holding the writer lock belongs to a run that is gone.

POSIX only (``fcntl``); works on local file systems and NFS (where Linux maps ``flock`` to NFS locks).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Callable, Iterator

from nnunet_sassnet.errors import UserInputError

__all__ = ["VersionedFolder", "Lease", "TMP_PREFIX"]

#: prefix of the folders (and links) under construction; one found under the writer lock is an orphan
TMP_PREFIX = ".tmp_"
_LEASE_SUFFIX = ".lease"


def _fcntl():
    try:
        import fcntl
    except ImportError as e:  # Windows
        raise OSError("file locks (fcntl) are not available on this platform; nnunet_sassnet's unlabeled data "
                      "needs a POSIX system (Linux, macOS)") from e
    return fcntl


class Lease:
    """A shared lock on one version: while it is held, the version is not deleted."""

    def __init__(self, folder: str, handle) -> None:
        self.folder = folder
        self._handle = handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Give the version up (closing the file drops the lock)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class VersionedFolder:
    """``path`` as a link to its current version, with a writer lock and leases (see the module)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.versions_dir = self.path + "_versions"
        self.lock_file = self.path + ".lock"

    # ---- the writer lock ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer_lock(self, on_wait: Callable[[str], None] | None = None, blocking: bool = True
                    ) -> Iterator[bool]:
        """Hold the writer lock; yields True, or False at once when ``blocking`` is False and it is taken.

        Before waiting, ``on_wait`` gets a sentence naming the holder (its pid and host, as it wrote them).
        """
        fcntl = _fcntl()
        os.makedirs(os.path.dirname(self.lock_file), exist_ok=True)
        try:
            # "a+": opening must not erase the holder's note, which a waiting process reads
            handle = open(self.lock_file, "a+")
        except OSError as e:
            raise UserInputError(f"{self.lock_file}: cannot be created ({e.strerror}); the folder must be writable "
                                 f"by every run that uses {os.path.basename(self.path)}: they coordinate through "
                                 f"this lock file") from e
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if on_wait is not None:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    on_wait(f"{holder} is preparing {self.path}; waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
            handle.flush()
            try:
                yield True
            finally:
                handle.seek(0)
                handle.truncate()
                handle.flush()
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- versions (call these under the writer lock) ----------------------------------------------------------
    def current(self) -> str | None:
        """The current version's folder, or None when there is none yet."""
        if not os.path.islink(self.path):
            return None
        target = os.path.realpath(self.path)
        return target if os.path.isdir(target) else None

    def adopt_plain_folder(self) -> str | None:
        """Turn a plain folder at ``path`` (written without versions) into a version; return its folder."""
        if os.path.islink(self.path) or not os.path.isdir(self.path):
            return None
        os.makedirs(self.versions_dir, exist_ok=True)
        target = tempfile.mkdtemp(prefix="adopted_", dir=self.versions_dir)
        os.rmdir(target)
        os.rename(self.path, target)
        self._point_to(target)
        return target

    def new_build_folder(self) -> str:
        """An empty ``.tmp_*`` folder to build a version in (published by :meth:`publish`)."""
        os.makedirs(self.versions_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.versions_dir)

    def publish(self, build_folder: str, name_prefix: str) -> str:
        """Make ``build_folder`` the current version (named ``<name_prefix>_<random>``); return its folder."""
        # the build folder's random part keeps names unique, also for a rebuild of the same content
        name = f"{name_prefix}_{os.path.basename(build_folder)[len(TMP_PREFIX):]}"
        final = os.path.join(self.versions_dir, name)
        os.rename(build_folder, final)
        self._point_to(final)
        return final

    def _point_to(self, folder: str) -> None:
        link = os.path.join(self.versions_dir, f"{TMP_PREFIX}link_{os.getpid()}")
        if os.path.lexists(link):
            os.unlink(link)
        # relative, so that the preprocessed tree can be moved or mounted elsewhere
        os.symlink(os.path.relpath(folder, os.path.dirname(self.path)), link)
        os.replace(link, self.path)  # one rename: readers resolve the old target or the new one

    def lease(self, folder: str) -> Lease:
        """A shared lock on the version ``folder`` (call under the writer lock, which deletion also takes)."""
        fcntl = _fcntl()
        handle = open(folder.rstrip(os.sep) + _LEASE_SUFFIX, "a")
        fcntl.flock(handle, fcntl.LOCK_SH)
        return Lease(folder, handle)

    def remove_unused(self) -> tuple[list[str], list[str]]:
        """Delete orphaned ``.tmp_*`` folders and the old versions nobody leases; return both lists of names."""
        fcntl = _fcntl()
        if not os.path.isdir(self.versions_dir):
            return [], []
        current = self.current()
        orphans, removed = [], []
        for name in sorted(os.listdir(self.versions_dir)):
            path = os.path.join(self.versions_dir, name)
            if name.startswith(TMP_PREFIX):
                # under the writer lock nobody builds: its builder was killed
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path, ignore_errors=True)
                    orphans.append(name)
                continue
            if name.endswith(_LEASE_SUFFIX):
                if not os.path.isdir(path[:-len(_LEASE_SUFFIX)]):
                    # its version is gone (removed by hand, or just above with its lease file)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            if not os.path.isdir(path) or (current is not None and os.path.samefile(path, current)):
                continue
            with open(path + _LEASE_SUFFIX, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a run still reads it
                shutil.rmtree(path, ignore_errors=True)
                os.unlink(path + _LEASE_SUFFIX)
                removed.append(name)
        return orphans, removed
