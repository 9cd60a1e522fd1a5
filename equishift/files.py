"""Words for what the file system says, shared by the two loaders of untrusted files (equishift.images,
equishift.checkpoint): sizes, files that are not regular files, and OS errors without their (possibly
5000-character) paths."""
from __future__ import annotations

import errno
import stat

__all__ = ["human_bytes", "not_regular", "os_problem"]


def human_bytes(n: int) -> str:
    if n < 10 * 1024:
        return f"{n} bytes"
    if n < 10 * 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def not_regular(mode: int) -> str:
    """What a path whose ``st_mode`` is ``mode`` is, when it is not a regular file."""
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is not a regular file"


def os_problem(e: OSError) -> str:
    """An OSError in a few words, without the path it carries."""
    if e.errno == errno.ENAMETOOLONG:
        return "the path is too long for the file system (a name over 255 bytes or a path over 4096)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is not a folder"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return e.strerror or type(e).__name__
