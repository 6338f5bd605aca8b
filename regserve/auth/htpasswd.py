"""Apache htpasswd files with bcrypt hashes, as `htpasswd -B` writes them.

Verification runs bcrypt in a thread (it is slow by design and must never block the event loop)
and remembers a verified credential briefly, keyed by an HMAC of user and password under a
per-process random key, never the password itself. Concurrent requests with the same new
credential share one bcrypt run. The file is re-read when it changes.

Like Apache's htpasswd, bcrypt takes the first 72 bytes of a password (the algorithm's limit;
bcrypt 5 refuses longer ones instead of truncating them). A user that does not exist costs a
bcrypt too, so that answers do not tell by their timing which users exist. bcrypt runs on a few
threads, and what waits for them is served fairly (`FairQueue`): a client flooding wrong
passwords waits behind its own requests, not in front of everyone else's.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import bcrypt

from ..errors import TooManyRequests

log = logging.getLogger("regserve.auth")
BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
BCRYPT_MAX_BYTES = 72    # what bcrypt reads of a password; Apache's htpasswd truncates there too
CACHE_SECONDS = 60.0
BCRYPT_THREADS = max(2, (os.cpu_count() or 2) // 2)  # the rest of the cores keep serving
PENDING_PER_USER = 4     # bcrypt runs one client may have waiting for one user name ...
PENDING_PER_CLIENT = 32  # ... and for all of them: beyond, TOOMANYREQUESTS
_pool = ThreadPoolExecutor(max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt")


class HtpasswdError(Exception):
    pass


def parse(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise HtpasswdError(f"{source} line {number}: expected user:hash")
        if not hashed.startswith(BCRYPT_PREFIXES):
            kind = ("MD5 (apr1)" if hashed.startswith("$apr1$") else "SHA-1" if hashed.startswith("{SHA}")
                    else "crypt or plain text")
            raise HtpasswdError(f"{source} line {number}: user {user!r} has a {kind} hash; only bcrypt "
                                "is accepted (htpasswd -B)")
        users[user] = hashed.encode()
    return users


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # bcrypt treats $2y$ (PHP/Apache) exactly as $2b$; normalise for libraries that want $2b$.
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], hashed)
    except ValueError:
        return False


def _cost(hashed: bytes) -> int:
    try:
        return int(hashed.split(b"$")[2])
    except (IndexError, ValueError):
        return 10


class FairQueue:
    """bcrypt runs waiting for the pool's threads, served round-robin by client (its address)
    and, within a client, by user name: a flood from one client, or against one user, waits
    behind itself. Each has a bounded number of runs waiting; past that, TOOMANYREQUESTS."""

    def __init__(self) -> None:
        self._waiting: collections.OrderedDict[str, collections.OrderedDict[str, collections.deque]] = \
            collections.OrderedDict()
        self._pending: collections.Counter[str] = collections.Counter()
        self._running = 0

    async def check(self, client: str, user: str, password: bytes, hashed: bytes) -> bool:
        users = self._waiting.setdefault(client, collections.OrderedDict())
        queue = users.setdefault(user, collections.deque())
        if len(queue) >= PENDING_PER_USER or self._pending[client] >= PENDING_PER_CLIENT:
            if not queue:
                del users[user]
            if not users:
                del self._waiting[client]
            raise TooManyRequests({"retry_after": 1}, "too many authentication attempts waiting",
                                  headers={"Retry-After": "1"})
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue.append((password, hashed, done))
        self._pending[client] += 1
        self._start()
        return await done

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < BCRYPT_THREADS and self._waiting:
            client, users = next(iter(self._waiting.items()))
            user, queue = next(iter(users.items()))
            password, hashed, done = queue.popleft()
            users.move_to_end(user)
            if not queue:
                del users[user]
            self._waiting.move_to_end(client)
            if not users:
                del self._waiting[client]
            self._pending[client] -= 1
            if not self._pending[client]:
                del self._pending[client]
            self._running += 1
            loop.run_in_executor(_pool, _checkpw, password, hashed).add_done_callback(
                lambda f, done=done: self._finished(f, done))

    def _finished(self, result: asyncio.Future[bool], done: asyncio.Future[bool]) -> None:
        self._running -= 1
        if not done.done():
            if result.exception() is not None:
                done.set_exception(result.exception())  # type: ignore[arg-type]
            else:
                done.set_result(result.result())
        self._start()


class Htpasswd:
    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self._users: dict[str, bytes] = {}
        self._stamp: tuple | None = None
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._fair = FairQueue()
        self._decoy = b""
        self.load(strict=True)

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def load(self, strict: bool = False) -> None:
        """Read the file. At start a bad file is fatal; later, the old users stay in force."""
        stamp = self._file_stamp()
        try:
            with open(self.path) as f:
                users = parse(f.read(), self.path)
        except (OSError, HtpasswdError) as e:
            if strict:
                raise HtpasswdError(str(e)) from None
            log.error("keeping the previous htpasswd users: %s", e)
            self._stamp = stamp
            return
        self._users, self._stamp = users, stamp
        self._verified.clear()  # a changed file revokes every remembered credential
        # What an unknown user is checked against: as slow as the file's hashes are.
        cost = max((_cost(h) for h in users.values()), default=10)
        if self._decoy[:7] != f"$2b${cost:02d}$".encode():
            self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))

    def _maybe_reload(self) -> None:
        if self._file_stamp() != self._stamp:
            self.load()

    def users(self) -> list[str]:
        self._maybe_reload()
        return sorted(self._users)

    def fingerprint(self, user: str) -> str | None:
        """A short digest of the user's present hash: it changes when the password does (and
        is None when the user is gone), so what was issued for a credential can die with it."""
        self._maybe_reload()
        hashed = self._users.get(user)
        if hashed is None:
            return None
        digest = hashlib.sha256(user.encode() + b"\0" + hashed).digest()[:12]
        return base64.urlsafe_b64encode(digest).decode()

    async def verify(self, user: str, password: str, client: str = "") -> bool:
        """Whether `password` is `user`'s. `client` (the peer's address) is whom the bcrypt
        runs are queued fairly for."""
        self._maybe_reload()
        hashed = self._users.get(user)
        secret = password.encode()
        if hashed is None:  # as slow as a wrong password: no telling which users exist
            await self._fair.check(client, user, secret, self._decoy)
            return False
        key = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        now = self.clock()
        until = self._verified.get(key)
        if until is not None and until > now:
            return True
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fair.check(client, user, secret, hashed))
            self._inflight[key] = pending
            try:
                ok = await pending
            finally:
                self._inflight.pop(key, None)
        else:
            ok = await pending
        if ok:
            self._verified[key] = now + CACHE_SECONDS
        return ok


def provision_if_missing(path: str) -> str | None:
    """distribution's behaviour when the configured file does not exist: create it with the
    user `docker` and a random password, which is logged once. Returns that password, or None
    when the file was already there (or another process created it first)."""
    if os.path.exists(path):
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(f"docker:{hash_password(password)}\n")
    log.warning("htpasswd %s was missing: provisioned user 'docker' with password %s", path, password)
    return password


# -- editing, for `regserve htpasswd` ----------------------------------------------------------

def hash_password(password: str, cost: int = 10) -> str:
    """bcrypt with Apache's $2y$ prefix, which both Apache's htpasswd and bcrypt libraries read,
    of the password's first 72 bytes, as Apache's htpasswd does."""
    hashed = bcrypt.hashpw(password.encode()[:BCRYPT_MAX_BYTES], bcrypt.gensalt(rounds=cost)).decode()
    return "$2y$" + hashed[4:]


def read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def write_lines(path: str, lines: list[str]) -> None:
    """Atomic replace, keeping the file's mode (0600 for a new file)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".htpasswd-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def set_user(path: str, user: str, password: str, cost: int = 10) -> None:
    if not user or ":" in user:
        raise HtpasswdError("user names may not be empty or contain ':'")
    lines = [line for line in read_lines(path) if line.partition(":")[0] != user]
    lines.append(f"{user}:{hash_password(password, cost)}")
    write_lines(path, lines)


def remove_user(path: str, user: str) -> bool:
    lines = read_lines(path)
    kept = [line for line in lines if line.partition(":")[0] != user]
    if len(kept) == len(lines):
        return False
    write_lines(path, kept)
    return True
