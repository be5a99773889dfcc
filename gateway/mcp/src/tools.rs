//! The tools: each maps its arguments to one service call as the request's
//! caller (the key's tenant: it sees its own sessions only) and answers a
//! short text for the model with the whole object as structured content.
//! A session is always named (`session`), never bound to the MCP
//! connection, and never opened implicitly: only `session_create` opens one.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ember_channel::ExecEvent;
use ember_pool::pool::Backend;
use ember_service::api::{FileEntry, FileListing, ProcessView, TimeoutRequest};
use ember_service::invocation::{self, AgentVm};
use ember_service::{AppState, Caller, Error, Kind};
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, RoleServer, ServerHandler};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

use crate::args::*;
use crate::errors::{invalid, tool_error};
use crate::output::{cap, split};
use crate::McpConfig;

/// A tool's answer: its result, or a tool error (`isError: true`).
type Answer = Result<CallToolResult, CallToolResult>;

trait OrTool<T> {
    fn or_tool(self) -> Result<T, CallToolResult>;
}

impl<T> OrTool<T> for Result<T, Error> {
    fn or_tool(self) -> Result<T, CallToolResult> {
        self.map_err(|e| tool_error(&e))
    }
}

/// `text` for the model and `value` as structured content.
fn answer(text: impl Into<String>, value: impl Serialize) -> Answer {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    r.structured_content = serde_json::to_value(value).ok();
    Ok(r)
}

/// How long `process_output` may wait for output at most.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// After output came, how long more is gathered before answering.
const GATHER: Duration = Duration::from_millis(100);
/// The most of a file `file_read` returns as one image.
const MAX_IMAGE_BYTES: u64 = 1 << 20;
/// How often a running command's output is sent as progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The MCP server over Ember's state.
#[derive(Clone)]
pub struct EmberMcp<B: Backend> {
    state: AppState<B>,
    cfg: Arc<McpConfig>,
    tool_router: ToolRouter<Self>,
}

impl<B: Backend> std::fmt::Debug for EmberMcp<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmberMcp").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// The caller the auth middleware left in the HTTP request.
fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, CallToolResult> {
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<Caller>().cloned())
        .ok_or_else(|| tool_error(&Error::new(Kind::Forbidden, "unauthorized", "the request has no caller")))
}

fn parse_wait(raw: Option<&str>) -> Result<Duration, CallToolResult> {
    let Some(raw) = raw else { return Ok(Duration::ZERO) };
    let d = humantime::parse_duration(raw.trim())
        .map_err(|e| invalid(format!("wait {raw:?}: {e} (say \"10s\")")))?;
    Ok(d.min(MAX_WAIT))
}

/// Bytes as text when they are UTF-8, else as base64.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(bytes))),
    }
}

fn image_type(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    let ext = lower.rsplit_once('.')?.1;
    Some(match ext {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => return None,
    })
}

#[tool_router]
impl<B: Backend> EmberMcp<B>
where
    B::Vm: AgentVm,
{
    pub fn new(state: AppState<B>, cfg: Arc<McpConfig>) -> Self {
        Self { state, cfg, tool_router: Self::tool_router() }
    }

    /// Run a command, program or code to its end in a microVM and get its output. Without `session` it runs
    /// in a fresh VM reset afterwards (nothing persists); with `session` (from session_create) it runs in
    /// that session's VM, whose files and background processes persist. A non-zero exit, a signal or a
    /// timeout is a normal result. Output is capped (head and tail kept); redirect big output to a file and
    /// read it with file_read. Work longer than about 50 seconds belongs in process_start.
    #[tool(annotations(
        title = "Run a command",
        read_only_hint = false,
        destructive_hint = false,
        open_world_hint = false
    ))]
    async fn run(&self, Parameters(args): Parameters<RunArgs>, ctx: RequestContext<RoleServer>) -> Answer {
        let caller = caller(&ctx)?;
        let (session, req) = args.into_request().map_err(invalid)?;
        let mut inv = req.validate(&self.state.limits).or_tool()?;
        inv.open_session = false;
        let id = uuid::Uuid::new_v4().to_string();
        let span = tracing::info_span!(
            "invocation",
            id = %id,
            via = "mcp",
            vm = tracing::field::Empty,
            image = tracing::field::Empty,
            session = session.as_deref(),
            tenant = caller.label()
        );
        let mut running = invocation::start(&self.state, &caller, id, session, inv)
            .instrument(span.clone())
            .await
            .or_tool()?;
        let progress = ctx.meta.get_progress_token();
        let (mut stdout, mut stderr) = (Vec::<u8>::new(), Vec::<u8>::new());
        let (mut unsent, mut sent, mut last) = (Vec::<u8>::new(), 0u32, tokio::time::Instant::now());
        let status = loop {
            let event = tokio::select! {
                e = running.next() => e,
                () = ctx.ct.cancelled() => {
                    // Dropping the run kills the command and resets the VM.
                    drop(running);
                    return Err(tool_error(&Error::new(Kind::Invalid, "cancelled", "the call was cancelled; the command was killed")));
                }
            };
            match event.or_tool()? {
                ExecEvent::Output { stream, data } => {
                    if progress.is_some() {
                        unsent.extend_from_slice(&data);
                    }
                    match stream {
                        ember_wire::Stream::Stdout => stdout.extend(data),
                        ember_wire::Stream::Stderr => stderr.extend(data),
                    }
                }
                ExecEvent::Dropped { .. } => {}
                ExecEvent::Exit(status) => break status,
            }
            if let Some(token) =
                progress.as_ref().filter(|_| !unsent.is_empty() && last.elapsed() >= PROGRESS_EVERY)
            {
                sent += 1;
                let text = String::from_utf8_lossy(&unsent);
                let message = cap(&text, 2048).text;
                let note =
                    ProgressNotificationParam::new(token.clone(), f64::from(sent)).with_message(message);
                let _ = ctx.peer.notify_progress(note).await;
                unsent.clear();
                last = tokio::time::Instant::now();
            }
        };
        let (out_text, err_text) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
        let (a, b) = split(self.cfg.max_result_bytes, out_text.len(), err_text.len());
        let (out, err) = (cap(&out_text, a), cap(&err_text, b));
        let mut head = match (status.code, status.signal) {
            _ if status.timed_out => "timed out (killed)".to_string(),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(code), _) => format!("exit {code}"),
            (None, None) => "ended".to_string(),
        };
        head.push_str(&format!(" · {} ms · image {}", status.duration_ms, running.image));
        if let Some(s) = &running.session {
            head.push_str(&format!(" · session {s}"));
        }
        if status.truncated {
            head.push_str(" · output cut at the server's limit");
        }
        let mut text = head;
        for (name, c) in [("stdout", &out), ("stderr", &err)] {
            if c.total_bytes > 0 {
                let omitted = if c.omitted_bytes > 0 {
                    format!(", {} omitted", c.omitted_bytes)
                } else {
                    String::new()
                };
                text.push_str(&format!("\n--- {name} ({} bytes{omitted}) ---\n{}", c.total_bytes, c.text));
            }
        }
        let value = json!({
            "id": running.id, "exit_code": status.code, "signal": status.signal, "timed_out": status.timed_out,
            "truncated": status.truncated, "output_capped": out.omitted_bytes + err.omitted_bytes > 0,
            "stdout": out.text, "stderr": err.text, "stdout_bytes": stdout.len(), "stderr_bytes": stderr.len(),
            "binary": std::str::from_utf8(&stdout).is_err() || std::str::from_utf8(&stderr).is_err(),
            "duration_ms": status.duration_ms, "image": running.image, "session": running.session,
            "vm_id": running.vm_id,
        });
        answer(text, value)
    }

    /// The images calls and sessions can run in: what each holds (Debian packages, Python packages,
    /// preloaded modules), its memory and disk, and which is the default.
    #[tool(annotations(title = "List images", read_only_hint = true))]
    async fn images_list(&self) -> Answer {
        let images: Vec<_> = self
            .state
            .pools
            .iter()
            .map(|(name, pool)| {
                let info = self.state.image_info.get(name);
                json!({
                    "name": name,
                    "default": name == self.state.pools.default_name(),
                    "description": info.map(|i| i.description.as_str()),
                    "packages": info.map(|i| &i.packages),
                    "pip": info.map(|i| &i.pip),
                    "preload": info.map(|i| &i.preload),
                    "memory_mb": pool.vm_memory_mb(),
                    "disk_mb": info.map(|i| i.disk_mb),
                    "writable_root": info.is_some_and(|i| i.writable_root),
                    "sudo": info.is_some_and(|i| i.sudo),
                })
            })
            .collect();
        let text = images
            .iter()
            .map(|i| {
                format!(
                    "{}{}: {}",
                    i["name"].as_str().unwrap_or(""),
                    if i["default"] == true { " (default)" } else { "" },
                    i["description"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        answer(text, json!({"default": self.state.pools.default_name(), "images": images}))
    }

    /// Open a session: a VM of its own that keeps files and background processes between calls until it is
    /// deleted, idle past its idle_timeout, or past its timeout. Name it in every later call with `session`.
    #[tool(annotations(title = "Create a session", read_only_hint = false, destructive_hint = false))]
    async fn session_create(
        &self,
        Parameters(args): Parameters<SessionCreateArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let caller = caller(&ctx)?;
        let req = args.into_request(self.cfg.session_idle_timeout.as_deref()).map_err(invalid)?;
        let s = self.state.open_session(&caller, req).await.or_tool()?;
        answer(format!("session {} is {} (image {})", s.info.key, s.info.state, s.image), s)
    }

    /// The caller's sessions: key, state (running or paused), image, times and whether a call runs in it.
    #[tool(annotations(title = "List sessions", read_only_hint = true))]
    async fn session_list(&self, ctx: RequestContext<RoleServer>) -> Answer {
        let caller = caller(&ctx)?;
        let sessions = self.state.sessions(&caller);
        let text = if sessions.is_empty() {
            "no sessions".to_string()
        } else {
            sessions
                .iter()
                .map(|s| format!("{} {} {}", s.info.key, s.info.state, s.image))
                .collect::<Vec<_>>()
                .join("\n")
        };
        answer(text, json!({"sessions": sessions}))
    }

    /// One session: its state, image, times (created, last used, when it expires) and resource usage.
    #[tool(annotations(title = "Show a session", read_only_hint = true))]
    async fn session_get(
        &self,
        Parameters(a): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let s = self.state.session(&caller(&ctx)?, &a.session).or_tool()?;
        answer(format!("session {} is {} (image {})", s.info.key, s.info.state, s.image), s)
    }

    /// End a session and destroy its VM with everything in it.
    #[tool(annotations(title = "Delete a session", destructive_hint = true, idempotent_hint = false))]
    async fn session_delete(
        &self,
        Parameters(a): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        self.state.end_session(&caller(&ctx)?, &a.session).await.or_tool()?;
        answer(format!("session {} deleted", a.session), json!({"deleted": a.session}))
    }

    /// Copy a session (memory, running processes, files) into a new one, to try several paths from one
    /// state; the two share nothing afterwards.
    #[tool(annotations(title = "Fork a session", read_only_hint = false, destructive_hint = false))]
    async fn session_fork(
        &self,
        Parameters(a): Parameters<ForkArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let s = self.state.fork_session(&caller(&ctx)?, &a.session, a.new_key).await.or_tool()?;
        answer(format!("session {} forked into {} ({})", a.session, s.info.key, s.info.state), s)
    }

    /// Pause a session: its VM is saved to disk and holds no memory; any later use resumes it where it was.
    #[tool(annotations(title = "Pause a session", read_only_hint = false, destructive_hint = false))]
    async fn session_pause(
        &self,
        Parameters(a): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let s = self.state.pause_session(&caller(&ctx)?, &a.session).await.or_tool()?;
        answer(format!("session {} is {}", s.info.key, s.info.state), s)
    }

    /// Resume a paused session (any use resumes it too).
    #[tool(annotations(title = "Resume a session", read_only_hint = false, destructive_hint = false))]
    async fn session_resume(
        &self,
        Parameters(a): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let s = self.state.resume_session(&caller(&ctx)?, &a.session).await.or_tool()?;
        answer(format!("session {} is {}", s.info.key, s.info.state), s)
    }

    /// Set when a session ends: `timeout` from now, longer or shorter than before.
    #[tool(annotations(title = "Set a session's timeout", read_only_hint = false, destructive_hint = false))]
    async fn session_set_timeout(
        &self,
        Parameters(a): Parameters<TimeoutArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let req = TimeoutRequest { timeout: a.timeout };
        let s = self.state.extend_session(&caller(&ctx)?, &a.session, req).or_tool()?;
        answer(format!("session {} now ends at {}", s.info.key, s.info.expires.as_deref().unwrap_or("?")), s)
    }

    /// Start a background process in a session (a server, a build, anything long): it runs after this call
    /// returns. Read its output with process_output, feed it with process_write_stdin, stop it with
    /// process_signal.
    #[tool(annotations(
        title = "Start a background process",
        read_only_hint = false,
        destructive_hint = false
    ))]
    async fn process_start(
        &self,
        Parameters(a): Parameters<ProcessStartArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let caller = caller(&ctx)?;
        let session = a.session.clone();
        let p = self.state.processes(&caller, &session).await.or_tool()?;
        let info = p.start(a.into_request()).await.or_tool()?;
        let view = ProcessView::from(&info);
        answer(format!("process {} started in session {session}", view.pid), view)
    }

    /// A background process's output from `cursor` (0, then the previous answer's next_cursor), waiting up
    /// to `wait` for new output or its exit. Says whether it still runs and its exit code. Poll until
    /// running is false.
    #[tool(annotations(title = "Read a process's output", read_only_hint = true))]
    async fn process_output(
        &self,
        Parameters(a): Parameters<ProcessOutputArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let caller = caller(&ctx)?;
        let wait = parse_wait(a.wait.as_deref())?;
        let max = (a.max_bytes.unwrap_or(16 * 1024) as usize).clamp(1, self.cfg.max_result_bytes);
        let cursor = a.cursor.unwrap_or(0);
        let p = self.state.processes(&caller, &a.session).await.or_tool()?;
        let mut h = p.attach(a.pid).await.or_tool()?;
        let deadline = tokio::time::Instant::now() + wait;
        let (mut pos, mut next, mut lost) = (0u64, cursor, 0u64);
        let mut data = Vec::<u8>::new();
        let mut exit = None;
        loop {
            // What the buffer holds comes at once; then live output, for which
            // it waits until `wait` ends (or a moment more once it has some).
            let until = if data.is_empty() {
                deadline.max(tokio::time::Instant::now() + GATHER)
            } else {
                tokio::time::Instant::now() + GATHER
            };
            let event = tokio::select! {
                e = tokio::time::timeout_at(until, h.next()) => e,
                () = ctx.ct.cancelled() => break,
            };
            match event {
                Err(_) => break,
                Ok(Err(e)) => return Err(tool_error(&p.failed(e))),
                Ok(Ok(ExecEvent::Dropped { bytes })) => {
                    let end = pos + bytes;
                    if end > next {
                        lost += end - next.max(pos);
                        if data.is_empty() {
                            next = end;
                        }
                    }
                    pos = end;
                }
                Ok(Ok(ExecEvent::Output { data: chunk, .. })) => {
                    let end = pos + chunk.len() as u64;
                    if end > next && data.len() < max {
                        let from =
                            usize::try_from(next.saturating_sub(pos)).unwrap_or(usize::MAX).min(chunk.len());
                        let take = (chunk.len() - from).min(max - data.len());
                        data.extend_from_slice(&chunk[from..from + take]);
                        next = pos + (from + take) as u64;
                    }
                    pos = end;
                }
                Ok(Ok(ExecEvent::Exit(status))) => {
                    exit = Some(status);
                    break;
                }
            }
            if data.len() >= max {
                break;
            }
        }
        // A cut inside a character leaves it for the next read.
        if std::str::from_utf8(&data).is_err() {
            if let Some(valid) = (1..4)
                .map(|k| data.len().saturating_sub(k))
                .find(|&n| n > 0 && std::str::from_utf8(&data[..n]).is_ok())
            {
                next -= (data.len() - valid) as u64;
                data.truncate(valid);
            }
        }
        let more = exit.is_some() && next < pos;
        let running = exit.is_none();
        let (text, b64) = text_or_base64(&data);
        let state = match &exit {
            None => "running".to_string(),
            Some(s) if s.signal.is_some() => format!("ended by signal {}", s.signal.unwrap_or_default()),
            Some(s) => format!("exited with code {}", s.code.unwrap_or(-1)),
        };
        let mut summary = format!("process {}: {state}; next_cursor {next}", a.pid);
        if lost > 0 {
            summary.push_str(&format!("; {lost} bytes were lost (the output buffer is bounded)"));
        }
        if more {
            summary.push_str("; more output: call again with next_cursor");
        }
        let body = match (&text, &b64) {
            (Some(t), _) if !t.is_empty() => format!("{summary}\n{t}"),
            (None, Some(_)) => format!("{summary}\n[{} bytes of binary output in data_base64]", data.len()),
            _ => summary,
        };
        answer(
            body,
            json!({
                "data": text, "data_base64": b64, "next_cursor": next, "lost_bytes": lost, "running": running,
                "exit_code": exit.as_ref().and_then(|s| s.code), "signal": exit.as_ref().and_then(|s| s.signal),
            }),
        )
    }

    /// Write to a background process's standard input (started with stdin: true); eof closes it.
    #[tool(annotations(
        title = "Write to a process's stdin",
        read_only_hint = false,
        destructive_hint = false
    ))]
    async fn process_write_stdin(
        &self,
        Parameters(a): Parameters<StdinArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let caller = caller(&ctx)?;
        let bytes = match (a.data, a.data_base64) {
            (Some(t), None) => t.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| invalid(format!("data_base64: {e}")))?,
            (None, None) if a.eof == Some(true) => Vec::new(),
            _ => return Err(invalid("give data or data_base64 (or eof: true alone)")),
        };
        let p = self.state.processes(&caller, &a.session).await.or_tool()?;
        let eof = a.eof.unwrap_or(false);
        let n = bytes.len();
        p.stdin(a.pid, bytes, eof).await.or_tool()?;
        answer(
            format!("{n} bytes written{}", if eof { ", stdin closed" } else { "" }),
            json!({"written": n, "eof": eof}),
        )
    }

    /// Send a signal (TERM by default; KILL, INT, HUP, ...) to a background process and its children.
    #[tool(annotations(title = "Signal a process", destructive_hint = true))]
    async fn process_signal(
        &self,
        Parameters(a): Parameters<SignalArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let caller = caller(&ctx)?;
        let raw = a.signal.unwrap_or_else(|| "TERM".into());
        let value = raw.trim().parse::<i64>().map_or_else(|_| json!(raw), |n| json!(n));
        let sig = ember_service::api::SignalRequest { signal: value }.check().or_tool()?;
        let p = self.state.processes(&caller, &a.session).await.or_tool()?;
        p.signal(a.pid, sig).await.or_tool()?;
        answer(format!("signal {sig} sent to process {}", a.pid), json!({"sent": sig, "pid": a.pid}))
    }

    /// A session's background processes: pid, command, tag, running or exited (with the exit code).
    #[tool(annotations(title = "List processes", read_only_hint = true))]
    async fn process_list(
        &self,
        Parameters(a): Parameters<SessionArg>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let p = self.state.processes(&caller(&ctx)?, &a.session).await.or_tool()?;
        let list: Vec<ProcessView> = p.list().await.or_tool()?.iter().map(ProcessView::from).collect();
        let text = if list.is_empty() {
            "no processes".to_string()
        } else {
            list.iter()
                .map(|v| {
                    format!(
                        "{} {} {}",
                        v.pid,
                        v.state,
                        v.cmd.clone().unwrap_or_else(|| v.argv.clone().unwrap_or_default().join(" "))
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        answer(text, json!({"processes": list}))
    }

    /// Read a file of a session from `offset`, at most max_bytes. Text comes as text, other bytes as base64;
    /// a PNG, JPEG, GIF or WebP image (up to 1 MiB) comes as an image you can look at.
    #[tool(annotations(title = "Read a file", read_only_hint = true))]
    async fn file_read(
        &self,
        Parameters(a): Parameters<FileReadArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let files = self.state.files(&caller(&ctx)?, &a.session).await.or_tool()?;
        let entry = files.stat(&a.path).await.or_tool()?;
        if entry.kind != ember_wire::FileKind::File {
            return Err(invalid(format!("{} is not a regular file (file_list lists a directory)", a.path)));
        }
        let offset = a.offset.unwrap_or(0);
        let image = image_type(&a.path).filter(|_| offset == 0 && entry.size <= MAX_IMAGE_BYTES);
        let max = match image {
            Some(_) => MAX_IMAGE_BYTES,
            None => u64::from(a.max_bytes.unwrap_or(64 * 1024)).clamp(1, self.cfg.max_result_bytes as u64),
        };
        let mut stream = files.read(&a.path).await.or_tool()?;
        let read_err = |e: std::io::Error| {
            tool_error(&Error::new(Kind::VmFailed, "read_failed", format!("reading {}: {e}", a.path)))
        };
        tokio::io::copy(&mut (&mut stream).take(offset), &mut tokio::io::sink()).await.map_err(read_err)?;
        let mut bytes = Vec::new();
        (&mut stream).take(max).read_to_end(&mut bytes).await.map_err(read_err)?;
        drop(stream);
        let end = offset + bytes.len() as u64;
        let truncated = end < entry.size;
        let meta = json!({"path": a.path, "size": entry.size, "offset": offset, "bytes": bytes.len(),
            "truncated": truncated, "next_offset": truncated.then_some(end)});
        if let Some(mime) = image {
            let mut r = CallToolResult::success(vec![
                ContentBlock::text(format!("{} ({mime}, {} bytes)", a.path, bytes.len())),
                ContentBlock::image(base64::engine::general_purpose::STANDARD.encode(&bytes), mime),
            ]);
            r.structured_content = Some(meta);
            return Ok(r);
        }
        let (text, b64) = text_or_base64(&bytes);
        let more = if truncated { format!(" (more from offset {end})") } else { String::new() };
        let body = match &text {
            Some(t) => format!("{} bytes {offset}-{end} of {}{more}:\n{t}", a.path, entry.size),
            None => {
                format!("{} bytes {offset}-{end} of {}{more}: binary, in data_base64", a.path, entry.size)
            }
        };
        let mut value = meta;
        value["content"] = json!(text);
        value["data_base64"] = json!(b64);
        answer(body, value)
    }

    /// Write a file in a session (text or base64), replacing it if it exists; parent directories are made.
    #[tool(annotations(title = "Write a file", read_only_hint = false, destructive_hint = true))]
    async fn file_write(
        &self,
        Parameters(a): Parameters<FileWriteArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let bytes = match (a.content, a.content_base64) {
            (Some(t), None) => t.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| invalid(format!("content_base64: {e}")))?,
            _ => return Err(invalid("give exactly one of content, content_base64")),
        };
        let files = self.state.files(&caller(&ctx)?, &a.session).await.or_tool()?;
        let size = write_all(&files, &a.path, &bytes).await?;
        answer(format!("wrote {size} bytes to {}", a.path), json!({"path": a.path, "size": size}))
    }

    /// List a directory of a session (default: the home directory, /home/ember), `depth` levels deep.
    #[tool(annotations(title = "List files", read_only_hint = true))]
    async fn file_list(
        &self,
        Parameters(a): Parameters<FileListArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let files = self.state.files(&caller(&ctx)?, &a.session).await.or_tool()?;
        let path = a.path.unwrap_or_else(|| ".".into());
        let listing = files.list(&path, a.depth.unwrap_or(1)).await.or_tool()?;
        let entries: Vec<FileEntry> = listing.entries.iter().map(FileEntry::listed).collect();
        let text = entries
            .iter()
            .map(|e| format!("{} {} {}", e.permissions, e.size, e.path))
            .collect::<Vec<_>>()
            .join("\n");
        let text = if entries.is_empty() { format!("{path} is empty") } else { text };
        answer(text, FileListing { path, entries, truncated: listing.truncated })
    }

    /// Delete a file, or a directory with recursive: true.
    #[tool(annotations(title = "Delete a file", destructive_hint = true))]
    async fn file_delete(
        &self,
        Parameters(a): Parameters<FileDeleteArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let files = self.state.files(&caller(&ctx)?, &a.session).await.or_tool()?;
        files.remove(&a.path, a.recursive.unwrap_or(false), false).await.or_tool()?;
        answer(format!("deleted {}", a.path), json!({"deleted": a.path}))
    }

    /// Replace an exact piece of text in a file of a session: old_text must occur exactly once (or set
    /// replace_all). Safer than rewriting a whole file.
    #[tool(annotations(title = "Edit a file", read_only_hint = false, destructive_hint = true))]
    async fn file_edit(
        &self,
        Parameters(a): Parameters<FileEditArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Answer {
        let files = self.state.files(&caller(&ctx)?, &a.session).await.or_tool()?;
        let limit = self.state.limits.max_upload_bytes;
        let entry = files.stat(&a.path).await.or_tool()?;
        if entry.size > limit {
            return Err(tool_error(&ember_service::files::too_large(limit)));
        }
        let mut stream = files.read(&a.path).await.or_tool()?;
        let mut bytes = Vec::new();
        (&mut stream).take(limit + 1).read_to_end(&mut bytes).await.map_err(|e| {
            tool_error(&Error::new(Kind::VmFailed, "read_failed", format!("reading {}: {e}", a.path)))
        })?;
        let text = String::from_utf8(bytes).map_err(|_| invalid(format!("{} is not UTF-8 text", a.path)))?;
        let (edited, n) =
            edit(&text, &a.old_text, &a.new_text, a.replace_all.unwrap_or(false)).map_err(invalid)?;
        let size = write_all(&files, &a.path, edited.as_bytes()).await?;
        answer(
            format!("replaced {n} occurrence(s) in {}", a.path),
            json!({"path": a.path, "replaced": n, "size": size}),
        )
    }
}

async fn write_all(
    files: &ember_service::files::Files,
    path: &str,
    bytes: &[u8],
) -> Result<u64, CallToolResult> {
    let mut up = files.write(path, Some(bytes.len() as u64)).await.or_tool()?;
    for chunk in bytes.chunks(256 * 1024) {
        up.write(chunk).await.or_tool()?;
    }
    up.finish().await.or_tool()
}

#[tool_handler(router = self.tool_router)]
impl<B: Backend> ServerHandler for EmberMcp<B>
where
    B::Vm: AgentVm,
{
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("ember", env!("CARGO_PKG_VERSION")))
            .with_instructions(crate::INSTRUCTIONS)
    }
}
