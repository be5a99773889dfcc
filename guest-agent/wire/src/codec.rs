//! Length-prefixed frame codec. Sans-I/O: push bytes, pull frames.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes in the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Serialize `msg` into one frame, prefix included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    serde_json::to_writer(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = u32::try_from(out.len() - FRAME_HEADER_LEN)
        .map_err(|_| FrameError::Encode("message longer than 4 GiB".into()))?;
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Parse one frame body (without its prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reassembles frames from a byte stream.
///
/// An oversized frame is reported once as [`FrameError::TooLarge`] and its
/// body is then skipped without being buffered, so a peer that sends one bad
/// frame cannot make the other side allocate it or lose the frames after it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Body bytes of an oversized frame still to be thrown away.
    skip: usize,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), skip: 0, max }
    }

    /// Append bytes read from the transport.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        if self.skip > 0 || self.buf.len() < FRAME_HEADER_LEN {
            return None;
        }
        let mut prefix = [0u8; FRAME_HEADER_LEN];
        prefix.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max {
            let available = self.buf.len() - FRAME_HEADER_LEN;
            let dropped = available.min(len);
            self.skip = len - dropped;
            self.buf.drain(..FRAME_HEADER_LEN + dropped);
            return Some(Err(FrameError::TooLarge { len, max: self.max }));
        }
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return None;
        }
        let body = self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
        self.buf.drain(..FRAME_HEADER_LEN + len);
        Some(Ok(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, RequestBody};

    fn hello(id: u64) -> Request {
        Request { id, body: RequestBody::Hello { nonce: id * 7 } }
    }

    #[test]
    fn round_trips_frames_split_at_every_byte() {
        let mut stream = encode(&hello(1)).unwrap();
        stream.extend(encode(&hello(2)).unwrap());
        for split in 0..stream.len() {
            let mut dec = FrameDecoder::new(1024);
            dec.push(&stream[..split]);
            let mut got = Vec::new();
            while let Some(f) = dec.next_frame() {
                got.push(decode::<Request>(&f.unwrap()).unwrap());
            }
            dec.push(&stream[split..]);
            while let Some(f) = dec.next_frame() {
                got.push(decode::<Request>(&f.unwrap()).unwrap());
            }
            assert_eq!(got, vec![hello(1), hello(2)], "split at {split}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn oversized_frame_is_reported_once_without_buffering_it() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&100u32.to_be_bytes());
        dec.push(&[b'x'; 50]);
        assert_eq!(dec.next_frame(), Some(Err(FrameError::TooLarge { len: 100, max: 16 })));
        assert_eq!(dec.next_frame(), None);
        assert_eq!(dec.buffered(), 0);
        dec.push(&[b'x'; 50]);
        assert_eq!(dec.buffered(), 0, "the rest of the oversized body is skipped");
    }

    #[test]
    fn skip_lands_on_the_next_frame() {
        let mut dec = FrameDecoder::new(64);
        let mut stream = 200u32.to_be_bytes().to_vec();
        stream.extend(std::iter::repeat_n(0xffu8, 200));
        let good = encode(&hello(4)).unwrap();
        assert!(good.len() - 4 <= 64);
        stream.extend(&good);
        for chunk in stream.chunks(7) {
            dec.push(chunk);
        }
        assert!(matches!(dec.next_frame(), Some(Err(FrameError::TooLarge { len: 200, .. }))));
        let frame = dec.next_frame().unwrap().unwrap();
        assert_eq!(decode::<Request>(&frame).unwrap(), hello(4));
    }

    #[test]
    fn malformed_body_is_an_error_not_a_panic() {
        for body in
            [&b"{"[..], b"null", b"{\"id\":1}", b"\xff\xfe", b"{\"id\":1,\"body\":{\"type\":\"nope\"}}"]
        {
            assert!(matches!(decode::<Request>(body), Err(FrameError::Malformed(_))));
        }
    }
}
