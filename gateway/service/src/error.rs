//! The one error of every operation: what kind of failure it is (each
//! front end maps the kind to its own status: HTTP, E2B, MCP), a stable
//! machine-readable code, the message, and when to retry. Which agent and
//! pool failures become which error is decided here, once.

use ember_channel::AgentError;
use ember_pool::pool::PoolError;
use ember_wire::ErrorCode;
use serde::{Deserialize, Serialize};

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is wrong (a bad value, an unknown field, an errno such as ENOTDIR).
    Invalid,
    /// The guest's permissions refuse it.
    Forbidden,
    NotFound,
    /// A method the resource does not have.
    NotAllowed,
    /// The state of what it names does not allow it (exists, not empty, in use).
    Conflict,
    /// It existed and is lost (a session whose VM died).
    Gone,
    /// Over a size limit.
    TooLarge,
    /// A body of a type the operation does not take.
    Unsupported,
    /// The program cannot be started.
    Unprocessable,
    /// Over a limit for now: try again after `retry_after`.
    Busy,
    /// The VM or its agent failed (it is replaced).
    VmFailed,
    /// The server cannot now (draining, a VM could not be made, a pause that cannot happen).
    Unavailable,
    /// The guest's disk is full.
    NoSpace,
}

impl Kind {
    /// The HTTP status of this kind: Ember's API answers it, and MCP tool
    /// errors carry it.
    pub fn http_status(self) -> u16 {
        match self {
            Kind::Invalid => 400,
            Kind::Forbidden => 403,
            Kind::NotFound => 404,
            Kind::NotAllowed => 405,
            Kind::Conflict => 409,
            Kind::Gone => 410,
            Kind::TooLarge => 413,
            Kind::Unsupported => 415,
            Kind::Unprocessable => 422,
            Kind::Busy => 429,
            Kind::VmFailed => 502,
            Kind::Unavailable => 503,
            Kind::NoSpace => 507,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    /// Stable, machine-readable: `bad_request`, `pool_exhausted`, ...
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

/// What `{"error": ...}` holds, in a JSON answer and as an NDJSON stream's
/// last line: the one definition of the error shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[derive(Serialize)]
struct Body {
    error: ErrorBody,
}

impl Error {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        Self { kind, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, "bad_request", message)
    }

    /// A 400 with its own code (`unknown_image`, ...).
    pub fn bad_request_code(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, "not_found", message)
    }

    pub fn busy(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(Kind::Busy, code, message) }
    }

    pub fn draining() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(Kind::Unavailable, "draining", "the server is shutting down")
        }
    }

    pub fn vm_failed(message: impl Into<String>) -> Self {
        Self::new(Kind::VmFailed, "vm_failed", message)
    }

    /// What goes under `"error"`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code.into(), message: self.message.clone() }
    }

    /// The whole JSON body, `{"error": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(Body { error: self.body() }).unwrap_or_default()
    }

    /// An error from VM `vm`'s agent, as the caller sees it, and whether
    /// the VM can no longer be trusted (then it is destroyed).
    pub fn from_agent(vm: &str, e: AgentError) -> (Self, bool) {
        let broken = e.dooms_vm();
        let api = match e {
            AgentError::Remote(r) if r.errno.is_some() => Self::from_errno(r.errno.unwrap_or(0), r.message),
            AgentError::Remote(r) => match r.code {
                ErrorCode::BadRequest => Self::new(Kind::Invalid, "invalid_request", r.message),
                ErrorCode::SpawnFailed => Self::new(Kind::Unprocessable, "spawn_failed", r.message),
                ErrorCode::NotFound => Self::not_found(r.message),
                ErrorCode::Conflict => Self::conflict("process_state", r.message),
                ErrorCode::Unreachable => Self::new(Kind::VmFailed, "port_unreachable", r.message),
                _ => Self::vm_failed(format!("VM {vm}: {}", r.message)),
            },
            // Our own bound, not the guest's fault: the VM stays.
            AgentError::TooManyInFlight { .. } => Self::busy("too_many_requests", e.to_string(), 1),
            other => Self::vm_failed(format!("VM {vm}: {other}")),
        };
        (api, broken)
    }

    /// A system call in the guest failed with `errno` (a file operation):
    /// its status by the errno, the guest's words as the message.
    pub fn from_errno(errno: i32, message: String) -> Self {
        use nix::errno::Errno;
        match Errno::from_raw(errno) {
            Errno::ENOENT => Self::not_found(message),
            Errno::EACCES | Errno::EPERM | Errno::EROFS => {
                Self::new(Kind::Forbidden, "permission_denied", message)
            }
            Errno::EEXIST | Errno::ENOTEMPTY => Self::conflict("file_exists", message),
            Errno::ENOSPC | Errno::EDQUOT => Self::new(Kind::NoSpace, "no_space", message),
            _ => Self::new(Kind::Invalid, "invalid_request", message),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<PoolError> for Error {
    fn from(e: PoolError) -> Self {
        let msg = e.to_string();
        match e {
            PoolError::Exhausted { retry_after, .. } => {
                // Whole seconds, rounded up, at least one.
                let secs = u32::try_from(retry_after.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1);
                Self::busy("pool_exhausted", msg, secs)
            }
            PoolError::SessionLimit { .. } => Self::busy("session_limit", msg, 5),
            PoolError::Draining => Self::draining(),
            PoolError::SessionLost { .. } => Self::new(Kind::Gone, "session_lost", msg),
            PoolError::SessionExists { .. } => Self::conflict("session_exists", msg),
            PoolError::NoSession { .. } => Self::not_found(msg),
            PoolError::PausedLimit { .. } => Self::busy("paused_limit", msg, 5),
            PoolError::Pause(_) => Self::new(Kind::Unavailable, "pause_failed", msg),
            PoolError::Create(_) | PoolError::Reset { .. } => {
                Self::new(Kind::Unavailable, "vm_unavailable", msg)
            }
            // The host could not set the VM's network up: the call never ran.
            PoolError::Network(_) => Self::new(Kind::Unavailable, "network_unavailable", msg),
        }
    }
}
