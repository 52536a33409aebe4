//! Fuzzes the route record decoder and compiler (core/src/routes.rs) with arbitrary bytes from
//! the catalog store, and matches a request derived from the same bytes.
//!
//! Run: `cargo +nightly fuzz run --fuzz-dir fuzz/tunnel route_record`
//! Properties: no panic; a record that compiles matches any request without panicking, its
//! weighted order lists every destination exactly once, and it re-encodes to a record that
//! compiles to the same rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshup_core::routes::{RequestView, decode};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = decode(data) else { return };
    let Ok(routes) = record.compile() else { return };
    // A request made of the input's own text: paths, queries and header values the patterns
    // were written against.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let path = parts.next().unwrap_or("/");
    let query = parts.next();
    let value = parts.next().unwrap_or("");
    let header = |_: &str| vec![value];
    let view = RequestView {
        method: "GET",
        path,
        query,
        header: &header,
    };
    let _ = routes.matching(&view);
    for rule in &routes.rules {
        let draw = data.len() as u64 * 0x9e37_79b9;
        let order = rule.order(draw);
        assert_eq!(order.len(), rule.destinations.len().max(1));
    }
    let again = serde_json::to_vec(&routes.record).expect("encode");
    let back = decode(&again).expect("re-decodes").compile().expect("re-compiles");
    assert_eq!(back.record, routes.record);
});
