//! The agent's only `unsafe` code: what a forked child does before `exec`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Set up `cmd` so that, between `fork` and `exec`, the child joins the
/// cgroup whose `cgroup.procs` is `cgroup_procs` and gets a new IPC
/// namespace (while still root), then drops to `user`. Joining first means
/// nothing the command forks can start outside the cgroup; the namespace
/// makes SysV IPC objects and POSIX message queues die with the command's
/// processes instead of outliving a reset. Dropping privileges last is why
/// std's `uid()` (which runs before pre-exec hooks) is not used. With
/// `terminal` the child starts a session whose controlling terminal is its
/// stdin (a pty slave).
pub fn confine_child(
    cmd: &mut Command,
    cgroup_procs: Option<&File>,
    user: Option<(u32, u32)>,
    terminal: bool,
) {
    let procs_fd: Option<RawFd> = cgroup_procs.map(|f| f.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (write, setsid, ioctl, unshare, setgroups,
    // setgid, setuid) on values captured by copy; it allocates nothing and
    // takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if terminal && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0) {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = user {
                if libc::unshare(libc::CLONE_NEWIPC) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Set the window size of the terminal whose master is `master`; the
/// kernel sends SIGWINCH to its foreground process group.
pub fn set_window_size(master: &impl AsRawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points
    // at a live local for the duration of the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Register an owned file with the tokio reactor.
pub fn async_file(file: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    // SAFETY: the AsyncFd takes ownership of `file`, so its descriptor stays
    // open and unchanged until the AsyncFd is dropped; File::as_raw_fd always
    // returns that same descriptor.
    unsafe { tokio::io::unix::AsyncFd::register(file) }.map_err(io::Error::from)
}

/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`): reseed the kernel's generator from
/// its input pool now. Needs CAP_SYS_ADMIN (the agent is root).
pub fn reseed_crng(random_dev: &File) -> io::Result<()> {
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an ioctl without an argument on a descriptor we own and keep
    // open for the call; the kernel reads and writes no user memory for it.
    let rc = unsafe { libc::ioctl(random_dev.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
