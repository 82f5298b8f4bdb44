"""An inter-process lock that also holds across machines on a shared (NFS) filesystem.

Why not fcntl/flock: on NFS they depend on the lock daemon (NLM on v3); on some setups they
are silently local to one client (`local_lock=`), fail with ENOLCK, or hang, so a lock taken
on one node may not exclude another. This lock uses only link(2), which every NFS version
performs atomically on the server: creating a name that already exists fails.

- acquire: write a claim file `<lock>.<token>.claim` holding the owner (host identity, pid,
  token), then link it to `<lock>`. It is ours when link succeeds, or when link reports an
  error but the claim's link count is 2 (NFS retransmitted a link that had succeeded: the
  classic liblockfile check). The claim file is then removed; `<lock>` keeps the owner. On a
  filesystem without hard links, `<lock>` is created with O_EXCL instead.
- while held, a daemon thread refreshes the lock's mtime every HEARTBEAT_S seconds.
- stale: a holder on this same kernel and pid namespace whose pid is gone (broken at once),
  or a lock whose mtime is over STALE_S old (a crashed or frozen holder elsewhere). Age is
  measured against the file server's clock (the mtime of our own claim, just written), so
  nodes need not have synchronised clocks. Breakers take a short-lived `<lock>.break` file
  (O_EXCL) and re-check the owner token before unlinking, so two waiters never both break.
- before committing a write, `verify()` checks the lock still holds our token: a holder that
  was frozen past STALE_S and lost its lock fails instead of overwriting a newer index.
- release: unlink only if the lock still holds our token.

It relies on NFS close-to-open consistency (the Linux default; not with `nocto`). Torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
STALE_S = 30.0  # a lock whose heartbeat stopped this long ago is broken
HEARTBEAT_S = 5.0
STALE_CHECK_S = 0.25  # how often a waiter checks whether the holder is gone
MAX_POLL_S = 0.02  # longest sleep between tries (waiters poll: there is no wake-up across machines)


class LockTimeout(TimeoutError):
    """The lock stayed held by a live owner for longer than the timeout."""

    def __init__(self, path: Path, timeout: float, owner: dict[str, Any]) -> None:
        who = f" by pid {owner.get('pid')} on {owner.get('host')}" if owner.get("pid") else ""
        super().__init__(f"{path}: locked{who} for over {timeout:.0f} s")
        self.path, self.owner = path, owner


class LockLost(RuntimeError):
    """Our lock was broken as stale (this process was frozen or its heartbeat failed)."""


def _identity() -> str:
    """Same identity = same kernel and pid namespace, so the holder's pid can be checked directly."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return ":".join(parts)


IDENTITY = _identity()


class NetLock:
    """`with NetLock(path, timeout):` — exclusive across processes and machines sharing `path`'s folder.

    Reentrant within one thread; each thread of a process holds the lock separately.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()

    @property
    def lock_file(self) -> str:  # the attribute name filelock.FileLock uses, for messages
        return str(self.path)

    @property
    def is_locked(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    # ---------------------------------------------------------------- acquire / release
    def acquire(self, timeout: float | None = None) -> None:
        if self.is_locked:
            self._local.depth += 1
            return
        limit = self.timeout if timeout is None else timeout
        token = secrets.token_hex(8)
        owner = {"host": socket.gethostname(), "identity": IDENTITY, "pid": os.getpid(), "token": token,
                 "since": time.time()}
        claim = self.path.with_name(f"{self.path.name}.{token}.claim")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline, delay, checked = time.monotonic() + limit, 0.001, -STALE_CHECK_S
        try:
            claim.write_text(json.dumps(owner), encoding="utf-8")
            while not self._link(claim):  # one link(2) per poll; the stale check a few times a second
                if time.monotonic() - checked >= STALE_CHECK_S:
                    os.utime(claim)  # the claim's mtime is now the file server's "now"
                    self._break_if_stale(claim.stat().st_mtime)
                    checked = time.monotonic()
                if time.monotonic() >= deadline:
                    raise LockTimeout(self.path, limit, self.owner() or {})
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 1.5, MAX_POLL_S)
        finally:
            claim.unlink(missing_ok=True)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(token, stop), daemon=True, name="netlock-heartbeat")
        beat.start()
        self._local.depth, self._local.token, self._local.stop = 1, token, stop

    def release(self) -> None:
        if not self.is_locked:
            return
        self._local.depth -= 1
        if self._local.depth:
            return
        self._local.stop.set()
        if self._owned_by(self._local.token):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._local.token = None

    def verify(self) -> None:
        """Raise LockLost unless this thread holds the lock (call just before committing a write)."""
        if not self.is_locked or not self._owned_by(self._local.token):
            raise LockLost(f"{self.path}: this process no longer holds the lock (broken as stale); "
                           f"nothing was written")

    def __enter__(self) -> NetLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    # ---------------------------------------------------------------- internals
    def owner(self) -> dict[str, Any] | None:
        """The holder as recorded in the lock file; {} for a file we cannot parse, None when free."""
        snap = self._snapshot()
        return None if snap is None else snap.owner

    def _snapshot(self) -> _Snapshot | None:
        """Owner, mtime and inode read through one open file, so they describe the same lock."""
        try:
            with open(self.path, "rb") as handle:
                meta = os.fstat(handle.fileno())
                raw = handle.read(4096)
        except FileNotFoundError:
            return None
        except OSError:
            return _Snapshot({}, float("inf"), -1)  # unreadable: held, and never judged stale
        try:
            owner = json.loads(raw)
        except ValueError:
            owner = {}
        return _Snapshot(owner if isinstance(owner, dict) else {}, meta.st_mtime, meta.st_ino)

    def _owned_by(self, token: str | None) -> bool:
        return token is not None and (self.owner() or {}).get("token") == token

    def _link(self, claim: Path) -> bool:
        try:
            os.link(claim, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in _NO_HARD_LINKS:  # a filesystem without hard links: O_EXCL create instead
                return self._create_exclusive(claim.read_bytes())
            try:  # e.g. a lost reply over NFS: the link may have been made all the same
                return claim.stat().st_nlink == 2
            except OSError:
                return False

    def _create_exclusive(self, owner: bytes) -> bool:
        """O_EXCL is atomic on NFSv3+ too; a waiter that sees the file before its owner is written
        takes it as held (unreadable owner: stale only by age)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(owner)
        return True

    def _break_if_stale(self, now: float) -> None:
        """Remove the lock if its holder is gone; `now` is the file server's clock."""
        if not _stale(self._snapshot(), now):
            return
        breaker = self.path.with_name(f"{self.path.name}.break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # a breaker that died within its few microseconds
                if now - breaker.stat().st_mtime > STALE_S:
                    breaker.unlink()
            return
        os.close(fd)
        try:  # re-check under the break file: the same dead lock, not one taken meanwhile
            snap = self._snapshot()
            if snap is not None and _stale(snap, now) and os.stat(self.path).st_ino == snap.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            breaker.unlink(missing_ok=True)

    def _heartbeat(self, token: str, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            if not self._owned_by(token):
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)  # over NFS: set to the server's time


@dataclass(frozen=True)
class _Snapshot:
    owner: dict[str, Any]
    mtime: float
    inode: int


def _stale(snap: _Snapshot | None, now: float) -> bool:
    """Heartbeat stopped over STALE_S ago, or the holder is a dead process on this very kernel."""
    if snap is None:
        return False
    if now - snap.mtime > STALE_S:
        return True
    return snap.owner.get("identity") == IDENTITY and not _pid_alive(snap.owner.get("pid"))


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except (TypeError, ValueError):
        return False
    return True
