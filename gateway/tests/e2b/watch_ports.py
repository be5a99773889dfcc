"""The real e2b Python SDK against Ember: directory watches (the sync SDK's
polling watcher and the async SDK's WatchDir stream) and a sandbox's ports
through both routing forms (the E2b-Sandbox-* headers, and a Host of
<port>-<id>.<domain>), HTTP and WebSocket. Prints one line per step; any failure raises."""

import asyncio
import os
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from e2b import AsyncSandbox, Sandbox
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType


def step(name):
    print(f"ok {name}", flush=True)


def wait_for(what, probe, within=15):
    deadline = time.monotonic() + within
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# The guest's WebSocket echo server, shared with the HTTP suite.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ws_echo.py")) as f:
    WS_ECHO = f.read()


def ws_echo(headers, message):
    """One text frame (under 126 bytes) to the guest's echo server through
    Ember, with a client written out: the handshake, a masked frame, the
    echoed frame back."""
    import base64
    import hashlib
    import socket

    u = urlparse(base)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET / HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             "Sec-WebSocket-Version: 13"]
    if "Host" not in headers:
        lines.append(f"Host: {u.netloc}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((u.hostname, u.port), timeout=15) as c:
        c.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(1)
            assert chunk, f"closed during the handshake: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head
        mask = os.urandom(4)
        c.sendall(bytes([0x81, 0x80 | len(message)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(message)))
        got = b""
        while len(got) < 2 or len(got) < 2 + got[1]:
            chunk = c.recv(4096)
            assert chunk, f"closed before the echo: {got!r}"
            got += chunk
        assert got[0] == 0x81, got
        return got[2:2 + got[1]]


base = os.environ["E2B_SANDBOX_URL"]
sb = Sandbox.create(template="base")
try:
    sb.files.make_dir("watched")
    handle = sb.files.watch_dir("watched")
    sb.files.write("watched/a.txt", "one")
    sb.commands.run("mv watched/a.txt watched/b.txt && rm watched/b.txt")
    seen = []

    def all_seen():
        seen.extend(handle.get_new_events())
        kinds = {(e.name, e.type) for e in seen}
        return ("a.txt", FilesystemEventType.CREATE) in kinds and ("b.txt", FilesystemEventType.REMOVE) in kinds

    wait_for("the polled watcher's events", all_seen)
    handle.stop()
    step(f"polling watcher ({len(seen)} events)")

    async def stream_watch():
        asb = await AsyncSandbox.connect(sb.sandbox_id)
        got = []
        h = await asb.files.watch_dir("watched", on_event=lambda e: got.append(e))
        await asb.files.write("watched/c.txt", "three")
        for _ in range(75):
            if any(e.name == "c.txt" and e.type == FilesystemEventType.CREATE for e in got):
                break
            await asyncio.sleep(0.2)
        await h.stop()
        assert any(e.name == "c.txt" for e in got), got

    asyncio.run(stream_watch())
    step("WatchDir stream")

    sb.commands.run("mkdir -p site && echo served-from-the-sandbox > site/index.html")
    server = sb.commands.run("cd site && python3 -m http.server 8000 --bind 127.0.0.1", background=True)

    def fetch(headers, path="/index.html"):
        req = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    by_headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8000"}
    status, body = wait_for("the guest's web server", lambda: (lambda r: r if r[0] == 200 else None)(fetch(by_headers)))
    assert body == "served-from-the-sandbox\n", body
    host = sb.get_host(8000)
    assert host.startswith(f"8000-{sb.sandbox_id}."), host
    status, body = fetch({"Host": host})
    assert (status, body) == (200, "served-from-the-sandbox\n"), (status, body)
    status, _ = fetch({"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8001"})
    assert status == 502, status
    server.kill()
    step(f"ports by headers and by Host ({host})")

    sb.files.write("ws_echo.py", WS_ECHO)
    sb.commands.run("python3 ws_echo.py", background=True)
    by_host = {"Host": sb.get_host(8765)}
    wait_for("the guest's WebSocket server", lambda: fetch(by_host, "/")[0] == 200)
    for headers in (by_host, {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8765"}):
        assert ws_echo(headers, b"through the sandbox plane") == b"through the sandbox plane"
    step("a WebSocket by Host and by headers")
finally:
    sb.kill()
assert fetch({"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8000"})[0] == 502
step("done")
