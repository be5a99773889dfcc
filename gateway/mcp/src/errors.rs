//! How a refusal reaches the model: a tool error (`isError: true`) whose
//! text says the HTTP status, Ember's code, the message and, for a 429 or
//! 503, when to retry; its structured content is
//! `{"error": {"status", "code", "message", "retry_after"}}`. A command that
//! ran is never a tool error, whatever its exit code, signal or timeout.
//! JSON-RPC errors are left to rmcp (unknown tool, malformed request):
//! clients often hide their text from the model.

use ember_service::Error;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::json;

/// Ember's error as a tool error.
pub fn tool_error(e: &Error) -> CallToolResult {
    let status = e.kind.http_status();
    let mut text = format!("ember error {status} {}: {}", e.code, e.message);
    if let Some(s) = e.retry_after {
        text.push_str(&format!(" (retry after {s} s)"));
    }
    let body = json!({"error": {"status": status, "code": e.code, "message": e.message, "retry_after": e.retry_after}});
    let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
    r.structured_content = Some(body);
    r
}

/// An argument the tool itself refuses (after rmcp's schema check).
pub fn invalid(message: impl Into<String>) -> CallToolResult {
    tool_error(&Error::new(ember_service::Kind::Invalid, "invalid_request", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &CallToolResult) -> String {
        r.content.iter().filter_map(|c| c.as_text()).map(|t| t.text.clone()).collect()
    }

    #[test]
    fn a_refusal_names_status_code_and_retry() {
        let mut e = Error::busy("pool_exhausted", "no VM free", 3);
        e.message = "no VM free".into();
        let r = tool_error(&e);
        assert_eq!(r.is_error, Some(true));
        assert_eq!(text(&r), "ember error 429 pool_exhausted: no VM free (retry after 3 s)");
        let s = r.structured_content.unwrap();
        assert_eq!(s["error"]["status"], 429);
        assert_eq!(s["error"]["retry_after"], 3);
        let r = tool_error(&Error::not_found("no session \"x\""));
        assert_eq!(text(&r), "ember error 404 not_found: no session \"x\"");
        assert!(r.structured_content.unwrap()["error"]["retry_after"].is_null());
    }

    #[test]
    fn an_argument_error_is_a_400() {
        let r = invalid("give exactly one of cmd, argv, code");
        assert_eq!(r.structured_content.as_ref().unwrap()["error"]["code"], "invalid_request");
        assert!(text(&r).starts_with("ember error 400 invalid_request: give exactly one"));
    }
}
