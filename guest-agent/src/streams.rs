//! TCP connections to guest ports for the host (`connect`, `send`,
//! `credit`): the host's port proxy reaches a server inside the guest over
//! the agent channel, with no guest network at all. What the guest side
//! sends goes out in `output` frames within a window the host reopens as it
//! consumes them, so a slow HTTP client never makes either side buffer
//! without bound. A connection lives as long as its `connect` request: the
//! host cancels it, or the guest side closes.
//!
//! Files travel the same way, read (`read_file`, paced output) or written
//! (`write_file`, then `send`s), by the agent itself as the guest's user:
//! under TCG a pipe to `cat` caps a stream at ~27 MB/s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_wire::{ErrorCode, ErrorReply, Response, ResponseBody, Stream, CONNECT_WINDOW};
use std::io::{Read as _, Write as _};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::connection::Outgoing;

/// How long a connect to a guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a guest server may wait for it to read.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the guest side per `output` frame.
const CHUNK: usize = 256 << 10;

/// Open `path` (relative to the workspace) with `open` as the guest's user,
/// off the async threads; on failure request `id` is answered with the
/// error and its errno.
async fn open_as<T: Send + 'static>(
    layout: &crate::GuestLayout,
    id: u64,
    path: &str,
    resp: &mpsc::Sender<Response>,
    open: impl FnOnce(&std::path::Path) -> std::io::Result<T> + Send + 'static,
) -> Option<T> {
    let full = layout.workspace.join(path);
    let user = layout.user;
    let opened = tokio::task::spawn_blocking(move || {
        let _as_user = user.map(|(uid, gid)| crate::files::FsIdGuard::switch(uid, gid));
        open(&full)
    })
    .await;
    let e = match opened {
        Ok(Ok(f)) => return Some(f),
        Ok(Err(e)) => ErrorReply::io(path, &e),
        Err(e) => err(ErrorCode::Internal, format!("the open task failed: {e}")),
    };
    let _ = resp.send(Response { id, body: ResponseBody::Error(e) }).await;
    None
}

/// What a file request does.
#[derive(Debug, Clone, Copy)]
pub enum FileOp {
    Read,
    Write,
}

/// The open connections of one host connection, by their `connect` id.
#[derive(Debug, Default, Clone)]
pub struct Streams {
    table: Arc<Mutex<HashMap<u64, Arc<Tunnel>>>>,
    /// The connection's writer, where streams send their frames and pieces
    /// in order (without it, pieces are copied into `output` frames).
    out: Option<mpsc::Sender<Outgoing>>,
}

/// Where a stream's bytes come from: a connection's read side, or a file
/// read off the async threads, each piece into a buffer of its own that
/// travels on as the frame's bytes (no copy in between).
enum Source {
    Tcp(OwnedReadHalf),
    File(Arc<FileIn>),
}

/// What a source gave: bytes of their own, or a piece of a direct read's
/// aligned buffer.
enum Data {
    Owned(Vec<u8>),
    Piece(Piece),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Owned(v) => v.len(),
            Data::Piece(p) => p.bytes().len(),
        }
    }
}

/// Bytes a direct read put in the aligned part of a buffer, sent from
/// where they are (a copy in the agent was most of its user time per
/// download under TCG: docs/BENCHMARKS.md, Sandboxes);
/// the buffer goes back to its reader's spares once they are written.
pub struct Piece {
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
    spares: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Buffers a file reader keeps for its next pieces: a window's worth.
const SPARES: usize = (CONNECT_WINDOW as usize).div_ceil(CHUNK) + 2;

impl Piece {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() < SPARES {
            spares.push(std::mem::take(&mut self.buf));
        }
    }
}

/// A file being read: through `direct` (`O_DIRECT`, when the file system
/// has it) into an aligned buffer of its own, so the bytes come from the
/// disk by DMA and never fill the guest's page cache, which under TCG costs
/// more than the copy out of it; else (or once a read is refused) buffered.
struct FileIn {
    buffered: std::fs::File,
    direct: Mutex<Option<DirectReader>>,
    /// Buffers of pieces already sent, for the next reads.
    spares: Arc<Mutex<Vec<Vec<u8>>>>,
}

struct DirectReader {
    file: std::fs::File,
    /// The file offset of the next read.
    pos: u64,
}

impl FileIn {
    fn new(buffered: std::fs::File, direct: Option<std::fs::File>) -> Self {
        let direct = direct.map(|file| DirectReader { file, pos: 0 });
        Self { buffered, direct: Mutex::new(direct), spares: Arc::default() }
    }

    /// The next piece (empty at the end), read off the async threads.
    fn next(&self) -> std::io::Result<Data> {
        use std::io::Seek as _;
        use std::os::unix::fs::FileExt as _;
        let mut direct = self.direct.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = direct.as_mut() {
            let spare = self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut buf = spare.unwrap_or_else(|| crate::lane::aligned_buffer(CHUNK).0);
            // The same allocation: its aligned part starts where it did.
            let start = buf.as_ptr().align_offset(crate::lane::ALIGN);
            match r.file.read_at(&mut buf[start..start + CHUNK], r.pos) {
                Ok(n) => {
                    r.pos += n as u64;
                    let spares = Arc::clone(&self.spares);
                    return Ok(Data::Piece(Piece { buf, range: start..start + n, spares }));
                }
                // Alignment the file system wants more of: go on buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (&self.buffered).seek(std::io::SeekFrom::Start(r.pos))?;
                    *direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        let mut data = Vec::with_capacity(CHUNK);
        (&self.buffered).take(CHUNK as u64).read_to_end(&mut data)?;
        Ok(Data::Owned(data))
    }
}

/// `path` opened again with `O_DIRECT` (for writing with `write`), if the
/// file system allows it and it is still the file `f` (the path may have
/// been swapped in between).
fn reopen_direct(path: &std::path::Path, f: &std::fs::File, write: bool) -> Option<std::fs::File> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let d =
        std::fs::OpenOptions::new().read(!write).write(write).custom_flags(libc::O_DIRECT).open(path).ok()?;
    let (a, b) = (f.metadata().ok()?, d.metadata().ok()?);
    ((a.dev(), a.ino()) == (b.dev(), b.ino())).then_some(d)
}

impl Source {
    /// The next piece, empty at the end.
    async fn next(&mut self) -> std::io::Result<Data> {
        match self {
            Source::Tcp(rd) => {
                let mut data = Vec::with_capacity(CHUNK);
                rd.read_buf(&mut data).await?;
                Ok(Data::Owned(data))
            }
            Source::File(f) => {
                let f = Arc::clone(f);
                let read = tokio::task::spawn_blocking(move || f.next());
                read.await.map_err(std::io::Error::other)?
            }
        }
    }
}

/// Where `send`s go: a connection's write side, or a file written off the
/// async threads from the request's own buffer (shared: `lane_write`s write
/// at their own offsets, side by side).
enum Writer {
    Tcp(OwnedWriteHalf),
    File(Arc<FileOut>),
}

/// A file being written: `sends` append through `buffered`; `lane_write`s
/// write their aligned part through `direct` (`O_DIRECT`, when the file
/// system has it): the bytes go from the lane's buffer to the disk by DMA,
/// never through the guest's page cache, which under TCG is the slow part
/// (guest buffered writes run at ~50-80 MB/s, direct ones at ~290).
struct FileOut {
    buffered: std::fs::File,
    direct: Option<std::fs::File>,
}

/// `O_DIRECT` alignment of file offsets and lengths.
const DIRECT_ALIGN: u64 = crate::lane::ALIGN as u64;

impl FileOut {
    /// Write `data` at `at`: its aligned part directly, the rest buffered.
    fn write_at(&self, data: &[u8], at: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let direct_len = match &self.direct {
            Some(_) if at.is_multiple_of(DIRECT_ALIGN) => data.len() as u64 / DIRECT_ALIGN * DIRECT_ALIGN,
            _ => 0,
        } as usize;
        if let (Some(d), true) = (&self.direct, direct_len > 0) {
            match d.write_all_at(&data[..direct_len], at) {
                Ok(()) => {}
                // Alignment the file system wants more of: write it buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return self.buffered.write_all_at(data, at);
                }
                Err(e) => return Err(e),
            }
        }
        self.buffered.write_all_at(&data[direct_len..], at + direct_len as u64)
    }
}

impl Writer {
    async fn write(&mut self, data: Vec<u8>, eof: bool) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => {
                w.write_all(&data).await?;
                if eof {
                    w.shutdown().await?;
                }
                Ok(())
            }
            Writer::File(f) => {
                let f = Arc::clone(f);
                let written = tokio::task::spawn_blocking(move || (&f.buffered).write_all(&data));
                written.await.map_err(std::io::Error::other)?
            }
        }
    }
}

struct Tunnel {
    /// Where `send`s go: the connection's write side, or a file.
    writer: tokio::sync::Mutex<Option<Writer>>,
    window: Semaphore,
    /// Cancelled once a `send` with `eof` has shut the writer.
    shut: CancellationToken,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("window", &self.window.available_permits()).finish_non_exhaustive()
    }
}

impl Tunnel {
    fn new(writer: Option<Writer>, window: usize) -> Arc<Self> {
        Arc::new(Self {
            writer: tokio::sync::Mutex::new(writer),
            window: Semaphore::new(window),
            shut: CancellationToken::new(),
        })
    }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, msg)
}

impl Streams {
    /// The streams of a connection whose writer takes `out`.
    pub fn new(out: mpsc::Sender<Outgoing>) -> Self {
        Self { table: Arc::default(), out: Some(out) }
    }

    fn get(&self, id: u64) -> Option<Arc<Tunnel>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    fn set(&self, id: u64, t: Option<Arc<Tunnel>>) {
        let mut map = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match t {
            Some(t) => map.insert(id, t),
            None => map.remove(&id),
        };
    }

    /// Open connection `id` to `127.0.0.1:port` and pump what the guest
    /// side sends until it closes or `token` is cancelled.
    pub async fn connect(&self, id: u64, port: u16, resp: mpsc::Sender<Response>, token: CancellationToken) {
        let reply = |body| Response { id, body };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let e =
                    err(ErrorCode::Unreachable, format!("nothing answers on port {port} in the guest: {e}"));
                let _ = resp.send(reply(ResponseBody::Error(e))).await;
                return;
            }
            Err(_) => {
                let e = err(
                    ErrorCode::Unreachable,
                    format!("port {port} did not accept within {CONNECT_TIMEOUT:?}"),
                );
                let _ = resp.send(reply(ResponseBody::Error(e))).await;
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        self.pump(id, Source::Tcp(rd), Some(Writer::Tcp(wr)), &format!("port {port}"), resp, token).await;
    }

    /// A file as the guest's user: read (`path` streamed to request `id`,
    /// paced like a connection's output), or written (parents made, an
    /// existing file truncated) with the `send`s of request `id` until one
    /// carries `eof` or `token` is cancelled.
    pub async fn file(
        &self,
        layout: &crate::GuestLayout,
        id: u64,
        (path, op): (String, FileOp),
        resp: mpsc::Sender<Response>,
        token: CancellationToken,
    ) {
        use std::os::unix::fs::OpenOptionsExt as _;
        let opened = open_as(layout, id, &path, &resp, move |full| match op {
            FileOp::Read => {
                let f = std::fs::File::open(full)?;
                if f.metadata()?.is_dir() {
                    return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
                }
                let direct = reopen_direct(full, &f, false);
                Ok((f, direct))
            }
            FileOp::Write => {
                if let Some(parent) = full.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(full)?;
                let direct = reopen_direct(full, &f, true);
                Ok((f, direct))
            }
        });
        let Some((file, direct)) = opened.await else { return };
        if let FileOp::Read = op {
            return self
                .pump(id, Source::File(Arc::new(FileIn::new(file, direct))), None, &path, resp, token)
                .await;
        }
        let out = FileOut { buffered: file, direct };
        let tunnel = Tunnel::new(Some(Writer::File(Arc::new(out))), 0);
        self.set(id, Some(Arc::clone(&tunnel)));
        let _ = resp.send(Response { id, body: ResponseBody::Connected {} }).await;
        tokio::select! {
            () = token.cancelled() => {}
            () = tunnel.shut.cancelled() => {}
        }
        self.set(id, None);
        let _ = resp.send(Response { id, body: ResponseBody::Ok }).await;
    }

    /// Register stream `id`, say `connected`, then send what `rd` gives
    /// within the window until it ends or `token` is cancelled.
    async fn pump(
        &self,
        id: u64,
        mut rd: Source,
        wr: Option<Writer>,
        what: &str,
        resp: mpsc::Sender<Response>,
        token: CancellationToken,
    ) {
        let reply = |body| Outgoing::Frame(Response { id, body });
        // Everything of this stream goes one way, so it stays in order.
        let send = |o: Outgoing| {
            let (out, resp) = (self.out.clone(), resp.clone());
            async move {
                match (out, o) {
                    (Some(out), o) => out.send(o).await.is_ok(),
                    (None, Outgoing::Frame(r)) => resp.send(r).await.is_ok(),
                    (None, Outgoing::Piece { id, piece }) => {
                        let data = piece.bytes().to_vec();
                        resp.send(Response {
                            id,
                            body: ResponseBody::Output { stream: Stream::Stdout, data },
                        })
                        .await
                        .is_ok()
                    }
                    (None, Outgoing::PowerOff) => true,
                }
            }
        };
        let tunnel = Tunnel::new(wr, CONNECT_WINDOW as usize);
        self.set(id, Some(Arc::clone(&tunnel)));
        send(reply(ResponseBody::Connected {})).await;
        let end = loop {
            // Read into the frame's own buffer: the writer sends it as it is.
            let data = tokio::select! {
                () = token.cancelled() => break ResponseBody::Ok,
                r = rd.next() => match r {
                    Ok(data) if data.len() == 0 => break ResponseBody::Ok,
                    Ok(data) => data,
                    Err(e) => break ResponseBody::Error(err(ErrorCode::Internal, format!("reading {what}: {e}"))),
                },
            };
            // Wait for the host to have room for it.
            let permit = tokio::select! {
                () = token.cancelled() => break ResponseBody::Ok,
                p = tunnel.window.acquire_many(data.len() as u32) => p,
            };
            match permit {
                Ok(p) => p.forget(),
                Err(_) => break ResponseBody::Ok,
            }
            let frame = match data {
                Data::Owned(data) => reply(ResponseBody::Output { stream: Stream::Stdout, data }),
                Data::Piece(piece) => Outgoing::Piece { id, piece },
            };
            if !send(frame).await {
                break ResponseBody::Ok;
            }
        };
        self.set(id, None);
        send(reply(end)).await;
    }

    /// Write `data` to connection `target` (then shut its write side on
    /// `eof`).
    pub async fn send(&self, target: u64, data: Vec<u8>, eof: bool) -> Result<(), ErrorReply> {
        let t =
            self.get(target).ok_or_else(|| err(ErrorCode::NotFound, format!("no connection {target}")))?;
        let mut guard = t.writer.lock().await;
        let w = guard
            .as_mut()
            .ok_or_else(|| err(ErrorCode::Conflict, "the connection's write side is closed"))?;
        let written = if matches!(w, Writer::File(_)) {
            timed_file_write(w.write(data, eof)).await
        } else {
            crate::process::timed_write(w.write(data, eof), SEND_TIMEOUT, "writing").await
        };
        if eof || written.is_err() {
            *guard = None;
            t.shut.cancel();
        }
        written
    }

    /// Write `len` bytes the host put on the bulk lane at `lane_at` to file
    /// `target` at offset `at`.
    pub async fn lane_write(
        &self,
        agent: &crate::Agent,
        target: u64,
        (at, lane_at, len): (u64, u64, u32),
    ) -> Result<(), ErrorReply> {
        let t = self.get(target).ok_or_else(|| err(ErrorCode::NotFound, format!("no file {target}")))?;
        let file = match t.writer.lock().await.as_ref() {
            Some(Writer::File(f)) => Arc::clone(f),
            Some(Writer::Tcp(_)) => {
                return Err(err(ErrorCode::Conflict, format!("request {target} is a connection, not a file")))
            }
            None => return Err(err(ErrorCode::Conflict, "the file is closed")),
        };
        let write = async {
            let (buf, start) = agent
                .lane
                .read(agent.layout.lane.as_deref(), lane_at, len)
                .await
                .map_err(std::io::Error::other)?;
            let end = start + len as usize;
            let written = tokio::task::spawn_blocking(move || file.write_at(&buf[start..end], at));
            written.await.map_err(std::io::Error::other)?
        };
        let written = timed_file_write(write).await;
        if written.is_err() {
            *t.writer.lock().await = None;
            t.shut.cancel();
        }
        written
    }

    /// The host consumed `bytes` of connection `target`'s output.
    pub fn credit(&self, target: u64, bytes: u64) {
        if let Some(t) = self.get(target) {
            // Never more than the window, whatever the host says.
            let room = (CONNECT_WINDOW as usize).saturating_sub(t.window.available_permits());
            t.window.add_permits((bytes.min(CONNECT_WINDOW) as usize).min(room));
        }
    }
}

/// Write to a file within [`SEND_TIMEOUT`]; a failure says its errno (a
/// full disk is ENOSPC, which the host answers as such).
async fn timed_file_write(
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), ErrorReply> {
    match tokio::time::timeout(SEND_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ErrorReply::io("writing", &e)),
        Err(_) => Err(err(ErrorCode::Conflict, format!("writing: nothing was written for {SEND_TIMEOUT:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt as _;

    /// Aligned pieces go direct, their tails and unaligned ones buffered,
    /// and the file holds every byte where it belongs either way.
    #[test]
    fn pieces_written_direct_and_buffered_make_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let buffered = std::fs::File::create(&path).expect("create");
        let direct = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        let out = FileOut { buffered, direct };
        let want: Vec<u8> = (0..3 * 8192 + 100).map(|i| (i % 241) as u8).collect();
        // An O_DIRECT write needs an aligned buffer too: pieces of one.
        let (mut buf, start) = crate::lane::aligned_buffer(want.len());
        buf[start..start + want.len()].copy_from_slice(&want);
        let data = &buf[start..start + want.len()];
        for (at, end) in [(8192, 16384 + 5), (0, 8192), (16384 + 5, 3 * 8192 + 100)] {
            out.write_at(&data[at..end], at as u64).expect("write");
        }
        assert!(std::fs::read(&path).expect("read") == want);
    }

    /// A direct read's pieces are sent from their own aligned buffers, which
    /// come back for the next reads once sent (a window's worth is kept).
    #[test]
    fn direct_pieces_reuse_their_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * CHUNK]).expect("write");
        let f = std::fs::File::open(&path).expect("open");
        let Some(d) = reopen_direct(&path, &f, false) else { return }; // no O_DIRECT here
        let input = FileIn::new(f, Some(d));
        let piece = |d: Data| match d {
            Data::Piece(p) => p,
            Data::Owned(_) => panic!("a direct read gave a copy"),
        };
        let a = piece(input.next().expect("read"));
        let b = piece(input.next().expect("read"));
        assert_eq!(a.bytes().as_ptr() as usize % crate::lane::ALIGN, 0);
        assert!(a.bytes().iter().all(|&x| x == 7) && b.bytes().len() == CHUNK);
        let first = a.bytes().as_ptr();
        drop(a);
        let c = piece(input.next().expect("read"));
        assert_eq!(c.bytes().as_ptr(), first, "the sent piece's buffer was not reused");
        drop((b, c));
        assert!(input.spares.lock().map(|s| s.len()).unwrap_or(0) <= SPARES);
    }

    /// Read direct or buffered, in pieces, the bytes are the file's.
    #[test]
    fn a_file_reads_back_whole_direct_or_buffered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let want: Vec<u8> = (0..2 * CHUNK + 777).map(|i| (i % 239) as u8).collect();
        std::fs::write(&path, &want).expect("write");
        for direct in [true, false] {
            let f = std::fs::File::open(&path).expect("open");
            let d = if direct { reopen_direct(&path, &f, false) } else { None };
            let used_direct = d.is_some();
            let input = FileIn::new(f, d);
            let mut got = Vec::new();
            loop {
                match input.next().expect("read") {
                    Data::Owned(v) if v.is_empty() => break,
                    Data::Owned(v) => got.extend(v),
                    Data::Piece(p) if p.bytes().is_empty() => break,
                    Data::Piece(p) => got.extend_from_slice(p.bytes()),
                }
            }
            assert!(got == want, "direct: {used_direct}");
        }
        // A path swapped for another file is not reopened.
        let other = dir.path().join("g");
        std::fs::write(&other, b"x").expect("write");
        let f = std::fs::File::open(&path).expect("open");
        assert!(reopen_direct(&other, &f, false).is_none());
    }
}
