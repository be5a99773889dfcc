//! A TCP connection to a port inside the guest, carried over the agent
//! channel (`connect`, `send`, `credit`): the caller gets an ordinary byte
//! stream. What the guest sends is paced by the window the agent keeps:
//! credit goes back only once the caller has taken the bytes, so a slow
//! reader slows the guest server, never grows a buffer here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ember_wire::{encode, Request, RequestBody, ResponseBody};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::super::lane::{self, BulkLane};
use super::{cancel_frame, AgentClient, AgentError, Delivery, PendingCall};

/// A file being written in the guest by the agent ([`AgentClient::write_file`]):
/// bytes go in order with [`FileUpload::write`], in pieces of any size;
/// [`FileUpload::finish`] closes it. Dropped unfinished, the write is
/// abandoned (what was written stays, as with a killed `cat`).
///
/// The upload cuts the bytes into its own pieces ([`UPLOAD_PIECE`]), so a
/// caller hands over what it has as it arrives. On a VM with a bulk lane
/// each piece goes on the lane and the agent copies it from there
/// (`lane_write`, at the piece's own offset): `write` returns once the
/// piece is on the lane, so the next one is read from the caller while the
/// guest writes this one, a lane's worth of slots at most. Without one,
/// pieces travel as `send`s on the channel.
#[derive(Debug)]
pub struct FileUpload {
    client: Arc<AgentClient>,
    id: u64,
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    finished: bool,
    /// Bytes handed over so far: where the next piece goes in the file.
    at: u64,
    /// Bytes short of a whole piece, waiting for more.
    carry: Vec<u8>,
    /// Lane writes not answered yet (dropping them frees their slots).
    in_flight: tokio::task::JoinSet<Result<(), AgentError>>,
}

/// Bytes of one piece of an upload: a lane slot, and well under a frame's
/// limit when it travels as a `send`.
pub const UPLOAD_PIECE: usize = lane::SLOT_LEN as usize;

impl FileUpload {
    /// Append `data` to the file: every whole piece is written (or, on the
    /// lane, put there) before this returns; the rest waits for more.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.carry.extend_from_slice(data);
        match self.client.lane.get().cloned() {
            Some(lane) => self.put_on(&lane, false).await,
            None => self.send_pieces(false).await,
        }
    }

    /// Send every whole piece of what waits (with `last`, the rest too,
    /// closing the file) as `send`s on the channel.
    async fn send_pieces(&mut self, last: bool) -> Result<(), AgentError> {
        while self.carry.len() >= UPLOAD_PIECE || last {
            let rest = self.carry.split_off(self.carry.len().min(UPLOAD_PIECE));
            let data = std::mem::replace(&mut self.carry, rest);
            let eof = last && self.carry.is_empty();
            let send = RequestBody::Send { target: self.id, data, eof };
            self.client.call_ok("send", self.client.timeouts.slow, send).await?;
            if eof {
                break;
            }
        }
        Ok(())
    }

    /// Put every whole slot of what waits on the lane (with `last`, the
    /// rest too). Whole slots keep every piece but the last at an aligned
    /// offset, which the guest writes straight to its disk, past its page
    /// cache.
    async fn put_on(&mut self, lane: &Arc<BulkLane>, last: bool) -> Result<(), AgentError> {
        let slot = lane::SLOT_LEN as usize;
        while self.carry.len() >= slot || (last && !self.carry.is_empty()) {
            // A write that failed fails the upload now, not at the end.
            while let Some(done) = self.in_flight.try_join_next() {
                flatten(done)?;
            }
            let rest = self.carry.split_off(self.carry.len().min(slot));
            let piece = std::mem::replace(&mut self.carry, rest);
            let len = piece.len() as u64;
            let slot =
                lane.put(piece).await.map_err(|e| AgentError::Protocol(format!("the bulk lane: {e}")))?;
            let body =
                RequestBody::LaneWrite { target: self.id, at: self.at, lane_at: slot.at(), len: slot.len() };
            self.at += len;
            let client = Arc::clone(&self.client);
            self.in_flight.spawn(async move {
                let written = client.call_ok("lane_write", client.timeouts.slow, body).await;
                drop(slot);
                written
            });
        }
        Ok(())
    }

    /// Write what waits and close the file; returns once it is closed.
    pub async fn finish(mut self) -> Result<(), AgentError> {
        match self.client.lane.get().cloned() {
            Some(lane) => {
                self.put_on(&lane, true).await?;
                while let Some(done) = self.in_flight.join_next().await {
                    flatten(done)?;
                }
                let send = RequestBody::Send { target: self.id, data: Vec::new(), eof: true };
                self.client.call_ok("send", self.client.timeouts.slow, send).await?;
            }
            None => self.send_pieces(true).await?,
        }
        let within = self.client.timeouts.quick;
        let end = tokio::time::timeout(within, self.rx.recv()).await;
        self.finished = true;
        match end {
            Ok(Some(Delivery::Body(ResponseBody::Ok))) => Ok(()),
            Ok(Some(Delivery::Body(ResponseBody::Error(e)))) => Err(AgentError::Remote(e)),
            Ok(Some(other)) => Err(AgentError::Protocol(format!("expected ok to write_file, got {other:?}"))),
            Ok(None) => Err(AgentError::Disconnected),
            Err(_) => Err(AgentError::Timeout { what: "write_file", after: within }),
        }
    }
}

fn flatten(done: Result<Result<(), AgentError>, tokio::task::JoinError>) -> Result<(), AgentError> {
    done.map_err(|e| AgentError::Protocol(format!("a lane write task failed: {e}")))?
}

impl Drop for FileUpload {
    fn drop(&mut self) {
        self.client.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
        if !self.finished {
            if let Ok(f) = cancel_frame(self.id) {
                let _ = self.client.out.try_send(f);
            }
        }
    }
}

/// Bytes of the caller's side of the stream buffered in each direction.
const STREAM_BUFFER: usize = 256 << 10;
/// Bytes sent to the guest per `send` request.
const SEND_CHUNK: usize = 64 << 10;

impl AgentClient {
    /// Connect to `127.0.0.1:port` inside the guest. The stream ends when
    /// the guest side closes; dropping it closes the connection.
    pub async fn connect(self: &Arc<Self>, port: u16) -> Result<DuplexStream, AgentError> {
        self.open_stream("connect", RequestBody::Connect { port }, true).await
    }

    /// Read a file in the guest as its user (relative to the workspace):
    /// its bytes, paced by how fast the caller reads them. An error to open
    /// it is the guest's own message ("No such file or directory").
    pub async fn read_file(self: &Arc<Self>, path: &str) -> Result<DuplexStream, AgentError> {
        self.open_stream("read_file", RequestBody::ReadFile { path: path.to_string() }, false).await
    }

    /// Write a file in the guest as its user (relative to the workspace;
    /// parents made, an existing file truncated), written by the agent
    /// itself. An error to open it is the guest's own message.
    pub async fn write_file(self: &Arc<Self>, path: &str) -> Result<FileUpload, AgentError> {
        let (id, _, rx) = self.open("write_file", RequestBody::WriteFile { path: path.to_string() }).await?;
        let in_flight = tokio::task::JoinSet::new();
        Ok(FileUpload {
            client: Arc::clone(self),
            id,
            rx,
            finished: false,
            at: 0,
            carry: Vec::new(),
            in_flight,
        })
    }

    /// Start a request answered first by `connected`, and wait for that.
    async fn open(
        &self,
        what: &'static str,
        body: RequestBody,
    ) -> Result<(u64, PendingCall, tokio::sync::mpsc::UnboundedReceiver<Delivery>), AgentError> {
        let (id, call, mut rx) = self.start(body).await?;
        let within = self.timeouts.quick;
        let first = tokio::time::timeout(within, rx.recv()).await;
        let opened = match first {
            Ok(Some(Delivery::Body(ResponseBody::Connected {}))) => Ok(()),
            Ok(Some(Delivery::Body(ResponseBody::Error(e)))) => Err(AgentError::Remote(e)),
            Ok(Some(other)) => Err(AgentError::Protocol(format!("expected connected, got {other:?}"))),
            Ok(None) => Err(AgentError::Disconnected),
            Err(_) => Err(AgentError::Timeout { what, after: within }),
        };
        if let Err(e) = opened {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            if let Ok(f) = cancel_frame(id) {
                let _ = self.out.try_send(f);
            }
            return Err(e);
        }
        Ok((id, call, rx))
    }

    /// Start a streamed request and wait for its `connected`; then carry
    /// its output to the stream (credit returned as the caller reads) and,
    /// if `writable`, what the caller writes to it back as `send`s.
    async fn open_stream(
        self: &Arc<Self>,
        what: &'static str,
        body: RequestBody,
        writable: bool,
    ) -> Result<DuplexStream, AgentError> {
        let (id, call, mut rx) = self.open(what, body).await?;
        let (ours, theirs) = tokio::io::duplex(STREAM_BUFFER);
        let (mut from_caller, mut to_caller) = tokio::io::split(theirs);
        let out = self.out.clone();
        let down = async move {
            while let Some(d) = rx.recv().await {
                let Delivery::Body(ResponseBody::Output { data, .. }) = d else { break };
                call.buffered.fetch_sub(data.len(), Ordering::Relaxed);
                if to_caller.write_all(&data).await.is_err() {
                    break;
                }
                let credit =
                    Request { id: 0, body: RequestBody::Credit { target: id, bytes: data.len() as u64 } };
                let Ok(frame) = encode(&credit) else { break };
                if out.send(frame).await.is_err() {
                    break;
                }
            }
            let _ = to_caller.shutdown().await;
        };
        let client = Arc::clone(self);
        let up = async move {
            let mut buf = vec![0u8; SEND_CHUNK];
            if writable {
                loop {
                    let n = from_caller.read(&mut buf).await.unwrap_or(0);
                    let send = RequestBody::Send { target: id, data: buf[..n].to_vec(), eof: n == 0 };
                    if client.call_ok("send", client.timeouts.slow, send).await.is_err() || n == 0 {
                        break;
                    }
                }
            }
            client
        };
        tokio::spawn(async move {
            let ((), client) = tokio::join!(down, up);
            // Ends the stream in the guest if it still runs.
            if let Ok(f) = cancel_frame(id) {
                let _ = client.out.send(f).await;
            }
        });
        Ok(ours)
    }
}
