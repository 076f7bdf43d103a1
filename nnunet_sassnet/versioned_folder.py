"""A folder that several processes read while one of them replaces it: versions, a writer lock and leases.

``PATH`` is a symbolic link to ``PATH_versions/<version>``. Whoever (re)builds the content holds the writer lock
(``fcntl.flock`` on ``PATH.lock``); the others wait for it. A new version is built in a ``.tmp_*`` folder beside
the versions and published by replacing the link in one ``rename``, so a reader sees the old version or the new
one, never a half-written one. A reader holds a lease (a shared ``flock`` on ``PATH_versions/<version>.lease``)
for as long as it reads; a version that is not current is deleted only once no lease is held on it. The kernel
drops a process's locks when it ends, however it ends (``SIGKILL`` included), so neither a lock nor a lease
outlives its owner, and a ``.tmp_*`` folder found while holding the writer lock belongs to a run that is gone.

A lease file is made with its version and never again: a run holding a lease on a lease file that was deleted by
hand holds it on a file nobody else can open, so a version whose lease file is missing is never deleted (it is
reported instead). Folders and files are made with the process's umask, as nnU-Net makes its own, so that a
group sharing ``nnUNet_preprocessed`` (umask 002) can use one another's versions; where this process may not
write (a read-only file system, another user's folders), :meth:`VersionedFolder.writable` says so, and a
version can still be leased through a read-only handle.

POSIX only (``fcntl``); works on local file systems and NFS (where Linux maps ``flock`` to NFS locks).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterator

from nnunet_sassnet.errors import UserInputError

__all__ = ["VersionedFolder", "Lease", "Cleanup", "TMP_PREFIX"]

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


#: errors that mean "not allowed to write here" (permissions, a read-only file system)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _make_folder(parent: str, prefix: str) -> str:
    """A new empty folder ``parent/<prefix><random>``, made with the umask (``tempfile.mkdtemp`` makes 0700
    folders, which the other users of a shared ``nnUNet_preprocessed`` could not read)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _make_file(path: str) -> None:
    """An empty file at ``path`` (with the umask), unless there is one."""
    with open(path, "a"):
        pass


class Lease:
    """A shared lock on one version: while it is held, the version is not deleted.

    ``held`` is False when the lock could not be taken; ``why_not`` then says why.
    """

    def __init__(self, folder: str, handle, why_not: str | None = None) -> None:
        self.folder = folder
        self._handle = handle
        self.why_not = why_not

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Give the version up (closing the file drops the lock)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class Cleanup:
    """What :meth:`VersionedFolder.remove_unused` did: names of the orphans and old versions it deleted, and of
    the old versions it kept although no lease was seen on them, with the reason."""

    orphans: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


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
            # made by another user with umask 022: a read-only handle takes the lock as well (without the note)
            handle = None
            if e.errno in _NOT_WRITABLE and os.path.isfile(self.lock_file):
                with contextlib.suppress(OSError):
                    handle = open(self.lock_file, "r")
            if handle is None:
                raise UserInputError(
                    f"{self.lock_file}: cannot be created ({e.strerror}); the folder must be writable by every run "
                    f"that prepares {os.path.basename(self.path)}: they coordinate through this lock file") from e
        writes_note = handle.writable()
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
            if writes_note:
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
                handle.flush()
            try:
                yield True
            finally:
                if writes_note:
                    handle.seek(0)
                    handle.truncate()
                    handle.flush()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writable(self) -> bool:
        """Whether this process may make, replace and delete versions here (False on a read-only file system, or
        in folders of another user that it may only read)."""
        folders = [os.path.dirname(self.path)]
        folders += [f for f in (self.versions_dir, self.current()) if f is not None and os.path.isdir(f)]
        return all(os.access(f, os.W_OK | os.X_OK) for f in folders)

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
        target = _make_folder(self.versions_dir, "adopted_")
        os.rmdir(target)
        _make_file(target + _LEASE_SUFFIX)
        os.rename(self.path, target)
        self._point_to(target)
        return target

    def new_build_folder(self) -> str:
        """An empty ``.tmp_*`` folder to build a version in (published by :meth:`publish`)."""
        os.makedirs(self.versions_dir, exist_ok=True)
        return _make_folder(self.versions_dir, TMP_PREFIX)

    def publish(self, build_folder: str, name_prefix: str) -> str:
        """Make ``build_folder`` the current version (named ``<name_prefix>_<random>``); return its folder."""
        # the build folder's random part keeps names unique, also for a rebuild of the same content
        name = f"{name_prefix}_{os.path.basename(build_folder)[len(TMP_PREFIX):]}"
        final = os.path.join(self.versions_dir, name)
        _make_file(final + _LEASE_SUFFIX)  # with the version, never later (see the module)
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
        """A shared lock on the version ``folder`` (call under the writer lock, which deletion also takes).

        Through a read-only handle where this process may not write; not held (``why_not`` says why) when the
        version's lease file is missing or cannot be opened at all.
        """
        fcntl = _fcntl()
        lease_file = folder.rstrip(os.sep) + _LEASE_SUFFIX
        try:
            handle = open(lease_file, "r")  # never "a": a lease file is made with its version only
        except FileNotFoundError:
            return Lease(folder, None, f"its lease file {lease_file} is missing (deleted by hand?), so the version "
                                       f"is kept until it is deleted by hand")
        except OSError as e:
            return Lease(folder, None, f"its lease file {lease_file} cannot be opened ({e.strerror})")
        fcntl.flock(handle, fcntl.LOCK_SH)
        return Lease(folder, handle)

    def remove_unused(self) -> Cleanup:
        """Delete orphaned ``.tmp_*`` folders and the old versions nobody leases (see :class:`Cleanup`)."""
        fcntl = _fcntl()
        done = Cleanup()
        if not os.path.isdir(self.versions_dir):
            return done
        current = self.current()
        for name in sorted(os.listdir(self.versions_dir)):
            path = os.path.join(self.versions_dir, name)
            if name.startswith(TMP_PREFIX):
                # under the writer lock nobody builds: its builder was killed
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path, ignore_errors=True)
                    done.orphans.append(name)
                continue
            if name.endswith(_LEASE_SUFFIX):
                if not os.path.isdir(path[:-len(_LEASE_SUFFIX)]):
                    # its version is gone (removed by hand, or just above with its lease file)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                continue
            if not os.path.isdir(path) or (current is not None and os.path.samefile(path, current)):
                continue
            try:
                # "r+": NFS grants an exclusive lock only to a handle open for writing
                handle = open(path + _LEASE_SUFFIX, "r+")
            except FileNotFoundError:
                # a run may hold a lease on the deleted file: whether one reads this version cannot be told
                done.kept[name] = "its lease file is missing (deleted by hand?); delete it by hand once no run reads it"
                continue
            except OSError as e:
                done.kept[name] = f"its lease file cannot be opened ({e.strerror})"
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a run still reads it
                shutil.rmtree(path, ignore_errors=True)
                if os.path.exists(path):  # e.g. files of another user in a folder only they may write
                    done.kept[name] = "it could not be deleted completely (permissions?)"
                    continue
                os.unlink(path + _LEASE_SUFFIX)
                done.removed.append(name)
        return done
