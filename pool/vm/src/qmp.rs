//! A small async QMP client (QEMU Machine Protocol): newline-delimited JSON
//! over a stream. One command at a time; asynchronous events that arrive in
//! between are kept for [`Qmp::take_events`].

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

#[derive(Debug)]
pub struct Qmp<S> {
    stream: BufReader<S>,
    next_id: u64,
    events: std::collections::VecDeque<Value>,
}

/// Asynchronous events kept between commands; older ones are dropped.
pub const MAX_EVENTS: usize = 64;

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Read the greeting and negotiate capabilities.
    pub async fn handshake(stream: S) -> Result<Self, QmpError> {
        let mut q = Self { stream: BufReader::new(stream), next_id: 1, events: Default::default() };
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")))
    }

    /// Run one command and return its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let (id, line) = self.command_line(command, arguments);
        self.stream.get_mut().write_all(line.as_bytes()).await?;
        self.read_reply(id, command).await
    }

    fn command_line(&mut self, command: &str, arguments: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        (id, line)
    }

    async fn read_reply(&mut self, id: u64, command: &str) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                // Kept for a reader that may never come: the newest only.
                if self.events.len() >= MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(reply);
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let err = reply.get("error").cloned().unwrap_or(Value::Null);
            let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            return Err(QmpError::Command {
                command: command.into(),
                class: field("class"),
                desc: field("desc"),
            });
        }
    }

    /// `query-status`: the run state, e.g. `running`, `paused`.
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {v}")))
    }

    /// Ask QEMU to exit. The connection closing is the expected answer.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events).into()
    }
}

impl Qmp<tokio::net::UnixStream> {
    /// `getfd`: give QEMU a file descriptor, named `name`, over the socket
    /// (SCM_RIGHTS). This is how state files reach a sandboxed QEMU, which
    /// may not spawn `exec:` helpers.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        use std::os::fd::AsRawFd as _;
        let (id, line) = self.command_line("getfd", Some(json!({ "fdname": name })));
        let sock = self.stream.get_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            sock.writable().await?;
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[std::io::IoSlice::new(line.as_bytes())],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == line.len() => break,
                Ok(n) => return Err(QmpError::Protocol(format!("getfd sent {n} of {} bytes", line.len()))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.read_reply(id, "getfd").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// A scripted QMP server: checks each request, sends canned replies.
    async fn fake_server(mut s: tokio::io::DuplexStream, script: Vec<(&'static str, String)>) {
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
        let mut buf = Vec::new();
        for (expect, reply) in script {
            let mut byte = [0u8; 1];
            buf.clear();
            loop {
                s.read_exact(&mut byte).await.unwrap();
                if byte[0] == b'\n' {
                    break;
                }
                buf.push(byte[0]);
            }
            let req: Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(req["execute"], expect);
            s.write_all(reply.replace("ID", &req["id"].to_string()).as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(fake_server(
            b,
            vec![
                ("qmp_capabilities", "{\"return\": {}, \"id\": ID}\n".into()),
                (
                    "query-status",
                    "{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": ID}\n".into(),
                ),
                ("stop", "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": ID}\n".into()),
            ],
        ));
        let mut q = Qmp::handshake(a).await.unwrap();
        assert_eq!(q.status().await.unwrap(), "running");
        assert_eq!(q.take_events().len(), 1);
        let err = q.execute("stop", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Command { ref class, .. } if class == "GenericError"), "{err}");
        server.await.unwrap();
        // The server hung up: quit treats that as success, others as Closed.
        assert!(matches!(q.status().await, Err(QmpError::Closed) | Err(QmpError::Io(_))));
    }
}

#[cfg(test)]
mod bounded {
    use super::*;

    #[tokio::test]
    async fn events_nobody_takes_are_bounded() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
            b.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut r = BufReader::new(b);
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                let mut out = String::new();
                if req["execute"] == "query-status" {
                    // A hostile or chatty guest: a thousand events first.
                    for _ in 0..1000 {
                        out.push_str("{\"event\": \"X\", \"timestamp\": {}}\n");
                    }
                }
                out.push_str(&format!(
                    "{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\n",
                    req["id"]
                ));
                r.get_mut().write_all(out.as_bytes()).await.unwrap();
            }
        });
        let mut q = Qmp::handshake(a).await.unwrap();
        q.status().await.unwrap();
        assert_eq!(q.take_events().len(), MAX_EVENTS);
        server.await.unwrap();
    }
}
