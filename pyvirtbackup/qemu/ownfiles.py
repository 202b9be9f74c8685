"""Deleting only the files a backup created.

A target or scratch path may live in a directory other users can write, and a job
record naming a path is only as trustworthy as the directory it is kept in.
Between our create and our delete the name may come to mean another file (renamed
away, replaced by a symlink or by someone else's file). So the (device, inode) of
what we created is kept, and a name is unlinked only while it still is that file,
looked up and unlinked through its directory's descriptor so that the directory
cannot be swapped in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

log = logging.getLogger(__name__)

FileId = tuple[int, int]


def file_id(st: os.stat_result) -> FileId:
    return (st.st_dev, st.st_ino)


def is_same(path: str, ident: FileId) -> bool:
    """Does ``path`` (not followed if a link) still name the regular file ``ident``?"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and file_id(st) == tuple(ident)


def unlink_if_same(path: str, ident: FileId | None) -> bool:
    """Unlink ``path`` if it is still the regular file ``ident``; True if it was."""
    if ident is None:
        log.warning("not deleting %s: no record of which file this backup created", path)
        return False
    directory, name = os.path.split(path)
    try:
        dirfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("not deleting %s: cannot open its directory: %s", path, exc.strerror)
        return False
    try:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or file_id(st) != tuple(ident):
            log.warning(
                "not deleting %s: it is no longer the file this backup created "
                "(replaced or renamed meanwhile)",
                path,
            )
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)
        return True
    finally:
        os.close(dirfd)


def swappable_dir(path: str) -> tuple[str, str] | None:
    """The first directory above ``path`` in which another user could make the name
    mean another file (swap it for a link, rename over it, move a directory away),
    with why; None when only we or root can, as for the state directory.

    Only what reaches QEMU by name needs this: a descriptor we pass is the file we
    created whatever happens to the name.
    """
    me = os.geteuid()
    seen: set[str] = set()
    parent = os.path.dirname(os.path.abspath(path))
    for start in (parent, os.path.realpath(parent)):
        level = start
        while level not in seen:
            seen.add(level)
            try:
                st = os.stat(level)
            except OSError:
                st = None  # not there (yet): creating the file will say so
            if st is not None:
                mode = stat.S_IMODE(st.st_mode)
                if st.st_uid not in (0, me):
                    return level, f"is owned by uid {st.st_uid}"
                if mode & 0o022 and not mode & stat.S_ISVTX:
                    who = "others" if mode & 0o002 else "its group"
                    return level, f"is writable by {who} (mode {mode:04o}) and not sticky"
            level = os.path.dirname(level)
    return None
