"""The real e2b Python SDK against Ember: directory watches (the sync SDK's
polling watcher and the async SDK's WatchDir stream) and a sandbox's ports
through both routing forms (the E2b-Sandbox-* headers, and a Host of
<port>-<id>.<domain>). Prints one line per step; any failure raises."""

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
finally:
    sb.kill()
assert fetch({"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8000"})[0] == 502
step("done")
