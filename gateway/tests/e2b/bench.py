"""Latency through the real e2b Python SDK: Sandbox.create() plus the first
commands.run("true"), and Sandbox.connect() of a paused sandbox plus a
command. N rounds (E2B_BENCH_N, default 5), one sandbox at a time; prints
each round and the medians, in ms (client side, the SDK's whole call)."""

import os
import statistics
import time

from e2b import Sandbox

n = int(os.environ.get("E2B_BENCH_N", "5"))
create, connect, pause = [], [], []
for i in range(n):
    t = time.perf_counter()
    sb = Sandbox.create(template="base")
    sb.commands.run("true")
    create.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    sb.pause()
    pause.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    again = Sandbox.connect(sb.sandbox_id)
    again.commands.run("true")
    connect.append((time.perf_counter() - t) * 1000)
    again.kill()
    print(f"round {i + 1}: create+run {create[-1]:.0f} ms, pause {pause[-1]:.0f} ms, connect+run {connect[-1]:.0f} ms", flush=True)
    time.sleep(1)
med = statistics.median
print(f"median of {n}: create + first run {med(create):.0f} ms (min {min(create):.0f}, max {max(create):.0f}); "
      f"pause {med(pause):.0f} ms; connect (resume) + run {med(connect):.0f} ms (min {min(connect):.0f}, max {max(connect):.0f})")
