//! What a catalog snapshot holds per export record, measured with a counting allocator:
//! 100 clusters each exporting the same 1,000 services (100,000 records), every record decoded
//! from its own bytes as the watcher does, applied through a `Batch`. The figure guards the
//! compact representation (docs/scale.md, "Memory per record"): a change that gives each
//! record its own copy of what records share again fails here.
//!
//! One test per binary: the allocator counts the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshup_core::catalog::{Batch, Change, ExportKey, Snapshot};
use meshup_core::fixture::{cluster, export, gateway, gateway_id};
use meshup_core::model::{ExportRecord, decode, encode};
use meshup_core::names::ServiceKey;

/// Counts the bytes allocated now.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// A global allocator is an `unsafe` trait: this one forwards every call to the system
// allocator unchanged and only keeps a counter.
#[allow(unsafe_code)]
// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CLUSTERS: usize = 100;
const SERVICES: usize = 1_000;
/// Bytes the snapshot may hold per export record: 220 measured (2026-12-03); 275 while the
/// views' cluster maps grew by inserts (half-empty nodes), 291 while each record held an
/// empty label map inline, 342 while each held a port list of its own, 438 while a decoded
/// record's port list kept serde's spare room for three more ports.
const MAX_BYTES_PER_RECORD: usize = 235;

fn cluster_name(c: usize) -> String {
    format!("c{c:03}")
}

#[test]
fn a_snapshot_holds_at_most_its_budget_per_export_record() {
    // Two encodings, so records are not all the same bytes.
    let values = [encode(&export(8080, 3)), encode(&export(8080, 2))];
    let before = LIVE.load(Ordering::Relaxed);
    let mut batch = Batch::new(Snapshot::new());
    for c in 0..CLUSTERS {
        batch.apply(Change::PutGateway(Arc::new(gateway(
            &cluster_name(c),
            "gw-0",
        ))));
    }
    for c in 0..CLUSTERS {
        for s in 0..SERVICES {
            // Fresh names and a freshly decoded record per key, as the reducer makes them.
            let key = ExportKey {
                cluster: cluster(&cluster_name(c)),
                gateway: gateway_id("gw-0"),
                service: ServiceKey::parse("bench", &format!("svc-{s:06}")).expect("service"),
            };
            let record: ExportRecord = decode(&values[(c + s) % 2]).expect("record");
            batch.apply(Change::PutExport(key, Arc::new(record)));
        }
    }
    batch.set_revision(1);
    let snapshot = batch.finish();
    let held = LIVE.load(Ordering::Relaxed) - before;
    let records = CLUSTERS * SERVICES;
    assert_eq!(snapshot.export_count(), records);
    let per_record = held / records;
    println!("snapshot of {records} export records: {held} bytes, {per_record} B/record");
    assert!(
        per_record <= MAX_BYTES_PER_RECORD,
        "{per_record} B/record, more than {MAX_BYTES_PER_RECORD}"
    );
    drop(snapshot);
}
