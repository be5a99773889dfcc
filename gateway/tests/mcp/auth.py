"""Ember's keys on /mcp, with the official MCP Python client: no key and a
wrong key are 401s; KEY_A's session (SESSION) is invisible to KEY_B in every
tool that names it; KEY_A still reads it. Both protocol generations.
EMBER_URL names the server. Prints one line per step; any failure raises."""

import asyncio
import os

import httpx2 as httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["EMBER_URL"].rstrip("/") + "/mcp"
A, B, SESSION = os.environ["KEY_A"], os.environ["KEY_B"], os.environ["SESSION"]


def step(name):
    print(f"ok {name}", flush=True)


def client(key, mode):
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return Client(streamable_http_client(URL, http_client=http), mode=mode)


async def main():
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    h = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    r = httpx.post(URL, json=body, headers=h)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (r.status_code, r.text)
    assert "bearer" in r.headers.get("www-authenticate", "").lower(), r.headers
    r = httpx.post(URL, json=body, headers={**h, "Authorization": "Bearer ember_wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_key", (r.status_code, r.text)
    step("no key and a wrong key are 401")
    for mode in ("auto", "legacy"):
        async with client(B, mode) as c:
            for tool, args in [
                ("session_get", {"session": SESSION}),
                ("run", {"session": SESSION, "cmd": "cat secret.txt"}),
                ("file_read", {"session": SESSION, "path": "secret.txt"}),
                ("file_list", {"session": SESSION}),
                ("process_list", {"session": SESSION}),
                ("session_delete", {"session": SESSION}),
            ]:
                r = await c.call_tool(tool, args)
                assert r.is_error and r.structured_content["error"]["code"] == "not_found", (tool, r.content)
            listed = (await c.call_tool("session_list", {})).structured_content["sessions"]
            assert all(s["key"] != SESSION for s in listed), listed
        async with client(A, mode) as c:
            r = await c.call_tool("file_read", {"session": SESSION, "path": "secret.txt"})
            assert not r.is_error and r.structured_content["content"] == "alice only", r.content
        step(f"{mode}: another tenant's session is not found; its own tenant reads it")
    step("done")


asyncio.run(main())
