//! The wire format spoken between the host and the Ember guest agent.
//!
//! Both sides link this crate, so they cannot disagree about a frame. It holds
//! only message types and a sans-I/O codec: callers feed bytes in and take
//! frames out, whatever the transport (vsock, hybrid vsock, virtio-serial).
//!
//! A frame is a 4-byte big-endian body length followed by a JSON body, or a
//! binary one (first byte 0) for the messages that carry bulk bytes. Every
//! message carries a request id, so several requests can be in flight on one
//! connection; replies to one request arrive in order.
#![forbid(unsafe_code)]

mod bulk;
mod bytes;
mod codec;
mod fs;
mod message;

pub use codec::{
    decode, encode, encode_head_for, encode_split, frame_id, FrameDecoder, FrameError, Message, BULK_MARK,
    FRAME_HEADER_LEN,
};
pub use fs::{permissions, FileKind, FsEntry, MAX_LIST_BYTES, MAX_LIST_ENTRIES};
pub use message::*;

/// Protocol version; `hello` reports it so a host can refuse a stale image.
pub const PROTOCOL_VERSION: u32 = 9;
/// AF_VSOCK port the agent listens on (kernel vsock and hybrid vsock).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port the agent serves (`virtserialport,name=...`).
pub const SERIAL_PORT_NAME: &str = "org.ember.agent";
/// Where the host writes code files for `lang` + `code` calls (a scratch
/// directory: gone after a reset).
pub const CODE_DIR: &str = "/tmp/.ember";
/// Written by the agent to the guest console once it listens on vsock, so
/// the host knows when a hybrid-vsock CONNECT can be answered.
pub const VSOCK_READY_MARKER: &str = "ember-agent: vsock ready";
/// The virtio serial of the bulk lane: a read-only disk the host writes
/// upload pieces into, so they reach the guest as block requests.
pub const LANE_SERIAL: &str = "ember-lane";
/// Most bytes one `lane_write` moves.
pub const MAX_LANE_WRITE: u32 = 8 << 20;
/// Largest frame body either side accepts by default.
pub const MAX_FRAME_LEN: usize = 16 << 20;
