//! Serde adapter carrying arbitrary bytes as base64 strings, so non-UTF-8
//! output and file contents survive JSON unchanged.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(data))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    STANDARD.decode(text.as_bytes()).map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
}
