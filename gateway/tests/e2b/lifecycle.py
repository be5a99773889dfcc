"""The real e2b Python SDK against Ember: a sandbox's life through the
control plane. Run with the SDK's venv; E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY point it at the server under test. Prints one line per step;
any failure raises (non-zero exit)."""

import atexit
import time
import uuid

from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import SandboxException, NotFoundException

run = uuid.uuid4().hex[:8]


@atexit.register
def leave_nothing():
    # A failed step leaves no sandbox for the cases after this one.
    for s in Sandbox.list(query=SandboxQuery(metadata={"run": run})).next_items():
        Sandbox.kill(s.sandbox_id)


def step(name):
    print(f"ok {name}", flush=True)


sb = Sandbox.create(template="base", timeout=120, metadata={"run": run}, envs={"FOO": "bar"})
assert sb.sandbox_id and sb.sandbox_id == sb.sandbox_id.lower(), sb.sandbox_id
step(f"create {sb.sandbox_id}")

info = sb.get_info()
assert info.sandbox_id == sb.sandbox_id and info.template_id == "base", info
assert info.metadata == {"run": run}, info.metadata
life = (info.end_at - info.started_at).total_seconds()
assert 110 <= life <= 125, f"end - start = {life}"
step("get_info")

# E2B's base sandbox: sudo without a password, a root code may write to.
r = sb.commands.run("id -un; sudo -n id -un; sudo sh -c 'echo system > /etc/ember-e2b' && cat /etc/ember-e2b")
assert r.stdout == "ember\nroot\nsystem\n", r.stdout
step("sudo and a writable root")

other = Sandbox.create(template="base", metadata={"run": run, "second": "yes"})
r = other.commands.run("test -e /etc/ember-e2b && echo leaked || echo clean")
assert r.stdout == "clean\n", "another sandbox saw the first one's root: " + r.stdout
listed = Sandbox.list(query=SandboxQuery(metadata={"run": run})).next_items()
assert sorted(s.sandbox_id for s in listed) == sorted([sb.sandbox_id, other.sandbox_id]), listed
only = Sandbox.list(query=SandboxQuery(metadata={"run": run, "second": "yes"})).next_items()
assert [s.sandbox_id for s in only] == [other.sandbox_id], only
step("list with metadata")

before = sb.get_info().end_at
sb.set_timeout(600)
after = sb.get_info().end_at
assert (after - before).total_seconds() > 400, (before, after)
step("set_timeout")

sb.files.write("kept.txt", "before the pause")
keeper = sb.commands.run("sleep 600", background=True)
assert sb.pause() in (True, None) or sb.get_info().state == "paused"
assert sb.get_info().state == "paused"
assert sb.pause() is False, "a second pause is False (409)"
paused = Sandbox.list(query=SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED])).next_items()
assert [s.sandbox_id for s in paused] == [sb.sandbox_id], paused
step("pause")

again = Sandbox.connect(sb.sandbox_id)
assert again.sandbox_id == sb.sandbox_id
assert again.get_info().state == "running"
assert again.files.read("kept.txt") == "before the pause", "files kept across the pause"
assert keeper.pid in [p.pid for p in again.commands.list()], "processes kept across the pause"
assert again.commands.run("cat /etc/ember-e2b").stdout == "system\n", "the root's changes kept across the pause"
step("connect resumes")

assert other.kill() is True
assert Sandbox.kill(other.sandbox_id) is False
try:
    Sandbox.get_info(other.sandbox_id)
    raise AssertionError("a killed sandbox's info")
except NotFoundException:
    pass
step("kill")

try:
    Sandbox.create(template=f"no-such-template-{run}")
    raise AssertionError("an unknown template was created")
except SandboxException as e:
    assert "not found" in str(e), e
step("unknown template")

short = Sandbox.create(template="base", timeout=3)
assert short.is_running()
time.sleep(2)
assert short.get_info().state == "running", "idle is not an end for a sandbox"
time.sleep(3)
try:
    Sandbox.get_info(short.sandbox_id)
    raise AssertionError("a sandbox past its timeout is still there")
except NotFoundException:
    pass
assert not short.is_running()
step("a timeout ends it")

if hasattr(sb, "fork"):  # e2b >= 2.51 only
    sb.commands.run("echo parent > mark.txt")
    forks = sb.fork()
    assert len(forks) == 1 and not isinstance(forks[0], Exception), forks
    child = forks[0]
    assert child.sandbox_id != sb.sandbox_id
    assert child.commands.run("cat mark.txt").stdout == "parent\n"
    child.commands.run("echo child > mark.txt")
    assert sb.commands.run("cat mark.txt").stdout == "parent\n", "the fork shares nothing after it"
    child.kill()
    step("fork")

assert sb.kill() is True
step("done")
