"""A long-poll open when the server drains: KEY_A opens session drain-s
through MCP, starts `sleep 600` and asks for its output with wait "30s";
prints "waiting" first, then how the call ended and after how long. The
test sends SIGTERM meanwhile: the call must end (an error or a result) well
before its 30 s, not hang. EMBER_URL names the server."""

import asyncio
import os
import time

import httpx2 as httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["EMBER_URL"].rstrip("/") + "/mcp"


async def main():
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {os.environ['KEY_A']}"}, timeout=60)
    async with Client(streamable_http_client(URL, http_client=http), mode=os.environ.get("MODE", "legacy")) as c:
        r = await c.call_tool("session_create", {"key": "drain-s"})
        assert not r.is_error, r.content
        r = await c.call_tool("process_start", {"session": "drain-s", "cmd": "sleep 600"})
        pid = r.structured_content["pid"]
        print("waiting", flush=True)
        t = time.monotonic()
        try:
            r = await asyncio.wait_for(
                c.call_tool("process_output", {"session": "drain-s", "pid": pid, "wait": "30s"}), 60
            )
            print(f"ended {time.monotonic() - t:.1f} s: result (error: {r.is_error})", flush=True)
        except Exception as e:  # the stream closed under it: what a drain may do
            print(f"ended {time.monotonic() - t:.1f} s: {type(e).__name__}", flush=True)


try:
    asyncio.run(main())
except BaseException as e:  # the client's own shutdown may fail once the server is gone
    if not isinstance(e, (Exception, BaseExceptionGroup)):
        raise
