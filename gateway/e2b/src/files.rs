//! envd's `GET /files` and `POST /files`: a session's files read and written
//! as the guest's user, streamed. A request carries the sandbox's
//! `X-Access-Token`, or a signed URL's `signature` (`v1_` + base64 of
//! SHA-256 over `<path>:<read|write>:<username>:<token>[:<expiration>]`,
//! unpadded; past its `signature_expiration` it is refused). Uploads come
//! as `multipart/form-data` (each part a file, its filename the path when
//! the query names none) or as one `application/octet-stream` body,
//! optionally `Content-Encoding: gzip` (decoded within the upload limit).
//! Errors are `{"code": <status>, "message"}`, which the SDKs read.

use std::io::Read as _;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ember_pool::pool::Backend;
use ember_service::files::Files;
use ember_service::{AppState, Kind};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::control::TOKEN_KEY;
use crate::sandbox::Found;

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    (status, axum::Json(body)).into_response()
}

fn from_service(e: ember_service::Error) -> Response {
    let status = match e.kind {
        Kind::NotFound | Kind::Gone => StatusCode::NOT_FOUND,
        Kind::Forbidden => StatusCode::FORBIDDEN,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        Kind::Busy => StatusCode::TOO_MANY_REQUESTS,
        Kind::VmFailed | Kind::Unavailable => StatusCode::BAD_GATEWAY,
        Kind::Conflict => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.message)
}

/// The query of a `/files` request.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Query {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<u64>,
}

/// Whether a `/files` query carries a signature (of a signed URL).
pub fn signed(query: Option<&str>) -> bool {
    serde_urlencoded::from_str::<Query>(query.unwrap_or("")).is_ok_and(|q| q.signature.is_some())
}

/// What a signed URL's signature must be (the SDKs' `get_signature`).
pub fn signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<u64>,
) -> String {
    let mut raw = format!("{path}:{operation}:{username}:{token}");
    if let Some(e) = expiration {
        raw.push_str(&format!(":{e}"));
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Whether the request may touch the sandbox's files: its token, or a
/// signature of this path and operation that has not expired.
fn allowed<B: Backend>(state: &AppState<B>, found: &Found, headers: &HeaderMap, q: &Query, op: &str) -> bool {
    let Ok(session) = state.session(&found.caller, &found.key) else { return false };
    let Some(token) = session.info.metadata.get(TOKEN_KEY) else { return false };
    let same = |a: &str, b: &str| {
        use subtle::ConstantTimeEq as _;
        a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
    };
    if headers.get("x-access-token").and_then(|v| v.to_str().ok()).is_some_and(|t| same(t.trim(), token)) {
        return true;
    }
    let (Some(sig), Some(path)) = (&q.signature, &q.path) else { return false };
    if let Some(exp) = q.signature_expiration {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now > exp {
            return false;
        }
    }
    let want = signature(path, op, q.username.as_deref().unwrap_or(""), token, q.signature_expiration);
    same(sig, &want)
}

async fn files<B: Backend>(state: &AppState<B>, found: &Found) -> Result<Files, Response> {
    state.files(&found.caller, &found.key).await.map_err(from_service)
}

/// `GET` or `POST /files`.
pub async fn handle<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let q: Query = match serde_urlencoded::from_str(query.unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("query: {e}")),
    };
    let op = if method == Method::GET { "read" } else { "write" };
    if !allowed(state, found, headers, &q, op) {
        return error(
            StatusCode::UNAUTHORIZED,
            "no valid X-Access-Token or signature for this sandbox's files",
        );
    }
    match *method {
        Method::GET => read(state, found, &q).await,
        Method::POST => write(state, found, &q, headers, body).await.unwrap_or_else(|r| r),
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST /files"),
    }
}

async fn read<B: Backend>(state: &AppState<B>, found: &Found, q: &Query) -> Response {
    let Some(path) = q.path.as_deref() else { return error(StatusCode::BAD_REQUEST, "a path is required") };
    let f = match files(state, found).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    match f.read(path).await {
        Ok(stream) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(stream, 256 << 10));
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            resp
        }
        Err(e) if e.kind == Kind::NotFound => {
            error(StatusCode::NOT_FOUND, format!("path {path:?} not found"))
        }
        Err(e) => from_service(e),
    }
}

/// The entry a written file answers with.
async fn written(f: &Files, path: &str) -> Result<serde_json::Value, Response> {
    let e = f.stat(path).await.map_err(from_service)?;
    Ok(serde_json::json!({ "path": e.path, "name": e.name, "type": "file" }))
}

async fn write<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let f = files(state, found).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let limit = state.limits.max_upload_bytes;
    let mut out = Vec::new();
    if let Ok(boundary) = multer::parse_boundary(content_type) {
        let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
        let mut first = true;
        while let Some(mut part) =
            parts.next_field().await.map_err(|e| error(StatusCode::BAD_REQUEST, format!("multipart: {e}")))?
        {
            let named = part.file_name().map(str::to_string);
            let path = match (first, &q.path, named) {
                (true, Some(p), _) => p.clone(),
                (_, _, Some(n)) if !n.is_empty() => n,
                _ => return Err(error(StatusCode::BAD_REQUEST, "a multipart file without a path")),
            };
            first = false;
            let mut upload = f.write(&path, None).await.map_err(from_service)?;
            while let Some(chunk) =
                part.chunk().await.map_err(|e| error(StatusCode::BAD_REQUEST, format!("multipart: {e}")))?
            {
                upload.write(&chunk).await.map_err(from_service)?;
            }
            upload.finish().await.map_err(from_service)?;
            out.push(written(&f, &path).await?);
        }
    } else {
        let Some(path) = q.path.as_deref() else {
            return Err(error(StatusCode::BAD_REQUEST, "a path is required"));
        };
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut upload = f.write(path, if gzip { None } else { declared }).await.map_err(from_service)?;
        let mut stream = body.into_data_stream();
        if gzip {
            // Decoded in memory, both sides bounded by the upload limit.
            let mut raw = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
                if (raw.len() + chunk.len()) as u64 > limit {
                    return Err(from_service(ember_service::files::too_large(limit)));
                }
                raw.extend_from_slice(&chunk);
            }
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .take(limit + 1)
                .read_to_end(&mut plain)
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("gzip: {e}")))?;
            upload.write(&plain).await.map_err(from_service)?;
        } else {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
                upload.write(&chunk).await.map_err(from_service)?;
            }
        }
        upload.finish().await.map_err(from_service)?;
        out.push(written(&f, path).await?);
    }
    if out.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "no file in the request"));
    }
    Ok(axum::Json(out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_the_sdks() {
        // sha256("/home/user/a.txt:read::tok") in base64 without padding.
        let s = signature("/home/user/a.txt", "read", "", "tok", None);
        assert!(s.starts_with("v1_") && !s.ends_with('='), "{s}");
        assert_ne!(s, signature("/home/user/a.txt", "write", "", "tok", None));
        assert_ne!(s, signature("/home/user/a.txt", "read", "", "tok", Some(1)));
        let digest = Sha256::digest(b"/home/user/a.txt:read::tok");
        assert_eq!(s, format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)));
    }
}
