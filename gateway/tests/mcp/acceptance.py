"""The official MCP Python client (pinned in requirements.txt) against Ember's
/mcp, in one protocol generation: argv[1] is "auto" (2026-07-28, stateless)
or "legacy" (initialize, 2025-11-25). EMBER_URL names the server. Every tool
on real VMs: run (exit codes, timeout, output cap, errors), images, sessions
with files (an image read back as image content), background processes
(cursor polling until exit, stdin, signals), fork, pause and resume, progress,
cancellation killing the command, and the transport's Host/Origin/size guards.
Prints one line per step; any failure raises (non-zero exit)."""

import asyncio
import base64
import os
import sys
import time
import uuid

import httpx2 as httpx
from mcp import Client

URL = os.environ["EMBER_URL"].rstrip("/") + "/mcp"
MODE = sys.argv[1]
RUN = uuid.uuid4().hex[:8]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def step(name):
    print(f"ok {name}", flush=True)


def text(r):
    return "".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def call(c, tool, args, **kw):
    return await asyncio.wait_for(c.call_tool(tool, args, **kw), 120)


def refused(r, code):
    assert r.is_error, f"expected {code}, got a result: {text(r)}"
    got = (r.structured_content or {}).get("error", {}).get("code")
    assert got == code, f"expected {code}, got {got}: {text(r)}"


def guards():
    """The transport's own checks, with plain HTTP."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    h = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    r = httpx.post(URL, json=body, headers={**h, "Host": "evil.example"})
    assert r.status_code == 403, (r.status_code, r.text)
    r = httpx.post(URL, json=body, headers={**h, "Origin": "https://evil.example"})
    assert r.status_code == 403, (r.status_code, r.text)
    r = httpx.post(URL, content=b"x" * (5 << 20), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:200])


async def main():
    guards()
    step("Host, Origin and size refused")
    async with Client(URL, mode=MODE) as c:
        want = "2026-07-28" if MODE == "auto" else "2025-11-25"
        assert c.protocol_version == want, c.protocol_version
        step(f"protocol {c.protocol_version}")

        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert set(tools) == {
            "run", "images_list", "session_create", "session_list", "session_get", "session_delete",
            "session_fork", "session_pause", "session_resume", "session_set_timeout", "process_start",
            "process_output", "process_write_stdin", "process_signal", "process_list", "file_read",
            "file_write", "file_list", "file_delete", "file_edit",
        }, sorted(tools)
        for t in tools.values():
            assert t.input_schema["type"] == "object" and t.description, t.name
            assert "oneOf" not in str(t.input_schema), f"{t.name}: oneOf in its schema"
            assert "'null'" not in str(t.input_schema), f"{t.name}: a nullable type in its schema"
        assert {"cmd", "argv", "code", "session"} <= set(tools["run"].input_schema["properties"])
        for name in ("images_list", "file_read", "process_output", "session_list"):
            assert tools[name].annotations.read_only_hint is True, name
        for name in ("session_delete", "file_delete", "process_signal"):
            assert tools[name].annotations.destructive_hint is True, name
        step(f"tools/list: {len(tools)} tools with schemas and annotations")

        r = await call(c, "run", {"cmd": "echo hello from $(uname -n); echo oops >&2; exit 3"})
        s = r.structured_content
        assert not r.is_error and s["exit_code"] == 3 and s["stdout"] == "hello from ember\n", s
        assert s["stderr"] == "oops\n" and "exit 3" in text(r), text(r)
        r = await call(c, "run", {"code": "print(6 * 7)", "lang": "python"})
        assert r.structured_content["stdout"] == "42\n", r.structured_content
        await call(c, "run", {"cmd": "echo secret > /tmp/one-shot"})
        r = await call(c, "run", {"cmd": "cat /tmp/one-shot 2>&1 || echo absent"})
        assert "absent" in r.structured_content["stdout"], "a one-shot call saw another's file"
        step("run: exit codes, stderr, code, nothing persists")

        r = await call(c, "run", {"cmd": "sleep 5", "timeout": "1s"})
        assert not r.is_error and r.structured_content["timed_out"] is True, text(r)
        assert "timed out" in text(r), text(r)
        # Over MCP's 32 KiB cap, under the server's own output limit.
        r = await call(c, "run", {"cmd": "head -c 60000 /dev/zero | tr '\\0' a; echo; echo the-end"})
        s = r.structured_content
        assert s["output_capped"] is True and s["stdout_bytes"] == 60009, s["stdout_bytes"]
        assert len(text(r)) < 34 * 1024 and s["stdout"].endswith("the-end\n"), len(text(r))
        assert "bytes omitted" in text(r)
        step("run: a timeout and an output cap (head and tail kept) are results")

        refused(await call(c, "run", {"cmd": "true", "argv": ["true"]}), "invalid_request")
        r = await call(c, "run", {"cmd": "true", "image": "no-such-image"})
        refused(r, "unknown_image")
        assert "default" in text(r), text(r)
        r = await call(c, "run", {"cmdd": "true"})
        assert r.is_error and "cmdd" in text(r), text(r)
        refused(await call(c, "run", {"cmd": "true", "session": f"never-made-{RUN}"}), "not_found")
        try:
            await c.call_tool("no_such_tool", {})
            raise AssertionError("an unknown tool was called")
        except AssertionError:
            raise
        except Exception:
            pass
        step("run: argument errors, unknown image and session are tool errors")

        r = await call(c, "images_list", {})
        images = {i["name"]: i for i in r.structured_content["images"]}
        assert images["default"]["default"] is True and "python-data" in images, images.keys()
        step("images_list")

        key = f"mcp-{MODE}-{RUN}"
        r = await call(c, "session_create", {"key": key, "idle_timeout": "5m"})
        assert not r.is_error and r.structured_content["key"] == key, text(r)
        refused(await call(c, "session_create", {"key": key}), "session_exists")
        listed = (await call(c, "session_list", {})).structured_content["sessions"]
        mine = [x for x in listed if x["key"] == key]
        assert mine and mine[0]["metadata"]["created_via"] == "mcp", listed
        await call(c, "run", {"session": key, "cmd": "echo remembered > notes.txt"})
        r = await call(c, "run", {"session": key, "cmd": "cat notes.txt"})
        assert r.structured_content["stdout"] == "remembered\n", text(r)
        step("sessions: create, exists, list, state kept between calls")

        r = await call(c, "file_write", {"session": key, "path": "dir/a.txt", "content": "alpha\nbeta\n"})
        assert r.structured_content["size"] == 11, text(r)
        r = await call(c, "file_read", {"session": key, "path": "dir/a.txt"})
        assert r.structured_content["content"] == "alpha\nbeta\n", text(r)
        r = await call(c, "file_read", {"session": key, "path": "dir/a.txt", "offset": 6, "max_bytes": 2})
        s = r.structured_content
        assert s["content"] == "be" and s["truncated"] and s["next_offset"] == 8, s
        r = await call(c, "file_edit", {"session": key, "path": "dir/a.txt", "old_text": "beta", "new_text": "gamma"})
        assert r.structured_content["replaced"] == 1, text(r)
        refused(await call(c, "file_edit", {"session": key, "path": "dir/a.txt", "old_text": "zeta", "new_text": "x"}),
                "invalid_request")
        r = await call(c, "file_list", {"session": key, "path": "dir"})
        entries = r.structured_content["entries"]
        assert [(e["name"], e["type"]) for e in entries] == [("a.txt", "file")], entries
        await call(c, "file_write", {"session": key, "path": "dot.png", "content_base64": base64.b64encode(PNG).decode()})
        r = await call(c, "file_read", {"session": key, "path": "dot.png"})
        images = [b for b in r.content if getattr(b, "type", "") == "image"]
        assert images and images[0].mime_type == "image/png" and base64.b64decode(images[0].data) == PNG, r.content
        refused(await call(c, "file_read", {"session": key, "path": "no/such/file"}), "not_found")
        await call(c, "file_delete", {"session": key, "path": "dir", "recursive": True})
        refused(await call(c, "file_list", {"session": key, "path": "dir"}), "not_found")
        step("files: write, read with offset, edit, list, an image, delete")

        r = await call(c, "process_start", {"session": key, "cmd": "for i in 1 2 3; do echo tick $i; sleep 1; done", "tag": "ticker"})
        pid, cursor, out = r.structured_content["pid"], 0, ""
        for _ in range(30):
            s = (await call(c, "process_output", {"session": key, "pid": pid, "cursor": cursor, "wait": "5s"})).structured_content
            out, cursor = out + (s["data"] or ""), s["next_cursor"]
            if not s["running"]:
                break
        assert out == "tick 1\ntick 2\ntick 3\n" and s["exit_code"] == 0 and cursor == 21, (out, s)
        s = (await call(c, "process_output", {"session": key, "pid": pid, "cursor": cursor})).structured_content
        assert s["data"] == "" and not s["running"], s
        r = await call(c, "process_start", {"session": key, "argv": ["cat"], "stdin": True})
        cat = r.structured_content["pid"]
        await call(c, "process_write_stdin", {"session": key, "pid": cat, "data": "hello\n", "eof": True})
        s = (await call(c, "process_output", {"session": key, "pid": cat, "wait": "5s"})).structured_content
        assert s["data"] == "hello\n", s
        r = await call(c, "process_start", {"session": key, "cmd": "sleep 600"})
        sleeper = r.structured_content["pid"]
        listed = (await call(c, "process_list", {"session": key})).structured_content["processes"]
        assert any(p["pid"] == sleeper and p["state"] == "running" for p in listed), listed
        await call(c, "process_signal", {"session": key, "pid": sleeper, "signal": "TERM"})
        s = (await call(c, "process_output", {"session": key, "pid": sleeper, "wait": "5s"})).structured_content
        assert not s["running"] and s["signal"] == 15, s
        step("processes: output by cursor until exit, stdin, a signal, list")

        fork = f"{key}-fork"
        r = await call(c, "session_fork", {"session": key, "new_key": fork})
        assert not r.is_error, text(r)
        r = await call(c, "run", {"session": fork, "cmd": "cat notes.txt; echo fork-only > fork.txt"})
        assert r.structured_content["stdout"] == "remembered\n", text(r)
        r = await call(c, "run", {"session": key, "cmd": "test -e fork.txt && echo leaked || echo apart"})
        assert r.structured_content["stdout"] == "apart\n", text(r)
        step("fork")

        r = await call(c, "session_pause", {"session": key})
        assert r.structured_content["state"] == "paused", text(r)
        assert (await call(c, "session_get", {"session": key})).structured_content["state"] == "paused"
        r = await call(c, "run", {"session": key, "cmd": "cat notes.txt"})
        assert r.structured_content["stdout"] == "remembered\n", text(r)
        await call(c, "session_pause", {"session": key})
        r = await call(c, "session_resume", {"session": key})
        assert r.structured_content["state"] == "running", text(r)
        r = await call(c, "session_set_timeout", {"session": key, "timeout": "1h"})
        assert r.structured_content["expires"], text(r)
        step("pause, resume by use and by tool, timeout")

        notes = []

        async def progress(p, total, message):
            notes.append(message or "")

        r = await call(c, "run", {"session": key, "cmd": "for i in 1 2 3; do echo $i; sleep 0.5; done"},
                       progress_callback=progress)
        assert r.structured_content["stdout"] == "1\n2\n3\n", text(r)
        assert notes and "1" in "".join(notes), notes
        step(f"progress ({len(notes)} notifications)")

        t = time.monotonic()
        try:
            r = await asyncio.wait_for(c.call_tool("run", {"session": key, "cmd": "sleep 15", "timeout": "20s"}), 2)
            raise AssertionError(f"a 15 s sleep returned within 2 s: {text(r)}")
        except (asyncio.TimeoutError, TimeoutError):
            pass
        for _ in range(50):
            pool = httpx.get(URL.removesuffix("/mcp") + "/v1/pool").json()
            if pool.get("invocations_running", 0) == 0:
                break
            await asyncio.sleep(0.2)
        assert pool.get("invocations_running", 0) == 0, pool
        step(f"cancellation ends the command ({time.monotonic() - t:.1f} s)")

    # A new client: the cancelled call left the session usable.
    async with Client(URL, mode=MODE) as c:
        r = await call(c, "run", {"session": key, "cmd": "echo still-here"})
        assert r.structured_content["stdout"] == "still-here\n", text(r)
        for k in (key, fork):
            r = await call(c, "session_delete", {"session": k})
            assert not r.is_error, text(r)
        refused(await call(c, "session_delete", {"session": key}), "not_found")
        left = [x["key"] for x in (await call(c, "session_list", {})).structured_content["sessions"]]
        assert key not in left and fork not in left, left
        step("delete")
    step("done")


asyncio.run(main())
