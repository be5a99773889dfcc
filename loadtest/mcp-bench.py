"""An MCP `run` of `true` beside the same call over `/v1/run`, one server,
same run: alternating rounds (MCP, HTTP, MCP, HTTP, ...) of sequential calls
0.6 s apart (every call finds a reset VM), with the official MCP Python
client (one connection, protocol 2026-07-28) and a keep-alive HTTP client.
Prints each path's client latency p50/p95 and `ember serve`'s own CPU per
call (utime + stime from /proc; QEMU children not counted).
Inputs: EMBER_URL, EMBER_PID, N (calls per round, 20), ROUNDS (4)."""

import asyncio
import os
import statistics
import time

import httpx2 as httpx
from mcp import Client

URL = os.environ["EMBER_URL"].rstrip("/")
PID = os.environ["EMBER_PID"]
N = int(os.environ.get("N", "20"))
ROUNDS = int(os.environ.get("ROUNDS", "4"))
HZ = os.sysconf("SC_CLK_TCK")


def ticks():
    with open(f"/proc/{PID}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main():
    lat = {"mcp": [], "http": []}
    cpu = {"mcp": 0, "http": 0}
    async with Client(URL + "/mcp") as c, httpx.AsyncClient(timeout=60) as h:
        async def mcp_call():
            r = await c.call_tool("run", {"cmd": "true"})
            assert not r.is_error and r.structured_content["exit_code"] == 0, r.content

        async def http_call():
            r = await h.post(URL + "/v1/run", json={"cmd": "true"})
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

        await mcp_call()
        await http_call()
        for _ in range(ROUNDS):
            for name, fn in (("mcp", mcp_call), ("http", http_call)):
                before = ticks()
                for _ in range(N):
                    t = time.perf_counter()
                    await fn()
                    lat[name].append((time.perf_counter() - t) * 1000)
                    await asyncio.sleep(0.6)
                cpu[name] += ticks() - before
    for name in ("mcp", "http"):
        xs = lat[name]
        per_call = cpu[name] / HZ / len(xs) * 1000
        print(f"{name:4}: {len(xs)} calls, p50 {statistics.median(xs):.1f} ms, p95 {pct(xs, 95):.1f} ms, "
              f"gateway CPU {per_call:.2f} ms per call")


asyncio.run(main())
