"""One tray app per user: the first launch owns a lock and a local channel; later launches hand it a message.

Contract
--------
``SingleInstance(name, lock_dir)``:

* ``acquire() -> bool``: take ``lock_dir/<name>.lock`` (a ``QLockFile``; a lock left by a crashed
  process is detected by its PID and taken over) and, on success, listen on the ``QLocalServer``
  ``name`` (a Unix socket or a Windows named pipe; a socket left behind by a crashed instance is
  removed first: holding the lock proves it is stale).  False means another instance runs.
* ``send(message, timeout_ms=2000) -> bool``: from a launch that did not acquire, deliver one
  message ("show", "open molink://join?code=…", "quit") to the running instance; True once the
  running instance acknowledged it.  Retries the connection until the deadline, since the running
  instance may hold the lock a moment before it listens.  Blocking (``waitFor*``), meant for a
  process that exits right after; needs no event loop.
* The running instance emits ``message_received(str)`` for each message (its Qt event loop runs).

Frames: a 4-byte big-endian length, then UTF-8 text (at most ``MAX_MESSAGE`` bytes); the reply is
one byte ``ACK``.  A client that sends nothing useful within ``CLIENT_TIMEOUT_MS`` is dropped.
``default_name()`` is ``molink-tray-<user>``, sanitised for a socket or pipe name.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import re
import struct
from pathlib import Path

from PySide6.QtCore import QDeadlineTimer, QLockFile, QObject, QThread, QTimer, Signal
from PySide6.QtNetwork import QLocalServer, QLocalSocket

log = logging.getLogger("molink.single")

MAX_MESSAGE = 64 * 1024  # bytes of one message
CLIENT_TIMEOUT_MS = 5000  # a connected client must deliver its frame within this
RETRY_MS = 50  # pause between connection attempts in send()
ACK = b"\x06"


def default_name(user: str | None = None) -> str:
    """``molink-tray-<user>`` with only ``[a-z0-9_-]``; a short hash keeps sanitised names distinct."""
    if user is None:
        try:
            user = getpass.getuser()
        except Exception:  # no user name in the environment or the password database
            user = "user"
    clean = re.sub(r"[^a-z0-9_-]", "_", user.lower())[:32] or "user"
    if clean != user:
        clean += "-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"molink-tray-{clean}"


class SingleInstance(QObject):
    message_received = Signal(str)

    def __init__(self, name: str, lock_dir: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
            raise ValueError("an instance name is 1-100 letters, digits, '.', '_' or '-'")
        self.name = name
        self.lock_dir = Path(lock_dir)
        self._lock: QLockFile | None = None
        self._server: QLocalServer | None = None
        self._buffers: dict[QLocalSocket, bytearray] = {}

    # ------------------------------------------------------------------ running instance
    @property
    def owner(self) -> bool:
        return self._lock is not None

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.isListening()

    def acquire(self) -> bool:
        if self._lock is not None:
            return True
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        lock = QLockFile(str(self.lock_dir / f"{self.name}.lock"))
        lock.setStaleLockTime(0)  # held for the app's whole life: only a dead owner makes it stale
        if not lock.tryLock(0):
            if lock.error() != QLockFile.LockError.LockFailedError:
                log.warning("cannot create the instance lock in %s: %s", self.lock_dir, lock.error())
            return False
        self._lock = lock
        server = QLocalServer(self)
        server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        QLocalServer.removeServer(self.name)  # a socket left by a crashed instance; we hold the lock
        if not server.listen(self.name):
            log.warning(
                "instance channel %s unavailable (%s); later launches cannot reach this one",
                self.name,
                server.errorString(),
            )
            server.deleteLater()
            return True
        server.newConnection.connect(self._on_connection)
        self._server = server
        return True

    def release(self) -> None:
        for sock in list(self._buffers):
            sock.abort()
        self._buffers.clear()
        if self._server is not None:
            self._server.close()
            self._server.deleteLater()
            self._server = None
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None

    def _on_connection(self) -> None:
        if self._server is None:
            return
        while self._server.hasPendingConnections():
            sock = self._server.nextPendingConnection()
            self._buffers[sock] = bytearray()
            sock.readyRead.connect(lambda s=sock: self._on_ready(s))
            sock.disconnected.connect(lambda s=sock: self._forget(s))
            timer = QTimer(sock)  # dies with the socket
            timer.setSingleShot(True)
            timer.timeout.connect(lambda s=sock: self._drop(s, "timed out"))
            timer.start(CLIENT_TIMEOUT_MS)

    def _on_ready(self, sock: QLocalSocket) -> None:
        buf = self._buffers.get(sock)
        if buf is None:
            return
        buf += bytes(sock.readAll().data())
        if len(buf) < 4:
            return
        (n,) = struct.unpack(">I", bytes(buf[:4]))
        if n > MAX_MESSAGE:
            self._drop(sock, f"message of {n} bytes too long")
            return
        if len(buf) < 4 + n:
            return
        try:
            text = bytes(buf[4 : 4 + n]).decode("utf-8")
        except UnicodeDecodeError:
            self._drop(sock, "message is not UTF-8")
            return
        self._buffers[sock] = bytearray()
        sock.write(ACK)
        sock.flush()
        sock.disconnectFromServer()
        # emitted from the event loop, not from inside this socket's signal: a handler may quit, release
        # this object or open a window without the socket being deleted under its own feet
        QTimer.singleShot(0, self, lambda: self.message_received.emit(text))

    def _drop(self, sock: QLocalSocket, why: str) -> None:
        if sock in self._buffers:
            log.debug("instance channel: dropped a client (%s)", why)
            self._buffers.pop(sock, None)
            sock.abort()
            sock.deleteLater()

    def _forget(self, sock: QLocalSocket) -> None:
        if self._buffers.pop(sock, None) is not None:
            sock.deleteLater()

    # ------------------------------------------------------------------ later launches
    def send(self, message: str, timeout_ms: int = 2000) -> bool:
        data = message.encode("utf-8")
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message longer than {MAX_MESSAGE} bytes")
        frame = struct.pack(">I", len(data)) + data
        deadline = QDeadlineTimer(timeout_ms)
        while True:
            sock = QLocalSocket()
            try:
                sock.connectToServer(self.name)
                if sock.waitForConnected(_left(deadline)):
                    sock.write(frame)
                    if not sock.waitForBytesWritten(_left(deadline)) and sock.bytesToWrite() > 0:
                        return False
                    got = b""
                    while not got and not deadline.hasExpired():
                        if sock.bytesAvailable() or sock.waitForReadyRead(_left(deadline)):
                            got = bytes(sock.read(1).data())
                        elif sock.state() != QLocalSocket.LocalSocketState.ConnectedState:
                            break
                    return got == ACK
            finally:
                sock.abort()
            if deadline.hasExpired():
                return False
            QThread.msleep(min(RETRY_MS, max(1, _left(deadline))))


def _left(deadline: QDeadlineTimer) -> int:
    return max(0, int(deadline.remainingTime()))
