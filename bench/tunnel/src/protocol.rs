//! The byte protocol between the load generator and the backend.
//!
//! The first byte of a connection picks the mode:
//!
//! - [`MODE_SINK`]: the backend answers the mode byte with one [`SINK_READY`] byte, so the
//!   client can start its clock only once the whole path (handshakes included) is up. The
//!   client then sends frames `[u32 big-endian length][payload]` and ends with
//!   a zero-length frame; the backend then answers with the payload byte count as a u64
//!   big-endian. Framing (instead of a half-close) keeps the end of the stream in band: not
//!   every tunnel forwards a TCP half-close (nginx only with `proxy_half_close`, QUIC maps it
//!   to a stream FIN), and the benchmark must not depend on that.
//! - [`MODE_ECHO`]: the client sends [`MESSAGE_SIZE`]-byte requests (the mode byte is the
//!   first byte of the first request) and the backend answers each with [`MESSAGE_SIZE`] bytes.

/// First byte of a throughput connection.
pub const MODE_SINK: u8 = b'S';
/// The backend's answer to [`MODE_SINK`].
pub const SINK_READY: u8 = b'R';
/// First byte of a request/response connection.
pub const MODE_ECHO: u8 = b'E';
/// Size of a request and of a response: 1 KiB.
pub const MESSAGE_SIZE: usize = 1024;
/// Payload bytes per throughput frame: large enough that the 4-byte header and the
/// per-write system call cost nothing measurable.
pub const FRAME_PAYLOAD: usize = 64 * 1024;
