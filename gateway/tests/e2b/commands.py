"""The real e2b Python SDK against Ember's envd emulation: commands in a
sandbox (foreground, background, stdin, kill, timeout, list, connect).
Prints one line per step; any failure raises (non-zero exit)."""

import time

from e2b import Sandbox
from e2b.exceptions import TimeoutException
from e2b.sandbox.commands.command_handle import CommandExitException


def step(name):
    print(f"ok {name}", flush=True)


sb = Sandbox.create(template="base", envs={"FROM_CREATE": "yes"})
try:
    assert sb.is_running()
    step("is_running")

    r = sb.commands.run("echo hello; echo err >&2; echo $FROM_CREATE $ONE; pwd", envs={"ONE": "1"})
    assert r.exit_code == 0, r
    assert r.stdout == "hello\nyes 1\n" + r.stdout.splitlines()[-1] + "\n", r.stdout
    assert r.stdout.splitlines()[-1].startswith("/home/"), r.stdout
    assert r.stderr == "err\n", r.stderr
    step("foreground")

    seen = []
    sb.commands.run("for i in 1 2 3; do echo line $i; done", on_stdout=lambda s: seen.append(s))
    assert "".join(seen).count("line") == 3, seen
    step("callbacks")

    try:
        sb.commands.run("echo out; exit 3")
        raise AssertionError("a non-zero exit did not raise")
    except CommandExitException as e:
        assert e.exit_code == 3 and e.stdout == "out\n", e
    try:
        sb.commands.run("no-such-command-here")
        raise AssertionError("127 did not raise")
    except CommandExitException as e:
        assert e.exit_code == 127, e
    step("non-zero exits")

    r = sb.commands.run("cd /tmp && pwd", cwd="/")
    assert r.stdout == "/tmp\n", r
    r = sb.commands.run("pwd", cwd="/tmp")
    assert r.stdout == "/tmp\n", r
    step("cwd")

    h = sb.commands.run("sleep 60", background=True)
    pids = [p.pid for p in sb.commands.list()]
    assert h.pid in pids, (h.pid, pids)
    r = sb.commands.run(f"kill -0 {h.pid} && echo alive")
    assert r.stdout == "alive\n", "the pid is the guest's real pid"
    assert h.kill() is True
    try:
        h.wait()
        raise AssertionError("a killed command's wait did not raise")
    except CommandExitException as e:
        assert e.exit_code == -1, e
    assert sb.commands.kill(h.pid) is False
    assert h.pid not in [p.pid for p in sb.commands.list()]
    step("background, list, kill")

    h = sb.commands.run("cat", background=True, stdin=True)
    sb.commands.send_stdin(h.pid, "through stdin\n")
    sb.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "through stdin\n", r
    step("stdin")

    h = sb.commands.run("echo early; sleep 1; echo late", background=True)
    time.sleep(0.3)
    h.disconnect()
    again = sb.commands.connect(h.pid)
    r = again.wait()
    assert r.stdout == "early\nlate\n", r.stdout
    step("disconnect and connect keep the output")

    t = time.monotonic()
    try:
        sb.commands.run("sleep 30", timeout=2)
        raise AssertionError("a command past its timeout did not fail")
    except (TimeoutException, CommandExitException):
        pass
    assert time.monotonic() - t < 15, time.monotonic() - t
    r = sb.commands.run("pgrep -x sleep || echo none")
    assert r.stdout == "none\n", f"the timed-out command runs on: {r.stdout}"
    step("timeout kills")

    big = sb.commands.run("head -c 300000 /dev/zero | tr '\\0' x; printf '\\n\\xc3\\xa9'")
    assert len(big.stdout) == 300002 and big.stdout.endswith("é"), len(big.stdout)
    step("large and UTF-8 output")
finally:
    sb.kill()
assert not sb.is_running()
step("done")
