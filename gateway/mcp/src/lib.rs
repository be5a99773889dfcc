//! `/mcp`: Ember as a Model Context Protocol tool server. Agents (Claude
//! Code, Cursor, the MCP Inspector, any client on the official SDKs) add
//! `http://HOST:PORT/mcp` with an Ember key as bearer token and get tools
//! for one-shot runs, images, sessions, background processes and files
//! ([`tools`]), each a thin mapping onto the service layer as the key's
//! tenant.
//!
//! Transport: rmcp's Streamable HTTP. The 2026-07-28 protocol is stateless;
//! a legacy client (`initialize`, 2025-11-25) gets a transport session
//! (`Mcp-Session-Id`, ended after 5 minutes idle) so that its cancels reach
//! its calls; no tool depends on it (a session of Ember is always named).
//! Answers are SSE streams pinged every 2 s, so that a client gone
//! mid-call is noticed and its command killed. The key check is Ember's own middleware in front;
//! rmcp checks the Host (loopback names plus `[mcp] allowed_hosts`) and
//! any Origin (refused unless `[mcp] allowed_origins` lists it), and caps
//! the request body. The drain's token ends open requests.

pub mod args;
pub mod errors;
pub mod output;
mod tools;

use std::sync::Arc;

use ember_pool::pool::Backend;
use ember_service::invocation::AgentVm;
use ember_service::AppState;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

pub use tools::EmberMcp;

/// What the server tells a client about using it (`instructions`).
pub const INSTRUCTIONS: &str = include_str!("instructions.md");

/// `[mcp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpConfig {
    /// Host names (or `host:port`) MCP requests may carry besides loopback
    /// ones (DNS rebinding: a browser page must not reach a local server).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call (`scheme://host[:port]`); a request
    /// with any other `Origin` is refused. Empty: every Origin is refused.
    pub allowed_origins: Vec<String>,
    /// The most bytes of output one tool result carries (a command's
    /// stdout and stderr together, a read of a file or a process's output).
    pub max_result_bytes: usize,
    /// The largest MCP request body.
    pub max_request_bytes: usize,
    /// The idle timeout of sessions opened through MCP that name none (an
    /// agent thinks longer between calls than a script).
    pub session_idle_timeout: Option<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_result_bytes: 32 * 1024,
            max_request_bytes: 4 << 20,
            session_idle_timeout: Some("30m".into()),
        }
    }
}

/// How often an open answer stream is pinged.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// The loopback names every MCP request may carry as its Host.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The `/mcp` service over `state`, ended by `cancel` (the drain).
pub fn service<B: Backend>(
    state: AppState<B>,
    cfg: Arc<McpConfig>,
    cancel: CancellationToken,
) -> StreamableHttpService<EmberMcp<B>, LocalSessionManager>
where
    B::Vm: AgentVm,
{
    let hosts: Vec<String> =
        LOOPBACK_HOSTS.iter().map(|h| h.to_string()).chain(cfg.allowed_hosts.iter().cloned()).collect();
    let config = StreamableHttpServerConfig::default()
        // Requests of the current protocol (2026-07-28) are stateless
        // whatever this says; a legacy client (`initialize`) gets a
        // transport session, so that its `notifications/cancelled` reaches
        // the call it cancels. Ember's own state never hangs on it.
        .with_legacy_session_mode(true)
        // Answers as SSE streams with a keep-alive: a client that gives up
        // on a call (a legacy one sends its cancel where a stateless server
        // cannot match it) is seen gone at the next ping, and the command
        // is killed.
        .with_json_response(false)
        .with_sse_keep_alive(Some(KEEP_ALIVE))
        .with_cancellation_token(cancel)
        .with_allowed_hosts(hosts)
        .with_allowed_origins(cfg.allowed_origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_request_bytes);
    StreamableHttpService::new(
        move || Ok(EmberMcp::new(state.clone(), Arc::clone(&cfg))),
        Arc::new(LocalSessionManager::default()),
        config,
    )
}
