"""A slowloris client, run as its own process (each holds up to 10,000 sockets):
`python -m tests.security.slowloris PORT SOURCE_IP COUNT SECONDS`. It keeps COUNT
connections open, each sending a never-ending request header a line per second, reopens
what the server closes (at most REOPEN_PER_S a second), and prints what it saw as JSON."""

from __future__ import annotations

import errno
import json
import socket
import sys
import time

REOPEN_PER_S = 1000
GONE = (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT)


def main() -> None:
    port, source, count, seconds = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    socks: dict[socket.socket, bool] = {}  # socket -> request line sent
    stats = {"opened": 0, "answered": 0, "reset": 0, "open_failed": 0, "max_open": 0}
    answers: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        budget = REOPEN_PER_S
        while len(socks) < count and budget > 0:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.bind((source, 0))
                s.connect_ex(("127.0.0.1", port))
            except OSError:
                stats["open_failed"] += 1
                s.close()
                break
            socks[s] = False
            stats["opened"] += 1
            budget -= 1
        stats["max_open"] = max(stats["max_open"], len(socks))
        for s in list(socks):
            try:
                data = s.recv(4096)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data is not None:  # answered (503, 408) or closed: the server let go
                if data:
                    stats["answered"] += 1
                    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "?"
                    answers[status] = answers.get(status, 0) + 1
                else:
                    stats["reset"] += 1
                s.close()
                del socks[s]
                continue
            line = b"X-Slow: yes\r\n" if socks[s] else b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            try:
                s.send(line)
                socks[s] = True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if exc.errno in GONE:
                    stats["reset"] += 1
                    s.close()
                    del socks[s]
        time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
    for s in socks:
        s.close()
    print(json.dumps({**stats, "answers": answers}))


if __name__ == "__main__":
    main()
