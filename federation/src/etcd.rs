//! The etcd implementation of the store seam (etcd-client 0.21).
//!
//! - The channel has HTTP/2 keep-alive (a dead TCP peer is noticed in seconds, not at the
//!   kernel's TCP timeout) and every request carries `require-leader`, so a member cut off
//!   from its cluster fails requests and watches instead of serving stale data silently.
//! - Every unary request has a deadline ([`EtcdOptions::request_timeout`]), enforced here with
//!   `tokio::time::timeout` so a hung server (SIGSTOP) cannot hang a caller.
//! - A request that provably never reached a member (its connection was refused) is sent
//!   again, at once and then after pauses of 10 ms doubling to 100 ms, for up to
//!   [`RESEND_FOR`] within its deadline. etcd-client balances requests over every endpoint
//!   and keeps choosing a dead member's endpoint (etcdv3/etcd-client#39): with one member of
//!   three down, about a third of the requests failed, and three failed lease keep-alives in
//!   a row (a 2 s TTL) lost the gateway's lease and dropped its records from every peer for
//!   a moment — failed connections at the peers (docs/reliability.md, "leader killed").
//!   Resending is safe for any request, writes included, because nothing was sent; each
//!   attempt is balanced again, so one of the 14 that fit in the second lands on a live
//!   member but for odds of about 1 in 5 million (a fixed count of five attempts was too
//!   few: with a third of them refused, a run of 90 requests lost one about 1 time in 3). This is gRPC's
//!   transparent retry (gRFC A6) bounded by time. Requests that change nothing or are
//!   harmless twice (reads, lease keep-alives, watch creation) are also sent again when
//!   the connection broke under them, e.g. a killed member's connection reset before the
//!   client noticed ([`Resend::Idempotent`]).
//! - Small requests that are harmless twice (status, revision, lease grants and keep-alives,
//!   transactions without a compare: the publisher's writes) and watch creations are also
//!   sent again [`HEDGE_AFTER`] after the last while none has answered, at most
//!   [`MAX_HEDGED`] at once ([`Resend::Hedged`]): a member that holds them (stopped, or just
//!   resumed and following a leader that is gone) costs half a second, not the whole
//!   request deadline, and the balancer sends the next to a member with fewer pending.
//! - Requests are balanced over the members by fewest requests pending
//!   (`etcd_balance.rs`); etcd-client's own balancer draws a member at random, so a
//!   copy of a held request went back to the member holding it a third of the time.
//! - Lists are paged by the caller ([`crate::store::list_prefix`]); the decoding limit is
//!   raised so one page of maximal records still fits.
//! - A watch runs in its own task that forwards responses into a bounded channel and sends
//!   progress requests; the task ends when the `Watch` is dropped.
//! - Bookmarks ([`WatchItem::Progress`]) come only from answers etcd orders with the watch's
//!   events: the periodic per-watch progress notifications (`progress_notify`, sent by etcd
//!   only to caught-up watchers, every `--experimental-watch-progress-notify-interval`,
//!   10 min by default), and answers to progress requests on etcd releases that send them
//!   through the event stream (see [`orders_requested_progress`]). Older releases send the
//!   requested answer on a side channel with the store's current revision, so it can
//!   overtake events still queued for the watch (etcd-io/etcd#15220); resuming from it could
//!   skip those events, so there it only proves liveness ([`WatchItem::Alive`]). On those
//!   releases, run etcd with `--experimental-watch-progress-notify-interval` well below the
//!   history the compaction keeps (e.g. `1m` when compacting every 5 min); otherwise a quiet
//!   catalog's watcher still relists after a broken watch, as before bookmarks.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    TlsOptions, Txn as EtcdTxn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use crate::store::{
    Compare, Event, EventKind, KeyRange, KeyValue, LeaseId, Page, Revision, Store, StoreError,
    StoreFuture, Txn, TxnOp, TxnResult, Watch, WatchItem,
};

/// Default deadline of one unary request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default HTTP/2 keep-alive interval and timeout on the etcd channel.
pub const DEFAULT_KEEP_ALIVE: (Duration, Duration) =
    (Duration::from_secs(2), Duration::from_secs(3));
/// Largest message accepted from etcd: a page of `LIST_PAGE_KEYS` maximal (64 KiB) records
/// plus keys, or a watch response carrying a large transaction.
const MAX_DECODING_MESSAGE_BYTES: usize = 96 * 1024 * 1024;
/// How long a request that did not reach a member is sent again (see the module docs).
pub const RESEND_FOR: Duration = Duration::from_secs(1);
/// The pause before the second resend; it doubles up to [`MAX_RESEND_PAUSE`].
const FIRST_RESEND_PAUSE: Duration = Duration::from_millis(10);
const MAX_RESEND_PAUSE: Duration = Duration::from_millis(100);
/// A hedged request (a watch's creation, [`Resend::Hedged`]) is sent again this long after
/// the last one while none has answered:
/// a member that holds requests without answering (stopped, or behind a connection that is
/// not yet known dead) then costs this much, not the whole request deadline, and the
/// balancer sends the next one to a member with fewer requests pending.
pub const HEDGE_AFTER: Duration = Duration::from_millis(500);
/// Copies of one hedged request in flight at most.
const MAX_HEDGED: usize = 3;
/// Watch responses buffered between the forwarding task and the watcher.
const WATCH_BUFFER: usize = 256;
/// etcd's watch id on answers to a progress request (they belong to the whole stream).
const STREAM_WATCH_ID: i64 = -1;

/// How to reach etcd.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Username and password, when etcd authentication is on.
    pub user: Option<(String, String)>,
    /// TLS (CA, and a client identity for mTLS), for `https://` endpoints.
    pub tls: Option<TlsOptions>,
    /// Deadline of one unary request (0: [`DEFAULT_REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password never reaches a log line.
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A store backed by an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    request_timeout: Duration,
    endpoints: Vec<String>,
    /// Whether the server orders requested progress answers with events; learnt from its
    /// version on the first watch that could ask (shared by clones).
    ordered_progress: Arc<OnceLock<bool>>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to etcd. Does not wait for etcd to be up unless authentication is on (the
    /// token is fetched at connect); requests fail with a retryable error meanwhile.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::Config("no etcd endpoints configured".into()));
        }
        let request_timeout = if options.request_timeout.is_zero() {
            DEFAULT_REQUEST_TIMEOUT
        } else {
            options.request_timeout
        };
        let mut connect = ConnectOptions::new()
            .with_keep_alive(DEFAULT_KEEP_ALIVE.0, DEFAULT_KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(request_timeout)
            .with_require_leader(true);
        if let Some((user, password)) = &options.user {
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = options.tls.clone() {
            connect = connect.with_tls(tls);
        }
        let client = tokio::time::timeout(
            request_timeout,
            Client::connect_with_balanced_channel(
                &options.endpoints,
                Some(connect),
                crate::etcd_balance::LeastPending,
            ),
        )
        .await
        .map_err(|_| StoreError::Timeout(request_timeout))?
        .map_err(map_err)?;
        if options.tls.is_some() {
            // The client connects lazily. A certificate problem would otherwise surface only
            // as endless retries, so ask once now: a TLS rejection is a configuration error
            // worth failing start-up for; an unreachable etcd is not (the watcher waits).
            let mut maintenance = client.maintenance_client();
            if let Ok(Err(e)) = tokio::time::timeout(request_timeout, maintenance.status()).await
                && let Some(reason) = tls_rejection(&e)
            {
                return Err(StoreError::Config(format!(
                    "TLS to etcd at {:?} failed: {reason} (check catalog.tls: ca, cert, key)",
                    options.endpoints
                )));
            }
        }
        Ok(Self {
            client,
            request_timeout,
            endpoints: options.endpoints,
            ordered_progress: Arc::new(OnceLock::new()),
        })
    }

    /// Whether requested progress answers may serve as bookmarks, asking etcd for its
    /// version once. An unanswered status request counts as "no" (only bookmarks are lost,
    /// not correctness) and is asked again on the next watch.
    async fn requested_progress_is_ordered(&self) -> bool {
        if let Some(ordered) = self.ordered_progress.get() {
            return *ordered;
        }
        let maintenance = self.client.maintenance_client();
        match self
            .deadline(Resend::Hedged, || {
                let mut maintenance = maintenance.clone();
                async move { maintenance.status().await }
            })
            .await
        {
            Ok(status) => {
                let ordered = orders_requested_progress(status.version());
                tracing::debug!(
                    version = status.version(),
                    ordered,
                    "etcd version: requested progress answers {} bookmarks",
                    if ordered { "are" } else { "are not" }
                );
                *self.ordered_progress.get_or_init(|| ordered)
            }
            Err(e) => {
                tracing::debug!(error = %e, "etcd status unavailable; progress answers are not bookmarks");
                false
            }
        }
    }

    /// Runs `call` with the request deadline, sent again as [`resend`] allows for `kind`, and
    /// hedged ([`hedged`]) when `kind` is [`Resend::Hedged`].
    async fn deadline<T, Fut>(&self, kind: Resend, call: impl Fn() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempt = || resend(&call, |e| kind.allows(e));
        let answered = match kind {
            Resend::Unsent | Resend::Idempotent => {
                tokio::time::timeout(self.request_timeout, attempt()).await
            }
            Resend::Hedged => {
                tokio::time::timeout(
                    self.request_timeout,
                    hedged(attempt, HEDGE_AFTER, MAX_HEDGED),
                )
                .await
            }
        };
        answered
            .map_err(|_| StoreError::Timeout(self.request_timeout))?
            .map_err(map_err)
    }
}

/// Which failed requests may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    /// Only one that never reached a member ([`never_sent`]): safe for any request.
    Unsent,
    /// Also one whose connection broke under it ([`connection_failed`]): for requests that
    /// change nothing, or nothing more when applied twice.
    Idempotent,
    /// As [`Resend::Idempotent`], and also sent again while a member holds it unanswered
    /// ([`hedged`]): for small requests harmless twice. A member that holds requests (stopped,
    /// or resumed and still following a leader that is gone) then costs [`HEDGE_AFTER`], not
    /// the whole request deadline. Not for large reads, whose answer may take longer than
    /// that on its own.
    Hedged,
}

impl Resend {
    fn allows(self, e: &etcd_client::Error) -> bool {
        never_sent(e) || (self != Self::Unsent && (connection_failed(e) || no_leader(e)))
    }
}

/// Whether etcd answered that the member had no leader. Right after quorum returns, a member
/// that was stopped (or cut off) answers so for seconds while the others already take
/// writes; sent again, the request is balanced to a member that may answer. Only for requests
/// harmless twice ([`Resend::Idempotent`], [`Resend::Hedged`]): a member may have forwarded
/// a proposal before it lost its leader.
fn no_leader(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unavailable
            && status.message() == "etcdserver: no leader")
}

/// Runs `call`, again while it fails with an error `resendable` accepts: at once, then after
/// pauses of [`FIRST_RESEND_PAUSE`] doubling to [`MAX_RESEND_PAUSE`], as long as the next
/// attempt starts within [`RESEND_FOR`] of the first. Then the last error is returned.
async fn resend<T, E, Fut>(
    mut call: impl FnMut() -> Fut,
    resendable: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: fmt::Debug,
    Fut: Future<Output = Result<T, E>>,
{
    let give_up = tokio::time::Instant::now() + RESEND_FOR;
    let mut pause = Duration::ZERO;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if resendable(&e) && tokio::time::Instant::now() + pause <= give_up => {
                tracing::debug!(error = ?e, attempt, "etcd request failed in its connection; sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).clamp(FIRST_RESEND_PAUSE, MAX_RESEND_PAUSE);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Runs `call`, and again each `after` while no call has answered, with at most `max` in
/// flight: with `max` held, the oldest is given up (cancelled) for the fresh one, so copies
/// that members hold without ever answering (etcd drops a write a member took while it had
/// no leader, and answers nothing) do not stop new copies from going out once the members
/// can answer. The first success wins and the others are dropped (cancelled). An error ends
/// it only when no other call is pending. Only for requests that are harmless to send twice.
/// The caller bounds the whole with its deadline.
async fn hedged<T, E, Fut>(
    mut call: impl FnMut() -> Fut,
    after: Duration,
    max: usize,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    use futures::FutureExt;
    use futures::StreamExt;
    use futures::future::{AbortHandle, Abortable};
    let mut pending = futures::stream::FuturesUnordered::new();
    // The copies still held, oldest first: (its number, its abort handle).
    let mut held: std::collections::VecDeque<(usize, AbortHandle)> = Default::default();
    let mut send = |n: usize, pending: &mut futures::stream::FuturesUnordered<_>| {
        let (handle, registration) = AbortHandle::new_pair();
        pending.push(Abortable::new(call(), registration).map(move |r| (n, r)));
        (n, handle)
    };
    held.push_back(send(0, &mut pending));
    let mut sent = 1;
    let mut next = tokio::time::Instant::now() + after;
    loop {
        tokio::select! {
            Some((n, result)) = pending.next() => match result {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => {
                    held.retain(|(k, _)| *k != n);
                    if held.is_empty() {
                        return Err(e);
                    }
                }
                // Given up for a fresh copy.
                Err(_aborted) => {}
            },
            () = tokio::time::sleep_until(next) => {
                tracing::debug!(in_flight = held.len(), "etcd has not answered; sending the request again");
                if held.len() >= max
                    && let Some((_, oldest)) = held.pop_front()
                {
                    oldest.abort();
                }
                held.push_back(send(sent, &mut pending));
                sent += 1;
                next += after;
            }
        }
    }
}

/// Whether a request failed before it reached any member: the connection to the member it
/// was balanced to was refused (nothing listens there). Only then is resending it safe
/// whatever it was: a timeout or a reset may come after etcd applied it.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                // The connector's own words when its TCP connect failed.
                && (status.message().starts_with("tcp connect error") || refused_in(status))
        }
        etcd_client::Error::TransportError(e) => refused_in(e),
        etcd_client::Error::IoError(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

/// Whether a request failed in its connection rather than in etcd: a refused or broken
/// connection, or a transport error (the gRPC status carries no `etcdserver:` message then).
/// Such a request may or may not have been applied.
fn connection_failed(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ) && [
                "transport error",
                "tcp connect error",
                "error trying to connect",
                // hyper's words for a request its connection closed under.
                "operation was canceled",
                // The HTTP/2 connection failed under it: a keep-alive ping unanswered (a
                // stopped member), a GOAWAY or a reset connection.
                "http2 error",
            ]
            .iter()
            .any(|prefix| status.message().starts_with(prefix))
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Whether a refused connection is anywhere in `e`'s source chain.
fn refused_in(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// Maps etcd-client errors onto the seam's error kinds by gRPC code and etcd's messages.
/// The TLS error behind a failed request, if the failure was a TLS handshake: the rustls
/// error anywhere in the source chain (tokio-rustls wraps it in an `io::Error`; etcd-client
/// keeps the transport error inside the gRPC status).
fn tls_rejection(e: &etcd_client::Error) -> Option<String> {
    let start: &(dyn std::error::Error + 'static) = match e {
        etcd_client::Error::GRpcStatus(status) => status,
        other => other,
    };
    let mut current = Some(start);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        current = err.source();
    }
    None
}

fn map_err(e: etcd_client::Error) -> StoreError {
    use tonic::Code;
    // The keep-alive path reports a missing lease as a plain error string.
    if let etcd_client::Error::LeaseKeepAliveError(msg) = &e
        && msg.contains("lease not found")
    {
        return StoreError::LeaseNotFound(0);
    }
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message().to_owned();
            match status.code() {
                _ if msg.contains("lease not found") => StoreError::LeaseNotFound(0),
                _ if msg.contains("compacted") => StoreError::Compacted {
                    requested: 0,
                    compacted: 0,
                },
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::Aborted => StoreError::Unavailable(format!("{:?}: {msg}", status.code())),
                code => StoreError::Rejected(format!("{code:?}: {msg}")),
            }
        }
        etcd_client::Error::InvalidArgs(m) => StoreError::Config(m),
        etcd_client::Error::InvalidUri(e) => StoreError::Config(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: Bytes::copy_from_slice(kv.key()),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

/// Like [`to_kv`], taking the key's and value's buffers instead of copying them.
fn into_kv(kv: etcd_client::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, lease) =
        (kv.create_revision(), kv.mod_revision(), kv.lease());
    let (key, value) = kv.into_key_value();
    KeyValue {
        key: Bytes::from(key),
        value: Bytes::from(value),
        create_revision,
        mod_revision,
        lease,
    }
}

fn to_op(op: TxnOp) -> EtcdTxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            EtcdTxnOp::put(key.to_vec(), value.to_vec(), options)
        }
        TxnOp::Delete { key } => EtcdTxnOp::delete(key.to_vec(), None),
        TxnOp::Get { key } => EtcdTxnOp::get(key.to_vec(), None),
    }
}

/// Whether an etcd server of this version sends answers to progress requests through the
/// watch's event stream, after every event they cover (etcd-io/etcd#15237, with the
/// follow-up etcd-io/etcd#17557 for watches that never see an event). The thresholds are
/// conservative: releases made well after both fixes were backported. Pure.
pub fn orders_requested_progress(version: &str) -> bool {
    let mut parts = version
        .trim()
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    match (major, minor) {
        (3, 4) => patch >= 34,
        (3, 5) => patch >= 16,
        (3, m) => m >= 6,
        (m, _) => m > 3,
    }
}

/// Converts one watch response into seam items. `ordered_requests`: whether answers to
/// progress requests are bookmarks on this server ([`orders_requested_progress`]).
fn convert(
    resp: &etcd_client::WatchResponse,
    ordered_requests: bool,
) -> Result<Option<WatchItem>, StoreError> {
    if resp.canceled() {
        if resp.compact_revision() > 0 {
            return Ok(Some(WatchItem::Compacted {
                compact_revision: resp.compact_revision(),
            }));
        }
        return Err(StoreError::Unavailable(format!(
            "etcd cancelled the watch: {}",
            resp.cancel_reason()
        )));
    }
    let events = resp.events();
    if events.is_empty() {
        // The creation acknowledgement carries the store's revision while the history from
        // the start revision may still be replaying: resuming from it could skip events.
        if resp.created() {
            return Ok(Some(WatchItem::Alive));
        }
        let Some(revision) = resp.header().map(|h| h.revision()).filter(|r| *r > 0) else {
            return Ok(Some(WatchItem::Alive));
        };
        // A response for this watch's own id without events is a periodic progress
        // notification, which etcd queues behind the watch's events; a stream-wide one
        // answers a progress request and is ordered only on fixed releases.
        if resp.watch_id() == STREAM_WATCH_ID && !ordered_requests {
            return Ok(Some(WatchItem::Alive));
        }
        return Ok(Some(WatchItem::Progress { revision }));
    }
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let kind = match event.event_type() {
            EventType::Put => EventKind::Put,
            EventType::Delete => EventKind::Delete,
        };
        out.push(Event {
            kind,
            kv: to_kv(kv),
        });
    }
    Ok(Some(WatchItem::Events(out)))
}

impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn revision(&self) -> StoreFuture<'_, Revision> {
        Box::pin(async move {
            let kv = self.client.kv_client();
            // A keys-only, count-only read of one key is the cheapest way to get the header.
            let resp = self
                .deadline(Resend::Hedged, || {
                    let mut kv = kv.clone();
                    async move {
                        kv.get("\0", Some(GetOptions::new().with_count_only()))
                            .await
                    }
                })
                .await?;
            Ok(resp.header().map_or(0, |h| h.revision()))
        })
    }

    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page> {
        Box::pin(async move {
            let kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
            let mut options =
                GetOptions::new().with_limit(i64::try_from(limit.max(1)).unwrap_or(i64::MAX));
            options = if range.end.is_empty() {
                options.with_from_key()
            } else {
                options.with_range(range.end.to_vec())
            };
            if let Some(rev) = revision {
                options = options.with_revision(rev);
            }
            let resp = self
                .deadline(Resend::Idempotent, || {
                    let (mut kv, options) = (kv.clone(), options.clone());
                    let start = range.start.to_vec();
                    async move { kv.get(start, Some(options)).await }
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } => StoreError::Compacted {
                        requested: revision.unwrap_or(0),
                        compacted: 0,
                    },
                    other => other,
                })?;
            let mut resp = resp;
            Ok(Page {
                // Taken, not copied: a list page can be megabytes.
                kvs: resp.take_kvs().into_iter().map(into_kv).collect(),
                more: resp.more(),
                // The header carries the store's current revision; the page was read at the
                // pinned one.
                revision: revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision())),
            })
        })
    }

    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch> {
        Box::pin(async move {
            let client = self
                .client
                .watch_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
            let ordered_requests = self.requested_progress_is_ordered().await;
            // `progress_notify`: etcd's periodic bookmarks for a quiet watch (see the module
            // docs); they work on every release.
            let mut options = WatchOptions::new()
                .with_start_revision(start_revision.max(1))
                .with_progress_notify();
            options = if range.end.is_empty() {
                options.with_from_key()
            } else {
                options.with_range(range.end.to_vec())
            };
            // Creating a watch changes nothing in etcd, so it is safe to send twice.
            let stream = self
                .deadline(Resend::Hedged, || {
                    let (mut client, options) = (client.clone(), options.clone());
                    let start = range.start.to_vec();
                    async move { client.watch(start, Some(options)).await }
                })
                .await?;
            let (mut requests, mut responses) = stream.split();
            let (tx, rx) = mpsc::channel(WATCH_BUFFER);
            let (progress_tx, mut progress_rx) = mpsc::channel::<()>(1);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = responses.message() => {
                            let item = match msg {
                                Ok(Some(resp)) => match convert(&resp, ordered_requests) {
                                    Ok(Some(item)) => Ok(item),
                                    Ok(None) => continue,
                                    Err(e) => Err(e),
                                },
                                // The server closed the stream: end ours so the caller resumes.
                                Ok(None) => break,
                                Err(e) => Err(map_err(e)),
                            };
                            let last = !matches!(
                                item,
                                Ok(WatchItem::Events(_) | WatchItem::Progress { .. } | WatchItem::Alive)
                            );
                            if tx.send(item).await.is_err() || last {
                                break;
                            }
                        }
                        Some(()) = progress_rx.recv() => {
                            if let Err(e) = requests.request_progress().await {
                                let _ = tx.send(Err(map_err(e))).await;
                                break;
                            }
                        }
                        () = tx.closed() => break,
                    }
                }
                // Dropping `requests` closes the request stream and cancels the watch on etcd.
            });
            let progress = Box::new(move || {
                let _ = progress_tx.try_send(());
            });
            Ok(Watch::new(rx, progress))
        })
    }

    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        Box::pin(async move {
            let lease = self.client.lease_client();
            let secs = i64::try_from(ttl.as_secs_f64().ceil() as u64)
                .unwrap_or(i64::MAX)
                .max(1);
            // Granted twice, the spare lease holds no key and expires after its TTL.
            let resp = self
                .deadline(Resend::Hedged, || {
                    let mut lease = lease.clone();
                    async move { lease.grant(secs, None).await }
                })
                .await?;
            Ok(resp.id())
        })
    }

    fn keep_alive(&self, id: LeaseId) -> StoreFuture<'_, Duration> {
        Box::pin(async move {
            let lease = self.client.lease_client();
            let result = self
                .deadline(Resend::Hedged, || {
                    let mut lease = lease.clone();
                    async move {
                        let (mut keeper, mut stream) = lease.keep_alive(id).await?;
                        keeper.keep_alive().await?;
                        stream.message().await
                    }
                })
                .await;
            match result {
                Ok(Some(resp)) if resp.ttl() > 0 => {
                    Ok(Duration::from_secs(resp.ttl().unsigned_abs()))
                }
                // TTL 0: etcd's answer for a lease that does not exist (any more).
                Ok(Some(_)) => Err(StoreError::LeaseNotFound(id)),
                Ok(None) => Err(StoreError::Unavailable("keep-alive stream closed".into())),
                Err(StoreError::LeaseNotFound(_)) => Err(StoreError::LeaseNotFound(id)),
                Err(e) => Err(e),
            }
        })
    }

    fn revoke_lease(&self, id: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let lease = self.client.lease_client();
            let revoked = self
                .deadline(Resend::Unsent, || {
                    let mut lease = lease.clone();
                    async move { lease.revoke(id).await }
                })
                .await;
            match revoked {
                Ok(_) => Ok(()),
                Err(StoreError::LeaseNotFound(_)) => Err(StoreError::LeaseNotFound(id)),
                Err(e) => Err(e),
            }
        })
    }

    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult> {
        Box::pin(async move {
            let lease_of_put = txn
                .success
                .iter()
                .chain(&txn.failure)
                .find_map(|op| match op {
                    TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
                    _ => None,
                });
            // Without a compare, a transaction applied twice leaves what it left once (the
            // publisher's puts and deletes); with one, the second would answer "failed".
            let kind = if txn.compares.is_empty() {
                Resend::Hedged
            } else {
                Resend::Unsent
            };
            let compares: Vec<EtcdCompare> = txn
                .compares
                .into_iter()
                .map(|c| match c {
                    Compare::Absent(key) => {
                        EtcdCompare::create_revision(key.to_vec(), CompareOp::Equal, 0)
                    }
                    Compare::ModRevision(key, rev) => {
                        EtcdCompare::mod_revision(key.to_vec(), CompareOp::Equal, rev)
                    }
                })
                .collect();
            let request = EtcdTxn::new()
                .when(compares)
                .and_then(txn.success.into_iter().map(to_op).collect::<Vec<_>>())
                .or_else(txn.failure.into_iter().map(to_op).collect::<Vec<_>>());
            let kv = self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES);
            let sent = self
                .deadline(kind, || {
                    let (mut kv, request) = (kv.clone(), request.clone());
                    async move { kv.txn(request).await }
                })
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(StoreError::LeaseNotFound(_)) => {
                    return Err(StoreError::LeaseNotFound(lease_of_put.unwrap_or(0)));
                }
                Err(e) => return Err(e),
            };
            let gets = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(get) => Some(get.kvs().first().map(to_kv)),
                    _ => None,
                })
                .collect();
            Ok(TxnResult {
                succeeded: resp.succeeded(),
                revision: resp.header().map_or(0, |h| h.revision()),
                gets,
            })
        })
    }

    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let kv = self.client.kv_client();
            self.deadline(Resend::Unsent, || {
                let mut kv = kv.clone();
                async move { kv.compact(revision, None).await }
            })
            .await
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One call of a hedged request: answers `Ok(n)` or `Err(n)` after `delay`, or never.
    fn call_with(
        plan: &'static [(Option<u64>, bool)],
        calls: &std::cell::Cell<usize>,
    ) -> impl Future<Output = Result<usize, usize>> + use<> {
        let n = calls.get();
        calls.set(n + 1);
        let (delay, ok) = plan.get(n).copied().unwrap_or((None, false));
        async move {
            match delay {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => std::future::pending::<()>().await,
            }
            if ok { Ok(n) } else { Err(n) }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedged_request_is_sent_again_while_unanswered_and_the_first_answer_wins() {
        // (per call: answer after ms or never, success), the result, calls made, time taken.
        type Plan = &'static [(Option<u64>, bool)];
        type Case = (&'static str, Plan, Result<usize, usize>, usize, u64);
        let cases: [Case; 7] = [
            ("answered at once", &[(Some(0), true)], Ok(0), 1, 0),
            (
                "refused at once: nothing else pending",
                &[(Some(0), false)],
                Err(0),
                1,
                0,
            ),
            (
                "a hung member, then an answer",
                &[(None, true), (Some(10), true)],
                Ok(1),
                2,
                510,
            ),
            (
                "the first answers before the second",
                &[(Some(700), true), (Some(900), true)],
                Ok(0),
                2,
                700,
            ),
            (
                "an error while another is pending waits for it",
                &[(Some(600), true), (Some(0), false)],
                Ok(0),
                2,
                600,
            ),
            (
                "at most three in flight: the oldest is given up for a fresh copy",
                &[(None, true), (None, true), (None, true), (Some(0), true)],
                Ok(3),
                4,
                1500,
            ),
            (
                "held copies: fresh ones go on until one answers",
                &[
                    (None, true),
                    (None, true),
                    (None, true),
                    (None, true),
                    (None, true),
                    (Some(100), true),
                ],
                Ok(5),
                6,
                2600,
            ),
        ];
        for (what, plan, want, want_calls, want_ms) in cases {
            let calls = std::cell::Cell::new(0);
            let started = tokio::time::Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(5),
                hedged(|| call_with(plan, &calls), HEDGE_AFTER, MAX_HEDGED),
            )
            .await
            .unwrap_or(Err(usize::MAX));
            assert_eq!(result, want, "{what}");
            assert_eq!(calls.get(), want_calls, "{what}: calls");
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(want_ms),
                "{what}: time"
            );
        }
    }

    #[test]
    fn a_refused_connection_is_resent_for_any_request_a_broken_one_only_for_idempotent_ones() {
        use std::io::{Error as IoError, ErrorKind};
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        let with_source = |code, kind| {
            let mut s = tonic::Status::new(code, "transport error");
            s.set_source(Arc::new(IoError::from(kind)));
            etcd_client::Error::GRpcStatus(s)
        };
        // (error, resent for any request, resent for an idempotent one)
        let cases = [
            // What a balanced request to a killed member fails with.
            (
                status(tonic::Code::Unavailable, "tcp connect error"),
                true,
                true,
            ),
            (
                with_source(tonic::Code::Unavailable, ErrorKind::ConnectionRefused),
                true,
                true,
            ),
            (
                etcd_client::Error::IoError(IoError::from(ErrorKind::ConnectionRefused)),
                true,
                true,
            ),
            // It may have reached etcd: resent only when that is harmless.
            (
                with_source(tonic::Code::Unavailable, ErrorKind::ConnectionReset),
                false,
                true,
            ),
            // A killed member's connection, reset under a lease keep-alive stream, or
            // closed before it took the stream (both seen in etcd_members).
            (status(tonic::Code::Unknown, "transport error"), false, true),
            (
                status(tonic::Code::Cancelled, "operation was canceled"),
                false,
                true,
            ),
            // A stopped member's connection, closed when its keep-alive ping went unanswered
            // (seen in etcd_members).
            (status(tonic::Code::Unavailable, "http2 error"), false, true),
            // The caller's own cancellation is not the connection's.
            (
                status(tonic::Code::Cancelled, "Timeout expired"),
                false,
                false,
            ),
            (
                etcd_client::Error::IoError(IoError::from(ErrorKind::TimedOut)),
                false,
                true,
            ),
            // A member without a leader: sent again, to a member that may have one, when the
            // request is harmless twice.
            (
                status(tonic::Code::Unavailable, "etcdserver: no leader"),
                false,
                true,
            ),
            // etcd's other answers: never resent here (the caller decides).
            (
                status(tonic::Code::Unavailable, "etcdserver: request timed out"),
                false,
                false,
            ),
            (
                status(tonic::Code::DeadlineExceeded, "tcp connect error"),
                false,
                false,
            ),
            (
                status(tonic::Code::Unknown, "etcdserver: lease not found"),
                false,
                false,
            ),
            (etcd_client::Error::InvalidArgs("x".into()), false, false),
        ];
        for (e, any, idempotent) in cases {
            assert_eq!(Resend::Unsent.allows(&e), any, "{e:?}");
            assert_eq!(Resend::Idempotent.allows(&e), idempotent, "{e:?}");
            assert_eq!(Resend::Hedged.allows(&e), idempotent, "{e:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_resendable_failure_is_sent_again_with_growing_pauses_for_at_most_resend_for() {
        // Per attempt: `None` answers, `Some(resendable)` fails; past the plan, refused.
        type Plan = &'static [Option<bool>];
        // (case, plan, result: the answering or last attempt, attempts made, ms taken)
        type Case = (&'static str, Plan, Result<usize, usize>, usize, u64);
        let cases: [Case; 5] = [
            ("answered at once", &[None], Ok(0), 1, 0),
            (
                "refused once: sent again at once",
                &[Some(true), None],
                Ok(1),
                2,
                0,
            ),
            (
                "refused three times: pauses of 0, 10 and 20 ms",
                &[Some(true), Some(true), Some(true), None],
                Ok(3),
                4,
                30,
            ),
            (
                "a failure that may have applied",
                &[Some(false)],
                Err(0),
                1,
                0,
            ),
            // Pauses 0, 10, 20, 40, 80, then 100 ms: the 14th attempt starts at 950 ms,
            // and a 15th would start past RESEND_FOR.
            ("refused for ever", &[], Err(13), 14, 950),
        ];
        for (name, plan, want, want_calls, want_ms) in cases {
            let calls = std::cell::Cell::new(0);
            let start = tokio::time::Instant::now();
            let got = resend(
                || {
                    let n = calls.get();
                    calls.set(n + 1);
                    let outcome = plan.get(n).copied().unwrap_or(Some(true));
                    async move {
                        match outcome {
                            None => Ok(n),
                            Some(resendable) => Err((n, resendable)),
                        }
                    }
                },
                |&(_, resendable): &(usize, bool)| resendable,
            )
            .await
            .map_err(|(n, _)| n);
            assert_eq!(got, want, "{name}");
            assert_eq!(calls.get(), want_calls, "{name}");
            assert_eq!(start.elapsed(), Duration::from_millis(want_ms), "{name}");
        }
    }

    #[test]
    fn requested_progress_is_trusted_only_on_fixed_releases() {
        let table = [
            ("3.4.23", false),
            ("3.4.33", false),
            ("3.4.34", true),
            ("3.5.9", false),
            ("3.5.16", true),
            ("3.6.0", true),
            ("v3.6.4", true),
            ("3.5.17-rc.0", true),
            ("4.0.0", true),
            ("2.3.8", false),
            ("", false),
            ("garbage", false),
            ("3.5", false),
        ];
        for (version, ordered) in table {
            assert_eq!(orders_requested_progress(version), ordered, "{version:?}");
        }
    }
}
