//! The guest ends of the agent channels: an AF_VSOCK listener (kernel vsock
//! and hybrid vsock look the same from inside) and a virtio-serial port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::{Agent, Args};

/// Poll interval while a transport is not up yet.
const RETRY: Duration = Duration::from_millis(50);
/// Give up on a transport the guest does not have after this long.
const GIVE_UP: Duration = Duration::from_secs(30);

pub async fn serve_all(agent: Arc<Agent>, args: Args) -> io::Result<()> {
    let vsock = async {
        if let Some(port) = args.vsock_port {
            serve_vsock(Arc::clone(&agent), port).await;
        }
    };
    let serial = async {
        if args.serial {
            serve_serial(Arc::clone(&agent)).await;
        }
    };
    tokio::join!(vsock, serial);
    Err(io::Error::other("no transport is serving"))
}

async fn retry<T>(what: &str, mut attempt: impl FnMut() -> io::Result<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + GIVE_UP;
    loop {
        match attempt() {
            Ok(v) => return Some(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::info!(error = %e, "{what} not available; not serving it");
                return None;
            }
            Err(_) => tokio::time::sleep(RETRY).await,
        }
    }
}

async fn serve_vsock(agent: Arc<Agent>, port: u32) {
    let Some(listener) = retry("vsock", || VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))).await
    else {
        return;
    };
    tracing::info!(port, "listening on vsock");
    // On the console itself, whatever the init does with our stderr.
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(console, "{}", ember_wire::VSOCK_READY_MARKER);
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let agent = Arc::clone(&agent);
                tokio::spawn(async move {
                    if let Err(e) = crate::serve(agent, stream).await {
                        tracing::warn!(%peer, error = %e, "vsock session failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "vsock accept failed");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// `/dev/vportNpM` of the port named [`ember_wire::SERIAL_PORT_NAME`].
fn find_serial_port() -> io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == ember_wire::SERIAL_PORT_NAME {
            return Ok(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "agent serial port not found"))
}

async fn serve_serial(agent: Arc<Agent>) {
    let Some(port) = retry("virtio-serial port", || {
        let path = find_serial_port()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        crate::sys::async_file(file)
    })
    .await
    else {
        return;
    };
    tracing::info!("serving virtio-serial port");
    let port = Arc::new(port);
    loop {
        let stream = SerialStream { fd: Arc::clone(&port) };
        match crate::serve(Arc::clone(&agent), stream).await {
            // The port reads EOF while no host is connected; the next host
            // starts a fresh session (and a fresh frame decoder). Wait a
            // little between probes rather than spin on EOF.
            Ok(stats) if stats.bytes_read == 0 => tokio::time::sleep(RETRY).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "serial session failed");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// A non-blocking virtio-serial port as a tokio stream. Clones share the fd.
struct SerialStream {
    fd: Arc<AsyncFd<File>>,
}

impl AsyncRead for SerialStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
