//! Message types. Requests go host -> guest, responses guest -> host; both
//! carry the id of the request they belong to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestBody {
    /// Liveness and resynchronisation: the reply echoes `nonce`.
    Hello {
        nonce: u64,
    },
    /// Run a command; answered by `output` chunks then one `exit`.
    Exec(ExecRequest),
    /// Kill the process tree of the exec request `target`.
    Cancel {
        target: u64,
    },
    WriteFiles {
        files: Vec<FileSpec>,
    },
    Configure(Configure),
    /// Kill every process that is not the agent and wipe scratch state.
    /// (Empty struct variants, unlike unit ones, refuse unknown fields.)
    Reset {},
    /// Power the guest off after replying.
    Shutdown {},
    /// For a storage rollback: kill every user process, restore guest-wide
    /// state (hostname, /dev/shm, DNS) and unmount the scratch layer.
    DetachScratch {},
    /// Mount the (rolled back) scratch layer again.
    AttachScratch {},
    /// The in-guest reset between calls of one function: kill every process
    /// but the agent's own, empty the writable places, restore hostname and
    /// DNS, then verify that nothing of the user is left. An error means the
    /// host must fall back to a full reset. No VM-level state is touched.
    Scrub {},
    /// Start a background process that outlives this request and the
    /// connection: answered by `spawned`.
    Spawn(SpawnRequest),
    /// The background processes, running and exited: answered by `processes`.
    Processes {},
    /// A background process's output: a `dropped` count if older output
    /// was lost, what its buffer holds, then live output until it exits,
    /// then its `exit`. Cancelling detaches; the process goes on.
    Attach {
        pid: u32,
    },
    /// Write to a background process's stdin; `eof` closes it after `data`.
    Stdin {
        pid: u32,
        #[serde(default, with = "crate::bytes")]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    /// Send `signal` to a background process's process group.
    Signal {
        pid: u32,
        signal: i32,
    },
    /// Set the window size of a background process's terminal (one spawned
    /// with `pty`); the process gets SIGWINCH.
    Resize {
        pid: u32,
        cols: u16,
        rows: u16,
    },
    /// Open a TCP connection to `127.0.0.1:port` in the guest: answered by
    /// `connected`, then `output` frames (stdout) with what the guest side
    /// sends, each counted against a window the host opens with `credit`,
    /// then `ok` when the guest side closes. Cancelling closes it.
    Connect {
        port: u16,
    },
    /// Bytes for the connection opened by request `target`; `eof` shuts its
    /// write side after them. Answered by `ok` once written.
    Send {
        target: u64,
        #[serde(default, with = "crate::bytes")]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    /// Read a file as the guest's user (relative paths are under the
    /// workspace): answered by `connected` once it is open, then its bytes
    /// in `output` frames paced by `credit` as for `connect`, then `ok`.
    /// Read by the agent itself, with no pipe between: under TCG a pipe's
    /// copies cap a stream at ~27 MB/s.
    ReadFile {
        path: String,
    },
    /// Write a file as the guest's user (relative paths are under the
    /// workspace; parents are made, an existing file is truncated):
    /// answered by `connected` once it is open; its bytes follow as `send`s
    /// to this request, and `ok` ends it once one with `eof` is written (or
    /// when it is cancelled). Written by the agent itself, no pipe between.
    WriteFile {
        path: String,
    },
    /// Bytes for the file written by request `target` that the host put on
    /// the bulk lane (the VM's read-only disk of serial [`crate::LANE_SERIAL`]):
    /// `len` bytes from lane offset `lane_at`, to be written at file offset
    /// `at`. Answered by `ok` once written, so the host may reuse that part
    /// of the lane. Writes at their own offsets need no order among them.
    /// Host to guest this way, a 4 MiB piece is a few block requests; on a
    /// virtio-console it is a thousand 4 KiB reads, each with its own kick.
    LaneWrite {
        target: u64,
        at: u64,
        lane_at: u64,
        len: u32,
    },
    /// The host consumed `bytes` of connection `target`'s output: the agent
    /// may send that much more. Not answered.
    Credit {
        target: u64,
        bytes: u64,
    },
    /// The file at `path` (`lstat`, as the guest's user; relative paths are
    /// under the workspace): answered by `entries` with it alone.
    Stat {
        path: String,
    },
    /// The directory's entries, `depth` levels down (1: its children; a
    /// symbolic link is listed, never followed), sorted by path, at most
    /// `limit` of them ([`crate::MAX_LIST_ENTRIES`] at most, and as many as
    /// fit [`crate::MAX_LIST_BYTES`]): answered by `entries`, `truncated`
    /// when some were left out.
    List {
        path: String,
        depth: u32,
        limit: u32,
    },
    /// Make a directory (with `parents`, its missing parents too, and one
    /// that exists is no error): answered by `entries` with it.
    Mkdir {
        path: String,
        parents: bool,
    },
    /// Move `from` to `to` (`rename(2)`, or a copy then a removal across
    /// filesystems). Without `overwrite` an existing `to` is an error;
    /// with it, a file or an empty directory there is replaced. Answered
    /// by `entries` with what is now at `to`.
    Rename {
        from: String,
        to: String,
        overwrite: bool,
    },
    /// Remove a file, a symbolic link or an empty directory; with
    /// `recursive` a directory and all in it. With `missing_ok`, a path
    /// that does not exist is no error. Answered by `ok`.
    Remove {
        path: String,
        recursive: bool,
        missing_ok: bool,
    },
}

/// Bytes of a connection's output the agent sends before the host's first
/// `credit`; the host returns credit as it consumes them.
pub const CONNECT_WINDOW: u64 = 1 << 20;

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub command: Command,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Keep stdin open for `stdin` requests; else it reads EOF at once.
    #[serde(default)]
    pub stdin: bool,
    /// The caller's label, listed with it.
    #[serde(default)]
    pub tag: Option<String>,
    /// Output kept for later readers; older output is dropped (counted).
    pub buffer_bytes: u64,
    #[serde(default)]
    pub pids_limit: Option<u32>,
    /// Running background processes allowed at once; a spawn past it fails.
    pub max_processes: u32,
    /// Run it on a pseudo-terminal of this size (stdin, stdout and stderr
    /// all the terminal; its output comes as stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A background process as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    pub pid: u32,
    #[serde(default)]
    pub tag: Option<String>,
    pub command: Command,
    pub started_unix_ms: u64,
    /// `None` while it runs.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// Bytes of output it has written so far.
    pub output_bytes: u64,
    pub stdin_open: bool,
    /// Its terminal's size, if it runs on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Executed directly, `argv[0]` looked up in `PATH`.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// A Python script, as `python3 PATH ARGS...` would run it: forked from
    /// the guest's pre-warmed Python when it is healthy, else executed.
    Python(PythonScript),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonScript {
    /// The script file (absolute, or relative to the working directory).
    pub path: String,
    /// `sys.argv[1:]`.
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Command,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; the workspace when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default, with = "crate::bytes")]
    pub stdin: Vec<u8>,
    /// Wall-clock limit; the whole process tree is killed when it passes.
    pub timeout_ms: u64,
    /// Bytes of stdout+stderr passed back; the rest is read and dropped.
    pub output_limit: u64,
    /// Maximum tasks in the command's cgroup (fork-bomb guard).
    #[serde(default)]
    pub pids_limit: Option<u32>,
    /// Kill processes the command left running once it exits (default). A
    /// session may keep them.
    #[serde(default = "yes")]
    pub kill_leftovers: bool,
    /// Files written (as by `write_files`) before the command starts; a
    /// file that cannot be written fails the request. Not part of the
    /// command's `duration_us`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
}

fn yes() -> bool {
    true
}

impl ExecRequest {
    pub fn new(command: Command) -> Self {
        Self {
            command,
            env: BTreeMap::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: 30_000,
            output_limit: 1 << 20,
            pids_limit: None,
            kill_leftovers: true,
            files: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Relative to the workspace, or absolute inside a writable directory.
    pub path: String,
    #[serde(with = "crate::bytes")]
    pub content: Vec<u8>,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Configure {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Take every address and route off the guest's NICs (a session whose
    /// policy became `none`); applied before `network`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network_off: bool,
    /// Nameservers written to the guest's resolv.conf.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Set the guest's wall clock (milliseconds since the Unix epoch): a
    /// restored snapshot otherwise resumes with the clock it was saved with.
    #[serde(default)]
    pub clock_unix_ms: Option<u64>,
    /// Fresh randomness from the host, mixed into the guest's pool before
    /// its generator is reseeded: a restored snapshot otherwise resumes
    /// with the generator state it was saved with, so every VM restored
    /// from it would draw the same "random" numbers.
    #[serde(default, with = "crate::bytes", skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Guest interface, e.g. `eth0`.
    pub interface: String,
    /// Address with prefix length, e.g. `10.0.0.2/24`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseBody {
    Hello(HelloReply),
    Output {
        stream: Stream,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    Exit(ExitStatus),
    /// Success of a request that has no other result.
    Ok,
    Error(ErrorReply),
    Spawned {
        pid: u32,
    },
    Processes {
        processes: Vec<ProcessInfo>,
    },
    /// Output of an attached process that was lost before this reader got
    /// it (the buffer keeps the newest `buffer_bytes`).
    Dropped {
        bytes: u64,
    },
    /// A `connect` reached its port.
    Connected {},
    /// The result of `stat`, `list`, `mkdir` or `rename`.
    Entries {
        entries: Vec<crate::FsEntry>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    pub nonce: u64,
    pub protocol: u32,
    pub agent_version: String,
    pub uptime_ms: u64,
    /// The pre-warmed Python: `None` when the image has none, `false` while
    /// it is still importing its modules. A host about to snapshot the VM
    /// waits for `true`, so every restore has it warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_ready: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cancelled: bool,
    pub truncated: bool,
    pub duration_ms: u64,
    /// The same in microseconds (0 from agents before it existed).
    #[serde(default)]
    pub duration_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
    /// The guest's `errno` when a system call failed (a filesystem
    /// request's `ENOENT`, `EACCES`, `EEXIST`, ...): what the host decides
    /// on, never the message's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be parsed.
    BadFrame,
    /// The frame exceeded the size limit.
    FrameTooLarge,
    /// The request was understood but is invalid.
    BadRequest,
    /// The command could not be started.
    SpawnFailed,
    /// The guest failed to carry out the request.
    Internal,
    /// No such background process.
    NotFound,
    /// The process's state does not allow it (it exited, its stdin is closed).
    Conflict,
    /// Nothing answers on the guest port a `connect` asked for.
    Unreachable,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), errno: None }
    }

    /// A failed system call on `what`: its errno, and its words as the
    /// guest's tools print them (`a.txt: No such file or directory`).
    pub fn io(what: &str, e: &std::io::Error) -> Self {
        let words = e.to_string();
        let words = match words.find(" (os error") {
            Some(i) => &words[..i],
            None => &words,
        };
        Self { code: ErrorCode::BadRequest, message: format!("{what}: {words}"), errno: e.raw_os_error() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_request_json_shape_is_stable() {
        let mut req = ExecRequest::new(Command::Argv(vec!["echo".into(), "hi".into()]));
        req.stdin = b"\xff\x00".to_vec();
        let json = serde_json::to_value(Request { id: 9, body: RequestBody::Exec(req.clone()) }).unwrap();
        assert_eq!(json["body"]["type"], "exec");
        assert_eq!(json["body"]["command"]["argv"][1], "hi");
        assert_eq!(json["body"]["stdin"], "/wA=");
        let back: Request = serde_json::from_value(json).unwrap();
        assert_eq!(back.body, RequestBody::Exec(req));
    }

    #[test]
    fn defaults_apply_and_unknown_fields_are_refused() {
        let r: Request = serde_json::from_str(
            r#"{"id":1,"body":{"type":"exec","command":{"shell":"true"},"timeout_ms":5,"output_limit":9}}"#,
        )
        .unwrap();
        let RequestBody::Exec(e) = r.body else { panic!("not exec") };
        assert!(e.kill_leftovers);
        assert!(e.env.is_empty());
        let bad = r#"{"id":1,"body":{"type":"reset","extra":1}}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
    }

    #[test]
    fn fs_requests_and_errno_json_shape_is_stable() {
        let r: Request = serde_json::from_str(
            r#"{"id":2,"body":{"type":"rename","from":"a","to":"b","overwrite":false}}"#,
        )
        .unwrap();
        assert_eq!(r.body, RequestBody::Rename { from: "a".into(), to: "b".into(), overwrite: false });
        let bad = r#"{"id":2,"body":{"type":"remove","path":"a","recursive":true}}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err(), "missing_ok must be said");
        let e = ErrorReply::io("a.txt", &std::io::Error::from_raw_os_error(2));
        assert_eq!(e.message, "a.txt: No such file or directory");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["errno"], 2);
        let old: ErrorReply = serde_json::from_str(r#"{"code":"internal","message":"m"}"#).unwrap();
        assert_eq!(old.errno, None);
    }

    #[test]
    fn non_utf8_output_survives() {
        let data: Vec<u8> = (0..=255).collect();
        let resp = Response { id: 1, body: ResponseBody::Output { stream: Stream::Stdout, data } };
        let back: Response = crate::decode(&crate::encode(&resp).unwrap()[4..]).unwrap();
        assert_eq!(back, resp);
    }
}
