//! Command output as JSON text without losing bytes: valid UTF-8 travels
//! as a string, anything else as base64. Streams are cut into chunks
//! anywhere, so a character split across two chunks is held back and sent
//! whole with the next one.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A chunk of output: `data` when it is UTF-8, else `data_base64`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

impl OutputText {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(s) => Self { data: Some(s), data_base64: None },
            Err(e) => Self { data: None, data_base64: Some(base64(e.as_bytes())) },
        }
    }
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A whole output for a result: the text (lossy), and the exact bytes as
/// base64 when the text could not hold them.
pub fn text_and_base64(bytes: Vec<u8>) -> (String, Option<String>) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, None),
        Err(e) => {
            let raw = e.into_bytes();
            (String::from_utf8_lossy(&raw).into_owned(), Some(base64(&raw)))
        }
    }
}

/// Splits one stream into chunks that are each valid UTF-8 where the
/// stream is, carrying an incomplete trailing character to the next chunk.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    carry: Vec<u8>,
}

impl Utf8Chunker {
    /// The next chunk to send for `data`, if any.
    pub fn push(&mut self, data: Vec<u8>) -> Option<OutputText> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend(data);
        match std::str::from_utf8(&buf) {
            Ok(_) => {}
            // Only the end is cut: hold it back (at most 3 bytes).
            Err(e) if e.error_len().is_none() => {
                self.carry = buf.split_off(e.valid_up_to());
            }
            Err(_) => return Some(OutputText { data: None, data_base64: Some(base64(&buf)) }),
        }
        (!buf.is_empty()).then(|| OutputText::from_bytes(buf))
    }

    /// What is held back, once the stream has ended.
    pub fn finish(&mut self) -> Option<OutputText> {
        let rest = std::mem::take(&mut self.carry);
        (!rest.is_empty()).then(|| OutputText::from_bytes(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[OutputText]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            match (&c.data, &c.data_base64) {
                (Some(s), None) => out.extend(s.as_bytes()),
                (None, Some(b)) => out.extend(base64::engine::general_purpose::STANDARD.decode(b).unwrap()),
                other => panic!("a chunk has exactly one field: {other:?}"),
            }
        }
        out
    }

    #[test]
    fn a_character_cut_between_chunks_arrives_whole() {
        let text = "héllo wörld ☃ 😀".as_bytes().to_vec();
        for cut in 0..text.len() {
            let mut c = Utf8Chunker::default();
            let mut chunks: Vec<OutputText> = Vec::new();
            chunks.extend(c.push(text[..cut].to_vec()));
            chunks.extend(c.push(text[cut..].to_vec()));
            chunks.extend(c.finish());
            assert!(chunks.iter().all(|c| c.data.is_some()), "cut at {cut}: {chunks:?}");
            assert_eq!(decode(&chunks), text);
        }
    }

    #[test]
    fn invalid_bytes_go_as_base64_and_nothing_is_lost() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut c = Utf8Chunker::default();
        let mut chunks: Vec<OutputText> = Vec::new();
        for piece in bytes.chunks(7) {
            chunks.extend(c.push(piece.to_vec()));
        }
        chunks.extend(c.finish());
        assert_eq!(decode(&chunks), bytes);
        // A stream ending inside a character still gives back its bytes.
        let mut c = Utf8Chunker::default();
        assert!(c.push(vec![b'a', 0xe2, 0x98]).is_some());
        assert_eq!(decode(&[c.finish().unwrap()]), vec![0xe2, 0x98]);
    }

    #[test]
    fn whole_outputs_keep_text_and_exact_bytes() {
        assert_eq!(text_and_base64(b"ok\n".to_vec()), ("ok\n".into(), None));
        let (text, b) = text_and_base64(vec![b'a', 0xff]);
        assert_eq!(text, "a\u{fffd}");
        assert_eq!(b.as_deref(), Some("Yf8="));
    }
}
