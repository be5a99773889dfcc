//! The binary body of the messages that carry bulk bytes:
//! `[0][kind][id: u64]` then the kind's fields, big-endian, then the bytes
//! as they are, up to the end of the frame.
//!
//! | kind | message              | fields                          |
//! |------|----------------------|---------------------------------|
//! | 1    | response `output`    | stream: u8 (0 stdout, 1 stderr) |
//! | 2    | request `stdin`      | pid: u32, eof: u8               |
//! | 3    | request `send`       | target: u64, eof: u8            |

use crate::codec::{FrameError, Message, BULK_MARK};
use crate::message::{Request, RequestBody, Response, ResponseBody, Stream};

const OUTPUT: u8 = 1;
const STDIN: u8 = 2;
const SEND: u8 = 3;

fn head(out: &mut Vec<u8>, kind: u8, id: u64) {
    out.extend_from_slice(&[BULK_MARK, kind]);
    out.extend_from_slice(&id.to_be_bytes());
}

/// Reads the fields of a binary body in order.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The body's kind, and a reader at its id.
    pub(crate) fn new(body: &'a [u8]) -> Result<(u8, Self), FrameError> {
        match body {
            [BULK_MARK, kind, rest @ ..] => Ok((*kind, Self { rest })),
            _ => Err(malformed("not a binary body")),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let (field, rest) = self.rest.split_first_chunk::<N>().ok_or_else(|| malformed("body too short"))?;
        self.rest = rest;
        Ok(*field)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FrameError> {
        self.take::<8>().map(u64::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        self.take::<4>().map(u32::from_be_bytes)
    }

    fn flag(&mut self) -> Result<bool, FrameError> {
        match self.take::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            [b] => Err(malformed(&format!("flag {b} is neither 0 nor 1"))),
        }
    }

    fn data(self) -> Vec<u8> {
        self.rest.to_vec()
    }
}

fn malformed(why: &str) -> FrameError {
    FrameError::Malformed(format!("binary body: {why}"))
}

impl Message for Response {
    fn bulk_head(&self, out: &mut Vec<u8>) -> Option<&[u8]> {
        let ResponseBody::Output { stream, data } = &self.body else { return None };
        head(out, OUTPUT, self.id);
        out.push(match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        });
        Some(data)
    }

    fn decode_bulk(body: &[u8]) -> Result<Self, FrameError> {
        let (kind, mut r) = Reader::new(body)?;
        let id = r.u64()?;
        if kind != OUTPUT {
            return Err(malformed(&format!("kind {kind} is not a response")));
        }
        let stream = match r.take::<1>()? {
            [0] => Stream::Stdout,
            [1] => Stream::Stderr,
            [b] => return Err(malformed(&format!("stream {b}"))),
        };
        Ok(Response { id, body: ResponseBody::Output { stream, data: r.data() } })
    }
}

impl Message for Request {
    fn bulk_head(&self, out: &mut Vec<u8>) -> Option<&[u8]> {
        match &self.body {
            RequestBody::Stdin { pid, data, eof } => {
                head(out, STDIN, self.id);
                out.extend_from_slice(&pid.to_be_bytes());
                out.push(u8::from(*eof));
                Some(data)
            }
            RequestBody::Send { target, data, eof } => {
                head(out, SEND, self.id);
                out.extend_from_slice(&target.to_be_bytes());
                out.push(u8::from(*eof));
                Some(data)
            }
            _ => None,
        }
    }

    fn decode_bulk(body: &[u8]) -> Result<Self, FrameError> {
        let (kind, mut r) = Reader::new(body)?;
        let id = r.u64()?;
        let body = match kind {
            STDIN => {
                let pid = r.u32()?;
                let eof = r.flag()?;
                RequestBody::Stdin { pid, eof, data: r.data() }
            }
            SEND => {
                let target = r.u64()?;
                let eof = r.flag()?;
                RequestBody::Send { target, eof, data: r.data() }
            }
            _ => return Err(malformed(&format!("kind {kind} is not a request"))),
        };
        Ok(Request { id, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, frame_id};

    fn round_trip<T: Message + PartialEq + std::fmt::Debug>(msg: T) -> Vec<u8> {
        let frame = encode(&msg).unwrap();
        assert_eq!(decode::<T>(&frame[4..]).unwrap(), msg);
        frame
    }

    #[test]
    fn bulk_messages_travel_as_raw_bytes() {
        let data: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let out =
            Response { id: 7, body: ResponseBody::Output { stream: Stream::Stderr, data: data.clone() } };
        let frame = round_trip(out);
        assert_eq!(frame.len(), 4 + 11 + data.len(), "no base64, no JSON");
        assert_eq!(&frame[4..6], &[BULK_MARK, OUTPUT]);
        assert_eq!(frame_id(&frame[4..]), Some(7));
        let stdin =
            Request { id: u64::MAX, body: RequestBody::Stdin { pid: 42, data: data.clone(), eof: true } };
        assert_eq!(round_trip(stdin).len(), 4 + 15 + data.len());
        let send = Request { id: 3, body: RequestBody::Send { target: 9, data: Vec::new(), eof: false } };
        assert_eq!(round_trip(send).len(), 4 + 19);
    }

    #[test]
    fn a_split_frame_is_the_frame() {
        let data: Vec<u8> = (0..=255).collect();
        for msg in [
            Response { id: 1, body: ResponseBody::Output { stream: Stream::Stdout, data: data.clone() } },
            Response { id: 2, body: ResponseBody::Ok },
        ] {
            let (head, bulk) = crate::encode_split(&msg).unwrap();
            assert_eq!([head, bulk.to_vec()].concat(), encode(&msg).unwrap());
        }
    }

    #[test]
    fn other_messages_stay_json() {
        let frame = round_trip(Request { id: 1, body: RequestBody::Credit { target: 2, bytes: 3 } });
        assert_eq!(frame[4], b'{');
        let frame = round_trip(Response { id: 1, body: ResponseBody::Ok });
        assert_eq!(frame[4], b'{');
        assert_eq!(frame_id(&frame[4..]), Some(1));
    }

    #[test]
    fn malformed_binary_bodies_are_errors() {
        let good =
            encode(&Request { id: 1, body: RequestBody::Send { target: 2, data: vec![1], eof: true } })
                .unwrap()[4..]
                .to_vec();
        let mut bad_flag = good.clone();
        bad_flag[18] = 2;
        let mut kind = good.clone();
        kind[1] = OUTPUT;
        for body in
            [&good[..10], &good[..18], &bad_flag[..], &kind[..], &[BULK_MARK][..], &[BULK_MARK, 9][..]]
        {
            assert!(matches!(decode::<Request>(body), Err(FrameError::Malformed(_))), "{body:?}");
        }
        let mut stream =
            encode(&Response { id: 1, body: ResponseBody::Output { stream: Stream::Stdout, data: vec![] } })
                .unwrap()[4..]
                .to_vec();
        stream[10] = 5;
        assert!(decode::<Response>(&stream).is_err());
        assert!(decode::<Response>(&good).is_err(), "a request's kind is not a response");
    }
}
