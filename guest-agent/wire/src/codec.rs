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

/// A message of the protocol: JSON in general, and a binary body for the
/// variants that carry bulk bytes (output, stdin, a connection's data), so
/// those bytes cross the channel as they are. Under TCG, base64 and JSON's
/// string scan cost the guest more CPU per byte than the copy itself.
pub trait Message: Serialize + DeserializeOwned {
    /// Append this message's binary header to `out` and return its bulk
    /// bytes, if it is a message with a binary body.
    fn bulk_head(&self, out: &mut Vec<u8>) -> Option<&[u8]>;
    /// Parse a binary body (its first byte is [`BULK_MARK`]).
    fn decode_bulk(body: &[u8]) -> Result<Self, FrameError>;
}

/// First byte of a binary body; a JSON body starts with `{`.
pub const BULK_MARK: u8 = 0;

/// Serialize `msg` into one frame, prefix included.
pub fn encode<T: Message>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let (mut frame, bulk) = encode_split(msg)?;
    frame.extend_from_slice(bulk);
    Ok(frame)
}

/// Serialize `msg` into one frame as two parts to be written one after the
/// other: the prefix and header, then the message's bulk bytes as they are
/// (empty for a JSON message). Saves copying the bulk bytes.
pub fn encode_split<T: Message>(msg: &T) -> Result<(Vec<u8>, &[u8]), FrameError> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    let bulk = match msg.bulk_head(&mut out) {
        Some(data) => data,
        None => {
            serde_json::to_writer(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
            &[]
        }
    };
    let len = u32::try_from(out.len() - FRAME_HEADER_LEN + bulk.len())
        .map_err(|_| FrameError::Encode("message longer than 4 GiB".into()))?;
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok((out, bulk))
}

/// The prefix and header of `msg`, a message with a binary body and no
/// bulk bytes of its own, framed as if `bulk_len` bytes followed it: a
/// sender writes them from a buffer of its own right after.
pub fn encode_head_for<T: Message>(msg: &T, bulk_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    match msg.bulk_head(&mut out) {
        Some([]) => {}
        _ => return Err(FrameError::Encode("not a binary message without bulk bytes".into())),
    }
    let len = u32::try_from(out.len() - FRAME_HEADER_LEN + bulk_len)
        .map_err(|_| FrameError::Encode("message longer than 4 GiB".into()))?;
    out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Parse one frame body (without its prefix).
pub fn decode<T: Message>(body: &[u8]) -> Result<T, FrameError> {
    if body.first() == Some(&BULK_MARK) {
        return T::decode_bulk(body);
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The request id of a frame body that did not parse, where it can be read.
pub fn frame_id(body: &[u8]) -> Option<u64> {
    if body.first() == Some(&BULK_MARK) {
        return crate::bulk::Reader::new(body).ok()?.1.u64().ok();
    }
    serde_json::from_slice::<serde_json::Value>(body).ok()?.get("id")?.as_u64()
}

/// Reassembles frames from a byte stream.
///
/// An oversized frame is reported once as [`FrameError::TooLarge`] and its
/// body is then skipped without being buffered, so a peer that sends one bad
/// frame cannot make the other side allocate it or lose the frames after it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already returned (compacted away lazily, so taking a
    /// frame does not move everything buffered behind it).
    start: usize,
    /// Body bytes of an oversized frame still to be thrown away.
    skip: usize,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), start: 0, skip: 0, max }
    }

    /// Append bytes read from the transport.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        self.next_frame_with(|body| body.to_vec())
    }

    /// The next complete frame body, if one is buffered, handed to `take`
    /// where it lies (no copy of its own).
    pub fn next_frame_with<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<Result<R, FrameError>> {
        let pending = &self.buf[self.start..];
        if self.skip > 0 || pending.len() < FRAME_HEADER_LEN {
            return None;
        }
        let mut prefix = [0u8; FRAME_HEADER_LEN];
        prefix.copy_from_slice(&pending[..FRAME_HEADER_LEN]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max {
            let available = pending.len() - FRAME_HEADER_LEN;
            let dropped = available.min(len);
            self.skip = len - dropped;
            self.buf.drain(..self.start + FRAME_HEADER_LEN + dropped);
            self.start = 0;
            return Some(Err(FrameError::TooLarge { len, max: self.max }));
        }
        if pending.len() < FRAME_HEADER_LEN + len {
            return None;
        }
        let body = take(&pending[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
        self.start += FRAME_HEADER_LEN + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
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
    fn a_head_for_outside_bytes_frames_them_as_the_whole_message_would() {
        use crate::{Response, ResponseBody, Stream};
        let output =
            |data: Vec<u8>| Response { id: 9, body: ResponseBody::Output { stream: Stream::Stdout, data } };
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut framed = encode_head_for(&output(Vec::new()), data.len()).unwrap();
        framed.extend_from_slice(&data);
        assert_eq!(framed, encode(&output(data.clone())).unwrap());
        let mut dec = FrameDecoder::new(1 << 20);
        dec.push(&framed);
        let body = dec.next_frame().unwrap().unwrap();
        assert_eq!(decode::<Response>(&body).unwrap(), output(data));
        // Only for a binary message without bytes of its own.
        assert!(encode_head_for(&output(vec![1]), 1).is_err());
        assert!(encode_head_for(&Response { id: 1, body: ResponseBody::Ok }, 1).is_err());
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
    fn frames_taken_between_pushes_keep_their_order_and_the_buffer_compacts() {
        let mut dec = FrameDecoder::new(1024);
        let mut next = 0;
        for round in 0..50u64 {
            for i in 0..3 {
                dec.push(&encode(&hello(round * 3 + i)).unwrap());
            }
            // Take two of the three: one stays buffered behind.
            for _ in 0..2 {
                assert_eq!(decode::<Request>(&dec.next_frame().unwrap().unwrap()).unwrap(), hello(next));
                next += 1;
            }
            assert!(dec.buf.len() < 64 * 100, "taken frames are dropped, not kept: {}", dec.buf.len());
        }
        while let Some(f) = dec.next_frame() {
            assert_eq!(decode::<Request>(&f.unwrap()).unwrap(), hello(next));
            next += 1;
        }
        assert_eq!((next, dec.buffered()), (150, 0));
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
