//! The tunnel stream header and its status answer: pure encode/decode, no I/O.
//!
//! Every proxied TCP connection is one bidirectional QUIC stream. The calling gateway writes a
//! [`RequestHeader`] first; the serving gateway answers with exactly one [`Status`] before any
//! payload byte flows. `Connected` is the only answer after which bytes are spliced; every
//! other answer arrives before a client byte left the caller, so the caller may retry
//! elsewhere (docs/reliability.md promise 10).
//!
//! Wire format of the request (all integers big-endian):
//!
//! ```text
//! magic "MSHP" (4) | version u8 | body_len u16 | body
//! body = request_id u64 | port u16 | ns_len u8 | ns | name_len u8 | name | caller_len u8 | caller
//! ```
//!
//! Wire format of the answer: `version u8 | status u8`.
//!
//! The header is length-bounded ([`MAX_HEADER_LEN`]) so a peer cannot make the reader buffer
//! without bound; names are validated with the same rules as catalog names, so a decoded
//! header only carries names that could exist.

use thiserror::Error;

use crate::names::{ClusterName, NameError, Namespace, ServiceKey, ServiceName};

/// The first bytes of every tunnel stream; rejects a stream that is not meshup at all.
pub const MAGIC: [u8; 4] = *b"MSHP";
/// The only header version this code speaks.
pub const VERSION: u8 = 1;
/// Fixed prefix: magic, version, body length.
pub const PREFIX_LEN: usize = 4 + 1 + 2;
/// Largest body a reader accepts (three 63-byte labels plus fixed fields fit easily).
pub const MAX_BODY_LEN: usize = 256;
/// Largest whole header in bytes; readers never buffer more than this before deciding.
pub const MAX_HEADER_LEN: usize = PREFIX_LEN + MAX_BODY_LEN;
/// Length of the status answer in bytes.
pub const STATUS_LEN: usize = 2;

/// Why bytes could not be decoded. `Incomplete` means "read more and try again"; every other
/// variant means the stream is garbage and must be answered `BadRequest` or reset.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("incomplete tunnel header: need at least {needed} bytes")]
    Incomplete {
        /// Total bytes needed before decoding can make progress.
        needed: usize,
    },
    #[error("not a meshup tunnel stream (bad magic bytes)")]
    BadMagic,
    #[error("unsupported tunnel header version {0} (this gateway speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("tunnel header body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    TooLong(usize),
    #[error("tunnel header body is malformed: {0}")]
    Malformed(&'static str),
    #[error("tunnel header carries an invalid name: {0}")]
    BadName(#[from] NameError),
    #[error("unknown tunnel status code {0}")]
    UnknownStatus(u8),
}

impl DecodeError {
    /// Whether reading more bytes could turn this into a success.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

/// What the calling gateway asks for on a new stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Correlates logs on both gateways; chosen by the caller.
    pub request_id: u64,
    /// The clusterset service.
    pub service: ServiceKey,
    /// The service port the client dialed.
    pub port: u16,
    /// The cluster the caller says it is; must equal the cluster in its certificate.
    pub caller: ClusterName,
}

/// The serving gateway's one answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// A local endpoint accepted the connection; bytes flow from now on.
    Connected,
    /// The service is exported but no endpoint is available.
    NoEndpoints,
    /// The caller cluster is not allowed to call this export.
    Forbidden,
    /// Every endpoint tried refused or timed out.
    ConnectFailed,
    /// The gateway is draining and takes no new streams.
    Draining,
    /// The header was malformed or inconsistent with the caller's certificate.
    BadRequest,
    /// This gateway does not export the service or port.
    UnknownService,
}

impl Status {
    /// Every status, for tests and metric label enumeration.
    pub const ALL: [Status; 7] = [
        Status::Connected,
        Status::NoEndpoints,
        Status::Forbidden,
        Status::ConnectFailed,
        Status::Draining,
        Status::BadRequest,
        Status::UnknownService,
    ];

    /// Wire code. Codes are never reused for another meaning.
    pub fn code(self) -> u8 {
        match self {
            Status::Connected => 0,
            Status::NoEndpoints => 1,
            Status::Forbidden => 2,
            Status::ConnectFailed => 3,
            Status::Draining => 4,
            Status::BadRequest => 5,
            Status::UnknownService => 6,
        }
    }

    /// Parses a wire code.
    pub fn from_code(code: u8) -> Result<Self, DecodeError> {
        Status::ALL
            .into_iter()
            .find(|s| s.code() == code)
            .ok_or(DecodeError::UnknownStatus(code))
    }

    /// Whether the caller may try another target after this answer (no byte was forwarded
    /// yet whatever the answer, but some answers say every other gateway would refuse too).
    pub fn retry_elsewhere(self) -> bool {
        !matches!(self, Status::Connected | Status::BadRequest)
    }

    /// A short, stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connected => "connected",
            Status::NoEndpoints => "no_endpoints",
            Status::Forbidden => "forbidden",
            Status::ConnectFailed => "connect_failed",
            Status::Draining => "draining",
            Status::BadRequest => "bad_request",
            Status::UnknownService => "unknown_service",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes a header. Names are validated labels (≤ 63 bytes), so the result always fits
/// [`MAX_HEADER_LEN`].
pub fn encode_header(header: &RequestHeader) -> Vec<u8> {
    let ns = header.service.namespace.as_str().as_bytes();
    let name = header.service.name.as_str().as_bytes();
    let caller = header.caller.as_str().as_bytes();
    let body_len = 8 + 2 + 3 + ns.len() + name.len() + caller.len();
    let mut out = Vec::with_capacity(PREFIX_LEN + body_len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    // Labels are at most 63 bytes each, so body_len ≤ 202 and fits u16 (and MAX_BODY_LEN).
    out.extend_from_slice(&(body_len as u16).to_be_bytes());
    out.extend_from_slice(&header.request_id.to_be_bytes());
    out.extend_from_slice(&header.port.to_be_bytes());
    for part in [ns, name, caller] {
        out.push(part.len() as u8);
        out.extend_from_slice(part);
    }
    out
}

/// Decodes a header from the front of `buf`. Returns the header and the number of bytes it
/// took; bytes after it belong to the payload.
pub fn decode_header(buf: &[u8]) -> Result<(RequestHeader, usize), DecodeError> {
    // Check what we have of the magic early, so garbage is rejected before more is read.
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() < PREFIX_LEN {
        if let Some(&v) = buf.get(4)
            && v != VERSION
        {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        return Err(DecodeError::Incomplete { needed: PREFIX_LEN });
    }
    if buf[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[4]));
    }
    let body_len = usize::from(u16::from_be_bytes([buf[5], buf[6]]));
    if body_len > MAX_BODY_LEN {
        return Err(DecodeError::TooLong(body_len));
    }
    let total = PREFIX_LEN + body_len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let mut body = Reader(&buf[PREFIX_LEN..total]);
    let request_id = u64::from_be_bytes(body.array()?);
    let port = u16::from_be_bytes(body.array()?);
    if port == 0 {
        return Err(DecodeError::Malformed("port 0"));
    }
    let namespace = Namespace::new(body.label()?)?;
    let name = ServiceName::new(body.label()?)?;
    let caller = ClusterName::new(body.label()?)?;
    if !body.0.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes in body"));
    }
    let header = RequestHeader {
        request_id,
        service: ServiceKey::new(namespace, name),
        port,
        caller,
    };
    Ok((header, total))
}

/// Encodes a status answer.
pub fn encode_status(status: Status) -> [u8; STATUS_LEN] {
    [VERSION, status.code()]
}

/// Decodes a status answer from the front of `buf`.
pub fn decode_status(buf: &[u8]) -> Result<Status, DecodeError> {
    if let Some(&v) = buf.first()
        && v != VERSION
    {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    match buf.get(1) {
        Some(&code) => Status::from_code(code),
        None => Err(DecodeError::Incomplete { needed: STATUS_LEN }),
    }
}

/// A cursor over a fully received, length-bounded body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Malformed("body shorter than its fields"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn label(&mut self) -> Result<&'a str, DecodeError> {
        let [len] = self.array::<1>()?;
        let len = usize::from(len);
        if self.0.len() < len {
            return Err(DecodeError::Malformed("name longer than the body"));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(head).map_err(|_| DecodeError::Malformed("name is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RequestHeader {
        RequestHeader {
            request_id: 0x0102_0304_0506_0708,
            service: ServiceKey::parse("prod", "pay").expect("valid"),
            port: 8080,
            caller: ClusterName::new("east").expect("valid"),
        }
    }

    #[test]
    fn header_round_trips_and_reports_its_length() {
        let h = sample();
        let mut bytes = encode_header(&h);
        let len = bytes.len();
        bytes.extend_from_slice(b"payload");
        let (back, used) = decode_header(&bytes).expect("decodes");
        assert_eq!(back, h);
        assert_eq!(used, len);
        assert_eq!(&bytes[used..], b"payload");
    }

    #[test]
    fn longest_names_fit_the_limit() {
        let long = "a".repeat(63);
        let h = RequestHeader {
            request_id: u64::MAX,
            service: ServiceKey::parse(&long, &format!("b{}", "c".repeat(62)))
                .expect("63-char labels are valid"),
            port: u16::MAX,
            caller: ClusterName::new(&long).expect("valid"),
        };
        let bytes = encode_header(&h);
        assert!(bytes.len() <= MAX_HEADER_LEN);
        assert_eq!(decode_header(&bytes).expect("decodes").0, h);
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let bytes = encode_header(&sample());
        for n in 0..bytes.len() {
            let err = decode_header(&bytes[..n]).expect_err("prefix");
            assert!(err.is_incomplete(), "prefix {n}: {err}");
        }
    }

    #[test]
    fn invalid_headers_are_rejected_with_the_right_error() {
        let good = encode_header(&sample());
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            b
        };
        assert_eq!(decode_header(b"GET / HTTP/1.1"), Err(DecodeError::BadMagic));
        assert_eq!(decode_header(b"MX"), Err(DecodeError::BadMagic));
        assert_eq!(
            decode_header(&with(4, 2)),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            decode_header(b"MSHP\x07"),
            Err(DecodeError::UnsupportedVersion(7))
        );
        // Body length beyond the limit is rejected before waiting for the body.
        assert_eq!(
            decode_header(b"MSHP\x01\xff\xff"),
            Err(DecodeError::TooLong(0xffff))
        );
        // Port 0.
        let mut b = good.clone();
        b[15] = 0;
        b[16] = 0;
        assert_eq!(decode_header(&b), Err(DecodeError::Malformed("port 0")));
        // Upper-case namespace fails name validation.
        let mut b = good.clone();
        b[18] = b'P';
        assert!(matches!(decode_header(&b), Err(DecodeError::BadName(_))));
        // Body length one larger than the fields: trailing byte inside the body.
        let mut b = good.clone();
        let body = u16::from_be_bytes([b[5], b[6]]) + 1;
        b[5..7].copy_from_slice(&body.to_be_bytes());
        b.push(0);
        assert_eq!(
            decode_header(&b),
            Err(DecodeError::Malformed("trailing bytes in body"))
        );
        // Label length pointing past the body.
        let mut b = good.clone();
        b[17] = 200;
        assert!(matches!(decode_header(&b), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn status_round_trips_and_rejects_unknown_codes() {
        for s in Status::ALL {
            assert_eq!(decode_status(&encode_status(s)), Ok(s));
        }
        assert_eq!(
            decode_status(&[]),
            Err(DecodeError::Incomplete { needed: 2 })
        );
        assert_eq!(
            decode_status(&[VERSION]),
            Err(DecodeError::Incomplete { needed: 2 })
        );
        assert_eq!(
            decode_status(&[9, 0]),
            Err(DecodeError::UnsupportedVersion(9))
        );
        assert_eq!(
            decode_status(&[VERSION, 200]),
            Err(DecodeError::UnknownStatus(200))
        );
        assert!(!Status::Connected.retry_elsewhere());
        assert!(Status::Draining.retry_elsewhere());
    }

    /// Stable stand-in for the cargo-fuzz target (`fuzz/tunnel`), so every `cargo test` run
    /// pushes a few hundred thousand mutated inputs through both decoders: no panic, and every
    /// accepted header re-encodes to exactly the bytes it was decoded from.
    #[test]
    fn mutated_inputs_never_panic_and_accepted_ones_round_trip() {
        let seed = encode_header(&sample());
        // xorshift: deterministic, dependency-free.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut accepted = 0usize;
        for _ in 0..300_000 {
            let mut input = seed.clone();
            let edits = 1 + next() % 4;
            for _ in 0..edits {
                let r = next();
                let at = (r >> 8) as usize % (input.len() + 1);
                match r % 4 {
                    0 if at < input.len() => input[at] = (r >> 32) as u8,
                    1 => input.insert(at, (r >> 40) as u8),
                    2 if at < input.len() => {
                        input.remove(at);
                    }
                    _ => input.truncate(at),
                }
            }
            check_one(&input, &mut accepted);
        }
        assert!(accepted > 0, "mutation never produced a valid header");
    }

    fn check_one(input: &[u8], accepted: &mut usize) {
        let _ = decode_status(input);
        if let Ok((h, used)) = decode_header(input) {
            assert!(used <= input.len() && used <= MAX_HEADER_LEN);
            assert_eq!(encode_header(&h), input[..used]);
            *accepted += 1;
        }
    }
}
