//! Fuzzes the tunnel header and status decoders with arbitrary bytes from a peer.
//!
//! Run: `cargo +nightly fuzz run --fuzz-dir fuzz/tunnel tunnel_header`
//! Properties: no panic; an accepted header is within the length bound and re-encodes to
//! exactly the bytes it was decoded from (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshup_core::tunnel::{MAX_HEADER_LEN, decode_header, decode_status, encode_header};

fuzz_target!(|data: &[u8]| {
    let _ = decode_status(data);
    if let Ok((header, used)) = decode_header(data) {
        assert!(used <= data.len() && used <= MAX_HEADER_LEN);
        assert_eq!(encode_header(&header), data[..used]);
    }
});
