//! The Connect protocol as the e2b SDKs speak it: JSON codec only, HTTP/1.1.
//!
//! - **Unary** calls are a plain `POST` of the JSON message
//!   (`application/json`); the answer is 200 with the JSON message, or an
//!   error status with `{"code": "<connect code>", "message"}`.
//! - **Streams** (`application/connect+json`, exactly: the Python SDK
//!   rejects parameters) are envelopes: a flag byte, a 4-byte big-endian
//!   length, the JSON. Flag `0x00` is a message, `0x02` the end of the
//!   stream, which carries `{}` or `{"error": {...}}` and is always sent
//!   (the JS SDK requires it); a stream's errors travel in it with HTTP 200.
//!   Compressed envelopes (`0x01`) are refused: both SDKs disable
//!   compression.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use serde::Serialize;

/// The content type of a Connect stream, exactly.
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
/// Flag of an ordinary message envelope.
pub const FLAG_MESSAGE: u8 = 0x00;
/// Flag of a compressed envelope (never sent by the SDKs).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag of the end-of-stream envelope.
pub const FLAG_END: u8 = 0x02;
/// The largest envelope a request may carry (a `SendInput` of stdin, a
/// stream's start message): bounded before anything is buffered.
pub const MAX_ENVELOPE: usize = 8 << 20;

/// Connect's error codes, with the HTTP status of a unary answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    FailedPrecondition,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::FailedPrecondition => "failed_precondition",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unauthenticated => "unauthenticated",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status of a unary error answer (the Connect mapping).
    pub fn http_status(self) -> u16 {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::ResourceExhausted => 429,
            Code::Internal => 500,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
        }
    }
}

/// A Connect error: what a unary answer's body or a stream's end carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// `{"code", "message"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

/// One envelope around `message` (JSON).
pub fn envelope<T: Serialize>(message: &T) -> Bytes {
    let json = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    frame(FLAG_MESSAGE, &json)
}

/// The end-of-stream envelope: `{}`, or the error.
pub fn end_stream(error: Option<&RpcError>) -> Bytes {
    let body = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.to_json() }),
    };
    frame(FLAG_END, body.to_string().as_bytes())
}

fn frame(flag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(flag);
    b.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    b.put_slice(body);
    b.freeze()
}

/// What the decoder took out of a request's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    Message(Bytes),
    End(Bytes),
}

/// Envelopes out of a byte stream, as the bytes come (a request body may be
/// chunked anywhere). Sans I/O.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole envelope, if the bytes hold one. A compressed or
    /// oversized one is an error, found from its header alone.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, RpcError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flag & FLAG_COMPRESSED != 0 {
            return Err(RpcError::new(Code::InvalidArgument, "compressed envelopes are not accepted"));
        }
        if len > MAX_ENVELOPE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("an envelope of {len} bytes is over the {MAX_ENVELOPE}-byte limit"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(if flag & FLAG_END != 0 { Envelope::End(body) } else { Envelope::Message(body) }))
    }

    /// Bytes left that make no whole envelope.
    pub fn leftover(&self) -> usize {
        self.buf.len()
    }
}

/// The first message of a streaming request body (a server stream's
/// request is exactly one envelope), from its whole bytes.
pub fn single_message(body: &[u8]) -> Result<Bytes, RpcError> {
    let mut d = Decoder::default();
    d.push(body);
    match d.next_envelope()? {
        Some(Envelope::Message(m)) => Ok(m),
        Some(Envelope::End(_)) => {
            Err(RpcError::new(Code::InvalidArgument, "the stream ended before its message"))
        }
        None => Err(RpcError::new(Code::InvalidArgument, "the request holds no whole envelope")),
    }
}

/// A `Connect-Timeout-Ms` header's deadline: digits, at most 10 of them.
pub fn timeout_ms(value: Option<&str>) -> Result<Option<u64>, RpcError> {
    let Some(v) = value else { return Ok(None) };
    let v = v.trim();
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("Connect-Timeout-Ms {v:?} is not a number"),
        ));
    }
    Ok(v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_flag_length_json() {
        let b = envelope(&serde_json::json!({"event": {"start": {"pid": 7}}}));
        assert_eq!(b[0], 0);
        assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize, b.len() - 5);
        assert_eq!(&b[5..], br#"{"event":{"start":{"pid":7}}}"#);
        // The sample the research measured: an empty end-stream is 02 00 00 00 02 {}.
        assert_eq!(&end_stream(None)[..], b"\x02\x00\x00\x00\x02{}");
        let e = end_stream(Some(&RpcError::new(Code::NotFound, "process 9 not found")));
        let v: serde_json::Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }

    #[test]
    fn the_decoder_takes_envelopes_however_the_bytes_are_cut() {
        let mut all = Vec::new();
        all.extend_from_slice(&envelope(&serde_json::json!({"a": 1})));
        all.extend_from_slice(&envelope(&serde_json::json!({"b": "x".repeat(300)})));
        all.extend_from_slice(&end_stream(None));
        for cut in [1, 2, 5, 7, 64, all.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in all.chunks(cut) {
                d.push(chunk);
                while let Some(e) = d.next_envelope().unwrap() {
                    got.push(e);
                }
            }
            assert_eq!(got.len(), 3, "cut {cut}");
            assert!(matches!(&got[2], Envelope::End(b) if &b[..] == b"{}"));
            assert_eq!(d.leftover(), 0);
        }
    }

    #[test]
    fn compressed_and_oversized_envelopes_are_refused_from_their_header() {
        let mut d = Decoder::default();
        d.push(&[FLAG_COMPRESSED, 0, 0, 0, 2]);
        assert_eq!(d.next_envelope().unwrap_err().code, Code::InvalidArgument);
        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_envelope().unwrap_err().code, Code::ResourceExhausted);
        assert!(single_message(b"\x00\x00").is_err());
        assert!(single_message(&end_stream(None)).is_err());
        assert_eq!(&single_message(&envelope(&serde_json::json!({}))).unwrap()[..], b"{}");
    }

    #[test]
    fn codes_map_to_connect_statuses() {
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::AlreadyExists.http_status(), 409);
        assert_eq!(Code::ResourceExhausted.http_status(), 429);
        assert_eq!(RpcError::new(Code::Unavailable, "x").to_json()["code"], "unavailable");
        assert_eq!(timeout_ms(Some("60000")).unwrap(), Some(60000));
        assert_eq!(timeout_ms(None).unwrap(), None);
        assert!(timeout_ms(Some("-1")).is_err() && timeout_ms(Some("1e3")).is_err());
    }
}
