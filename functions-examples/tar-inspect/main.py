"""List the entries of input.tar (the request body, written by Ember) as JSON.

Nothing is extracted: each regular file is read from the archive to hash it.
Entries an extractor should refuse are flagged: absolute paths, '..'
components, links pointing outside the archive, device nodes, setuid bits.
"""
import hashlib
import json
import posixpath
import sys
import tarfile


def warnings_for(m):
    w = []
    name = m.name
    if name.startswith("/"):
        w.append("absolute path")
    if ".." in name.split("/"):
        w.append("'..' in path")
    if m.issym() or m.islnk():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
        if m.linkname.startswith("/") or target.startswith(".."):
            w.append(f"link points outside: {m.linkname}")
    if m.ischr() or m.isblk() or m.isfifo():
        w.append("device or fifo")
    if m.mode & 0o6000:
        w.append("setuid/setgid")
    return w


def kind(m):
    for test, k in ((m.isfile, "file"), (m.isdir, "dir"), (m.issym, "symlink"), (m.islnk, "hardlink")):
        if test():
            return k
    return "other"


def main():
    try:
        tar = tarfile.open("input.tar", mode="r:*")
    except (tarfile.TarError, OSError) as e:
        print(f"not a tar archive: {e}", file=sys.stderr)
        return 2
    entries, total, flagged = [], 0, 0
    with tar:
        for m in tar:
            e = {"name": m.name, "type": kind(m), "size": m.size, "mode": oct(m.mode & 0o7777)}
            if m.isfile():
                h = hashlib.sha256()
                f = tar.extractfile(m)
                for block in iter(lambda: f.read(1 << 16), b""):
                    h.update(block)
                e["sha256"] = h.hexdigest()
                total += m.size
            w = warnings_for(m)
            if w:
                e["warnings"] = w
                flagged += 1
            entries.append(e)
    print(json.dumps({"entries": len(entries), "bytes": total, "flagged": flagged, "list": entries}, indent=2))
    return 0


sys.exit(main())
