"""Forward ports of a network namespace to this machine's loopback (tests/netns.py).

    python tests/netns_relay.py NAMESPACE PORT [PORT ...]

Each port gets a listening socket made inside NAMESPACE (on every address there); each
connection to it is joined to 127.0.0.1:PORT outside, byte for byte, both ways. A socket
keeps the namespace it was made in, so one process serves both sides: the main thread
enters the namespace to make the listeners, then returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _enter(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def main(namespace: str, ports: list[int]) -> None:
    """Listen on `ports` inside `namespace` and serve until killed."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    _enter(there)
    listeners = []
    for port in ports:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(256)
        listeners.append((listener, port))
    _enter(here)
    threads = [
        threading.Thread(target=_serve, args=(listener, port), daemon=True)
        for listener, port in listeners
    ]
    for thread in threads:
        thread.start()
    print(f"relaying {namespace} ports {ports} to 127.0.0.1", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1], [int(p) for p in sys.argv[2:]])
