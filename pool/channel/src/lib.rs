//! Agent channels: how the host reaches the agent inside a VM.
//!
//! - `vsock`: kernel vhost-vsock, by guest CID (production hosts; needs the
//!   `vhost_vsock` module and `/dev/vhost-vsock`).
//! - `hybrid-vsock`: vhost-user vsock served by `vhost-device-vsock`; the
//!   host side is a Unix socket speaking `CONNECT <port>`.
//! - `serial`: virtio-serial on a Unix socket; migratable, so snapshot
//!   features use it.
#![forbid(unsafe_code)]

mod cid;
mod client;
pub mod lane;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::UnixStream;

pub use cid::{CidAllocator, CidLease};
pub use client::{
    AgentClient, AgentError, CallTimeouts, DirWatch, ExecEvent, ExecHandle, ExecOutput, FileUpload, Listing,
    MAX_BUFFERED_PER_REQUEST, MAX_IN_FLIGHT, UPLOAD_PIECE,
};
pub use lane::BulkLane;

/// Run a `sh -c` command with defaults, for tests and the CLI.
pub fn shell(cmd: &str) -> ember_wire::ExecRequest {
    ember_wire::ExecRequest::new(ember_wire::Command::Shell(cmd.into()))
}

/// A channel kind as configured: `auto` picks from what the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelChoice {
    Auto,
    Vsock,
    HybridVsock,
    Serial,
}

/// A concrete channel kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    Vsock,
    HybridVsock,
    Serial,
}

impl ChannelKind {
    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Vsock => "vsock",
            ChannelKind::HybridVsock => "hybrid-vsock",
            ChannelKind::Serial => "serial",
        }
    }

    /// Whether QEMU can snapshot or migrate a VM using this channel.
    pub fn migratable(self) -> bool {
        !matches!(self, ChannelKind::HybridVsock)
    }
}

impl std::fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ChannelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "vsock" => Self::Vsock,
            "hybrid-vsock" => Self::HybridVsock,
            "serial" => Self::Serial,
            other => return Err(format!("unknown channel {other:?} (auto, vsock, hybrid-vsock, serial)")),
        })
    }
}

/// What the host offers, for `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostChannels {
    pub vhost_vsock: bool,
    pub vhost_device_vsock: bool,
}

impl HostChannels {
    pub fn probe(vhost_device_vsock: &Path) -> Self {
        Self {
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            vhost_device_vsock: ember_sys::os::find_program(vhost_device_vsock).is_some(),
        }
    }
}

/// Resolve `auto`: kernel vsock where the host has it, else hybrid vsock,
/// else virtio-serial. `need_migratable` skips hybrid vsock (snapshots).
pub fn choose(
    choice: ChannelChoice,
    host: HostChannels,
    need_migratable: bool,
) -> Result<ChannelKind, String> {
    match choice {
        ChannelChoice::Vsock if !host.vhost_vsock => {
            Err("channel vsock needs /dev/vhost-vsock (load the vhost_vsock module)".into())
        }
        ChannelChoice::Vsock => Ok(ChannelKind::Vsock),
        ChannelChoice::HybridVsock if !host.vhost_device_vsock => {
            Err("channel hybrid-vsock needs the vhost-device-vsock program".into())
        }
        ChannelChoice::HybridVsock if need_migratable => {
            Err("channel hybrid-vsock cannot be snapshotted; use serial or vsock".into())
        }
        ChannelChoice::HybridVsock => Ok(ChannelKind::HybridVsock),
        ChannelChoice::Serial => Ok(ChannelKind::Serial),
        ChannelChoice::Auto if host.vhost_vsock => Ok(ChannelKind::Vsock),
        ChannelChoice::Auto if host.vhost_device_vsock && !need_migratable => Ok(ChannelKind::HybridVsock),
        ChannelChoice::Auto => Ok(ChannelKind::Serial),
    }
}

/// Where to reach one VM's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelAddr {
    Vsock { cid: u32, port: u32 },
    HybridVsock { uds: PathBuf, port: u32 },
    Serial { socket: PathBuf },
}

pub trait AgentStream: AsyncRead + AsyncWrite + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + 'static> AgentStream for T {}

/// Open one connection attempt to the agent; callers retry until the guest
/// is up. `patience` bounds the wait for the hybrid-vsock `OK`: a `CONNECT`
/// is queued by the device until the guest's vsock driver takes it, so it is
/// answered (OK, or a reset if nothing listens yet) only once the guest is
/// up. Abandoning queued requests early and sending more made
/// vhost-device-vsock stop answering altogether under load.
pub async fn connect(addr: &ChannelAddr, patience: Duration) -> std::io::Result<Pin<Box<dyn AgentStream>>> {
    match addr {
        ChannelAddr::Vsock { cid, port } => {
            let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?;
            Ok(Box::pin(s))
        }
        ChannelAddr::HybridVsock { uds, port } => Ok(Box::pin(hybrid_connect(uds, *port, patience).await?)),
        ChannelAddr::Serial { socket } => Ok(Box::pin(UnixStream::connect(socket).await?)),
    }
}

/// The hybrid-vsock handshake: `CONNECT <port>\n`, answered `OK <n>\n`.
async fn hybrid_connect(uds: &Path, port: u32, patience: Duration) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Read the reply line byte by byte so no agent byte is swallowed.
    let mut reader = tokio::io::BufReader::with_capacity(1, &mut s);
    let mut line = String::new();
    let n = tokio::time::timeout(patience, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply to CONNECT"))??;
    if n == 0 || !line.starts_with("OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock CONNECT {port} refused: {:?}", line.trim()),
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_kernel_vsock_then_hybrid_then_serial() {
        let all = HostChannels { vhost_vsock: true, vhost_device_vsock: true };
        let user = HostChannels { vhost_vsock: false, vhost_device_vsock: true };
        let none = HostChannels { vhost_vsock: false, vhost_device_vsock: false };
        assert_eq!(choose(ChannelChoice::Auto, all, false), Ok(ChannelKind::Vsock));
        assert_eq!(choose(ChannelChoice::Auto, user, false), Ok(ChannelKind::HybridVsock));
        assert_eq!(choose(ChannelChoice::Auto, user, true), Ok(ChannelKind::Serial));
        assert_eq!(choose(ChannelChoice::Auto, none, false), Ok(ChannelKind::Serial));
        assert!(choose(ChannelChoice::Vsock, user, false).unwrap_err().contains("vhost_vsock"));
        assert!(choose(ChannelChoice::HybridVsock, none, false).is_err());
        assert!(choose(ChannelChoice::HybridVsock, all, true).is_err());
        assert_eq!("hybrid-vsock".parse::<ChannelChoice>(), Ok(ChannelChoice::HybridVsock));
        assert!("tcp".parse::<ChannelChoice>().is_err());
    }

    #[tokio::test]
    async fn hybrid_handshake_against_a_fake_vhost_device() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
        });
        let mut s = hybrid_connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut rest = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut rest).await.unwrap();
        assert_eq!(&rest, b"hello", "bytes after the OK line belong to the agent");
        server.await.unwrap();
    }
}
