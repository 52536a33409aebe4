//! Bytes in → both answer paths of meshup's DNS server: no panic, no answer to a response,
//! answers within the client's UDP size. See `meshup_dns::fuzzing`.
//!
//!     cargo +nightly fuzz run --fuzz-dir fuzz/dns query_path
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use meshup_dns::fuzzing::QueryHarness;

thread_local! {
    static HARNESS: RefCell<QueryHarness> = RefCell::new(QueryHarness::new());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| h.borrow_mut().check(data));
});
