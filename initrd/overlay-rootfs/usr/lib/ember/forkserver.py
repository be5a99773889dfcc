"""Ember's pre-warmed Python: a fork server the guest agent starts before the
VM's clean snapshot, with the standard library modules most code imports
already imported. Each `lang: python` call forks a child from it instead of
starting an interpreter (~0.15 s of start-up and imports under TCG).

Protocol (a Unix stream socket that only root may use): the agent sends one
message with a 4-byte big-endian length and a JSON header, and with it, as
SCM_RIGHTS, the child's stdin, stdout and stderr and (optionally) the
`cgroup.procs` of the call's cgroup. The server forks; the child joins the
cgroup, gets its own process group and IPC namespace, drops to the user and
runs the script as `python3 PATH ARGS...` would. The server answers
`pid N\\n` at once and `exit STATUS\\n` (the raw wait status) when the child
has exited.

Usage: forkserver.py SOCKET_PATH [MODULE...]  (prints "ready" once it listens)
"""

import gc
import io
import json
import os
import selectors
import signal
import socket
import struct
import sys

MAX_HEADER = 4 << 20
CLONE_NEWIPC = 0x08000000
# What most code imports first; importing them here is what makes a call
# cheap. Kept to the standard library (an image adds its own, issue 14).
PRELOAD = [
    "abc", "argparse", "atexit", "base64", "bisect", "collections", "contextlib", "copy", "csv", "ctypes",
    "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib",
    "heapq", "itertools", "json", "math", "operator", "pathlib", "pprint", "random", "re",
    "shutil", "statistics", "string", "struct", "subprocess", "tempfile", "textwrap",
    "time", "traceback", "typing", "unicodedata", "uuid",
]

# How the interpreter set up its own stdio for this locale (C.UTF-8): the
# children's streams are made the same way.
STDIO = {
    "encoding": sys.stdout.encoding,
    "out_errors": sys.stdout.errors,
    "in_errors": sys.stdin.errors if sys.stdin else sys.stdout.errors,
}


def exit_code(e):
    """The process exit status CPython gives an uncaught SystemExit."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def user_site(home):
    import site
    if not site.ENABLE_USER_SITE or os.environ.get("PYTHONNOUSERSITE"):
        return None
    ver = "python%d.%d" % sys.version_info[:2]
    path = os.path.join(home, ".local", "lib", ver, "site-packages")
    return path if os.path.isdir(path) else None


_libc = None


def libc():
    """The C library, loaded once in the server (each child would pay for it)."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def close_other_fds():
    """Close every descriptor above stderr (listing them is far cheaper
    than closing all possible numbers one by one, under TCG)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def setup_child(hdr, fds):
    """Everything between fork and running the script, as the agent does
    for a command it executes."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)
    stdin_fd, stdout_fd, stderr_fd = fds[0], fds[1], fds[2]
    if hdr.get("cgroup") and len(fds) > 3:
        os.write(fds[3], b"0")
    uid, gid = hdr.get("uid"), hdr.get("gid")
    if uid is not None:
        if libc().unshare(CLONE_NEWIPC) != 0:
            import ctypes
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWIPC)")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    os.dup2(stdin_fd, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    close_other_fds()
    os.chdir(hdr["cwd"])
    os.environ.clear()
    os.environ.update(hdr["env"])
    enc = STDIO["encoding"]
    sys.stdin = sys.__stdin__ = open(0, "r", encoding=enc, errors=STDIO["in_errors"], closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=enc, errors=STDIO["out_errors"], closefd=False)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding=enc,
        errors="backslashreplace",
        line_buffering=True,
    )


def run_script(path, args):
    """Run `path` as `__main__`; return the exit status (or kill ourselves
    with SIGINT, as CPython does on an uncaught KeyboardInterrupt)."""
    import builtins
    import types
    sys.argv = [path] + list(args)
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    site_dir = user_site(os.environ.get("HOME", ""))
    if site_dir:
        import site
        site.addsitedir(site_dir)
    code = 0
    try:
        with open(path, "rb") as f:
            source = f.read()
        compiled = compile(source, path, "exec", dont_inherit=True)
        main = types.ModuleType("__main__")
        main.__file__ = path
        main.__builtins__ = builtins
        main.__cached__ = None
        sys.modules["__main__"] = main
        exec(compiled, main.__dict__)
    except SystemExit as e:
        code = exit_code(e)
    except BaseException as e:
        # Show the script's frames only, as `python3 PATH` would.
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        if isinstance(e, KeyboardInterrupt):
            flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        code = 1
    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except Exception:
            pass
    import atexit
    atexit._run_exitfuncs()
    return code if flush() else 120


def flush():
    ok = True
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            ok = False
    return ok


def child(hdr, fds):
    try:
        setup_child(hdr, fds)
    except BaseException as e:
        try:
            os.write(2, ("ember: cannot start python: %s\n" % e).encode())
        finally:
            os._exit(127)
    try:
        code = run_script(hdr["path"], hdr.get("args", []))
    except BaseException:
        code = 1
    os._exit(code)


def read_request(conn):
    msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 8)
    try:
        if len(msg) < 4:
            raise ValueError("short header")
        (n,) = struct.unpack(">I", msg[:4])
        if n > MAX_HEADER:
            raise ValueError("header too large")
        buf = bytearray(msg[4:])
        while len(buf) < n:
            more = conn.recv(n - len(buf))
            if not more:
                raise ValueError("connection closed mid-header")
            buf += more
        hdr = json.loads(bytes(buf[:n]))
        if len(fds) < 3:
            raise ValueError("expected 3 or 4 descriptors, got %d" % len(fds))
        return hdr, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def serve(path):
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(tmp)
    os.chmod(tmp, 0o600)
    srv.listen(64)
    os.rename(tmp, path)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children = {}
    # Frozen objects are never scanned by the collector, so a child's first
    # collection does not touch (and copy) every page of the preloaded heap.
    gc.collect()
    gc.freeze()
    # The agent starts us at the lowest priority, so that importing does not
    # slow the boot or the first commands; serving runs at the normal one.
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                accept_one(srv, children)
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            reap(children)


def accept_one(srv, children):
    try:
        conn, _ = srv.accept()
    except OSError:
        return
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0:
            raise PermissionError("peer uid %d" % uid)
        conn.settimeout(5)
        hdr, fds = read_request(conn)
    except Exception as e:
        print("forkserver: refused a request: %s" % e, file=sys.stderr, flush=True)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        child(hdr, fds)
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(b"pid %d\n" % pid)
    except OSError:
        pass
    children[pid] = conn


def reap(children):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(b"exit %d\n" % status)
            except OSError:
                pass
            conn.close()


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    for name in PRELOAD + sys.argv[2:]:
        try:
            __import__(name)
        except Exception as e:
            print("forkserver: cannot preload %s: %s" % (name, e), file=sys.stderr, flush=True)
    libc()
    os.chdir("/")
    serve(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
