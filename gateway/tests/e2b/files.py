"""The real e2b Python SDK against Ember's envd emulation: a sandbox's files
(write and read as text and bytes, multipart and octet-stream uploads,
list with depth, exists, get_info, rename, make_dir, remove, signed URLs, errors).
Prints one line per step; any failure raises (non-zero exit)."""

import io

import httpx

from e2b import Sandbox
from e2b.exceptions import NotFoundException


def step(name):
    print(f"ok {name}", flush=True)


sb = Sandbox.create(template="base")
try:
    home = sb.commands.run("echo $HOME").stdout.strip()
    info = sb.files.write("notes/hello.txt", "hello, files\n")
    assert info.path == f"{home}/notes/hello.txt", info
    assert sb.files.read("notes/hello.txt") == "hello, files\n"
    step("write and read text")

    everything = bytes(range(256)) * 64
    sb.files.write("bin/all.bin", everything)
    assert sb.files.read("bin/all.bin", format="bytes") == everything
    sb.files.write("bin/stream.bin", io.BytesIO(everything))
    assert sb.files.read("bin/stream.bin", format="bytes") == everything
    r = sb.commands.run("sha256sum bin/all.bin bin/stream.bin | awk '{print $1}' | uniq | wc -l")
    assert r.stdout.strip() == "1", r
    step("bytes, every value, octet-stream")

    many = sb.files.write_files([
        {"path": "many/a.txt", "data": "A"},
        {"path": "many/b.txt", "data": "BB"},
    ])
    assert sorted(w.name for w in many) == ["a.txt", "b.txt"], many
    step("several files in one multipart")

    entries = sb.files.list("notes")
    assert [e.name for e in entries] == ["hello.txt"], entries
    e = entries[0]
    assert e.path == f"{home}/notes/hello.txt" and e.size == 13 and e.type.value == "file", e
    deep = sb.files.list(".", depth=2)
    assert f"{home}/many/b.txt" in [d.path for d in deep], [d.path for d in deep]
    step("list with depth")

    assert sb.files.exists("notes/hello.txt") is True
    assert sb.files.exists("notes/nope.txt") is False
    got = sb.files.get_info("notes/hello.txt")
    assert got.permissions.startswith("-rw") and got.owner and got.modified_time, got
    step("exists and get_info")

    moved = sb.files.rename("notes/hello.txt", "notes/renamed.txt")
    assert moved.path == f"{home}/notes/renamed.txt", moved
    assert sb.files.exists("notes/hello.txt") is False
    step("rename")

    assert sb.files.make_dir("made/deep/er") is True
    assert sb.files.make_dir("made/deep/er") is False
    try:
        sb.files.make_dir("notes/renamed.txt")
        raise AssertionError("make_dir over a file")
    except Exception as ex:  # InvalidArgumentException in the SDK
        assert "exists" in str(ex) or "not a directory" in str(ex), ex
    step("make_dir")

    sb.files.remove("made")
    assert sb.files.exists("made") is False
    sb.files.remove("never/was/here")
    step("remove (recursive, a missing path is fine)")

    # Signed URLs: fetched with no header at all, as a browser or curl
    # would; on a shared E2B_SANDBOX_URL they name no sandbox, so Ember
    # finds the one whose access token signed them.
    sb.files.write("shared/report.txt", "signed content\n")
    url = sb.download_url("shared/report.txt")
    assert "signature=v1_" in url, url
    r = httpx.get(url)
    assert (r.status_code, r.text) == (200, "signed content\n"), (r.status_code, r.text)
    assert httpx.get(sb.download_url("shared/report.txt", use_signature_expiration=120)).text == "signed content\n"
    forged = url.replace("signature=v1_", "signature=v1_A")
    assert httpx.get(forged).status_code == 401, "a forged signature was accepted"
    unsigned = url.split("&signature=")[0].split("?signature=")[0]
    assert httpx.get(unsigned).status_code in (401, 404), "an unsigned URL was served"
    up = sb.upload_url("shared/uploaded.txt")
    r = httpx.post(up, files={"file": ("uploaded.txt", b"sent by a signed url\n")})
    assert r.status_code == 200, (r.status_code, r.text)
    assert sb.files.read("shared/uploaded.txt") == "sent by a signed url\n"
    r = httpx.post(url, files={"file": ("report.txt", b"overwrite")})
    assert r.status_code == 401, "a read-signed URL wrote"
    assert sb.files.read("shared/report.txt") == "signed content\n"
    step("signed download_url and upload_url")

    for op in (lambda: sb.files.read("no/such/file"), lambda: sb.files.list("no/such/dir"),
               lambda: sb.files.rename("no/such", "x"), lambda: sb.files.get_info("no/such")):
        try:
            op()
            raise AssertionError("no error for a missing path")
        except NotFoundException:
            pass
    step("missing paths raise NotFound")
finally:
    sb.kill()
step("done")
