//! A flood of corrupt records mixed into a large catalog costs a watcher memory for the good
//! records only: the list is reduced page by page as it arrives (never held whole), and a
//! skipped record leaves nothing behind. Measured with a counting allocator, on a real etcd
//! (whose client decodes every page into fresh buffers).
//!
//! One test per binary: the allocator counts the whole process.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use meshup_core::catalog::ExportKey;
use meshup_core::model::{AddressRules, encode};
use meshup_federation::keys::KeyLayout;
use meshup_federation::store::{LIST_PAGE_BYTES, Store, Txn, TxnOp};
use meshup_federation::watcher::{self, Watcher};
use tokio_util::sync::CancellationToken;

/// Counts the bytes allocated now and the most allocated at once since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// A global allocator is an `unsafe` trait: this one forwards every call to the system
// allocator unchanged and only keeps counters.
#[allow(unsafe_code)]
// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
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
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts a new measurement: returns the bytes live now, the base of both figures.
fn measure_from_here() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

const GOOD: usize = 2_000;
const CORRUPT: usize = 16_000;
const CORRUPT_BYTES: usize = 4 * 1024;

/// Writes `GOOD` valid exports under `layout`, and with `flood` `CORRUPT` undecodable ones of
/// `CORRUPT_BYTES` each, interleaved with them in key order.
async fn fill(store: &dyn Store, layout: &KeyLayout, flood: bool) {
    let key = |c: &str, s: usize| {
        layout.export(&ExportKey {
            cluster: cluster(c),
            gateway: gateway_id("gw-0"),
            service: service(&format!("svc-{s:05}.prod")),
        })
    };
    let good = encode(&export(8080, 1));
    let junk = vec![b'{'; CORRUPT_BYTES];
    let mut puts: Vec<TxnOp> = (0..GOOD)
        .map(|s| TxnOp::Put {
            key: key("east", s).into(),
            value: good.clone().into(),
            lease: 0,
        })
        .collect();
    if flood {
        // Clusters `a..` and `z..` sort before and after the good one: junk on both sides.
        puts.extend((0..CORRUPT).map(|s| TxnOp::Put {
            key: key(if s % 2 == 0 { "aaa" } else { "zzz" }, s).into(),
            value: junk.clone().into(),
            lease: 0,
        }));
    }
    for batch in puts.chunks(64) {
        store
            .txn(Txn {
                compares: vec![],
                success: batch.to_vec(),
                failure: vec![],
            })
            .await
            .expect("write records");
    }
}

/// A watcher of `layout`'s catalog, synced with every good record: the bytes it holds when
/// synced, and the most it held at once while syncing, both over `measure_from_here`.
async fn sync(
    store: Arc<dyn Store>,
    layout: KeyLayout,
    cancel: &CancellationToken,
) -> (Watcher, watcher::Metrics, usize, usize) {
    let metrics = watcher::Metrics::default();
    let base = measure_from_here();
    let w = Watcher::spawn(
        store,
        layout,
        AddressRules::default(),
        watcher_config(),
        metrics.clone(),
        cancel.child_token(),
    );
    assert!(w.wait_synced().await, "watcher synced");
    let mut snapshots = w.snapshots();
    let synced = snapshots
        .wait_for(|s| s.export_count() == GOOD)
        .await
        .is_ok();
    assert!(synced, "every good export in the snapshot");
    let held = LIVE.load(Ordering::Relaxed).saturating_sub(base);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (w, metrics, held, peak)
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_corrupt_records_costs_memory_for_the_good_ones_only() {
    within(Duration::from_secs(120), async {
        let f = Fixture::etcd().await;
        let store = f.store();
        let (clean, flooded) = (
            KeyLayout::new("/clean").expect("prefix"),
            KeyLayout::new("/flooded").expect("prefix"),
        );
        fill(store.as_ref(), &clean, false).await;
        fill(store.as_ref(), &flooded, true).await;
        let cancel = CancellationToken::new();

        let (_clean, _, clean_held, clean_peak) = sync(store.clone(), clean, &cancel).await;
        let (_flooded, metrics, flooded_held, flooded_peak) =
            sync(store.clone(), flooded, &cancel).await;
        let skipped: u64 = meshup_federation::reducer::SkipReason::ALL
            .iter()
            .map(|r| metrics.skipped(*r))
            .sum();
        assert_eq!(skipped, CORRUPT as u64, "every corrupt record skipped");

        let flood_bytes = CORRUPT * CORRUPT_BYTES;
        eprintln!(
            "clean: held {clean_held} B, peak {clean_peak} B; with {flood_bytes} B of junk: held {flooded_held} B, peak {flooded_peak} B"
        );
        // What the synced watcher keeps: the good records' worth, give or take a few
        // buffers; none of it grows with the junk.
        assert!(
            flooded_held <= clean_held + clean_held / 4 + 256 * 1024,
            "the synced watcher holds {flooded_held} B with the junk, {clean_held} B without"
        );
        // While syncing: a few pages' worth of junk at most (the gRPC message being
        // received, the page decoded from it, growing buffers), never the whole list, which
        // is 8 of the largest pages. (Reduced only once whole, it peaked at 70 MB over.)
        assert!(
            flooded_peak <= clean_peak + 4 * LIST_PAGE_BYTES,
            "syncing with {flood_bytes} B of junk peaked at {flooded_peak} B ({clean_peak} B without)"
        );
        cancel.cancel();
    })
    .await;
}
