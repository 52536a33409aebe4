//! A user-space UDP relay that injects network faults: loss, delay with jitter, duplication,
//! reordering and partitions, per direction, changeable while traffic flows.
//!
//! The kernel these tests run on has no `tc netem`, so a link between two QUIC endpoints is
//! made faulty by putting this relay between them: the relay listens on a loopback port, and
//! the endpoint that dials dials the relay instead of its peer (a gateway advertises the
//! relay's address as its tunnel address). Like a NAT, the relay gives every client address
//! its own upstream socket, so the upstream's answers come back to that socket and are
//! forwarded to the client from the listening address the client dialled.
//!
//! What happens to each datagram is decided by [`Fate::of`], pure code that takes the
//! direction's [`Faults`], a random source and `now`: dropped, delivered at one instant, or
//! delivered twice. A per-direction scheduler task holds the datagrams until they are due.
//! The random source is a seeded [`StdRng`]; the seed is printed when the relay starts (and
//! [`Relay::seed`] returns it), and `MESHUP_RELAY_SEED` (or [`Relay::start_seeded`]) replays a
//! run's draws. Concurrency still varies the interleaving of the two directions, so a replay
//! gives the same loss pattern per direction, not the same run to the microsecond.
//!
//! Everything is bounded: a direction holds at most [`MAX_QUEUED`] datagrams (more are
//! dropped and counted, as a router's full buffer would), and clients at most [`MAX_CLIENTS`].

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Datagrams one direction holds (waiting for their delay) before it drops new ones.
pub const MAX_QUEUED: usize = 65_536;
/// Client addresses the relay keeps an upstream socket for.
pub const MAX_CLIENTS: usize = 1024;
/// Largest datagram relayed (the largest UDP payload there is).
const MAX_DATAGRAM: usize = 65_535;
/// The environment variable that fixes the seed of [`Relay::start`] (to replay a run).
pub const SEED_ENV: &str = "MESHUP_RELAY_SEED";

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client of the relay to the upstream.
    ToUpstream,
    /// From the upstream back to a client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }
}

/// The faults of one direction. Probabilities are fractions (0.05 is 5 %).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Share of datagrams dropped.
    pub loss: f64,
    /// Mean added delay.
    pub delay: Duration,
    /// Each datagram's delay is drawn uniformly from `delay ± jitter` (at least zero).
    pub jitter: Duration,
    /// Whether datagrams leave in the order they came even with jitter (a queue whose delay
    /// varies, as on a real path). Without it, jitter reorders datagrams closer together than
    /// the jitter, as `netem` does.
    pub keep_order: bool,
    /// Share of datagrams delivered twice (the copy right after the original).
    pub duplicate: f64,
    /// Share of datagrams held back by `reorder_gap` beyond their delay, so that later ones
    /// overtake them.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_gap: Duration,
}

impl Faults {
    /// No fault: every datagram forwarded at once.
    pub fn clean() -> Self {
        Self::default()
    }

    /// `loss` (a fraction) of the datagrams dropped, nothing else.
    pub fn loss(loss: f64) -> Self {
        Self {
            loss,
            ..Self::default()
        }
    }

    /// `delay ± jitter` added to every datagram, each drawn on its own: datagrams closer
    /// together than the jitter may overtake each other, as with `netem delay D J`.
    pub fn delay(delay: Duration, jitter: Duration) -> Self {
        Self {
            delay,
            jitter,
            ..Self::default()
        }
    }

    /// `delay ± jitter`, but no datagram leaves before the one ahead of it (a queue): under
    /// dense traffic the delays pile up toward `delay + jitter`.
    pub fn delay_in_order(delay: Duration, jitter: Duration) -> Self {
        Self {
            keep_order: true,
            ..Self::delay(delay, jitter)
        }
    }
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Dropped by the loss rate.
    Lost,
    /// Delivered once at this instant.
    Deliver(Instant),
    /// Delivered at the first instant, and a copy at the second.
    Duplicate(Instant, Instant),
}

impl Fate {
    /// The fate of a datagram that arrived at `now`, under `faults`; `last` is the latest
    /// instant a datagram of this direction was scheduled for (for `keep_order`). Draws from
    /// `rng` in a fixed order, so a seed replays the same fates.
    pub fn of(faults: &Faults, rng: &mut impl Rng, now: Instant, last: Option<Instant>) -> Fate {
        Self::drawn(faults, rng, now, last).0
    }

    /// [`Fate::of`], and whether the datagram was held back for reordering.
    fn drawn(
        faults: &Faults,
        rng: &mut impl Rng,
        now: Instant,
        last: Option<Instant>,
    ) -> (Fate, bool) {
        // Every draw is made whatever the outcome, so one datagram's fate does not shift the
        // draws of the next ones.
        let lost = rng.random::<f64>() < faults.loss;
        let spread = rng.random::<f64>() * 2.0 - 1.0;
        let duplicated = rng.random::<f64>() < faults.duplicate;
        let reordered = rng.random::<f64>() < faults.reorder;
        if lost {
            return (Fate::Lost, false);
        }
        let delay = faults.delay.as_secs_f64() + spread * faults.jitter.as_secs_f64();
        let mut at = now + Duration::from_secs_f64(delay.max(0.0));
        if faults.keep_order
            && let Some(last) = last
        {
            at = at.max(last);
        }
        if reordered {
            at += faults.reorder_gap;
        }
        let fate = if duplicated {
            Fate::Duplicate(at, at)
        } else {
            Fate::Deliver(at)
        };
        (fate, reordered)
    }
}

/// Datagram counts of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams that arrived at the relay.
    pub received: u64,
    /// Datagrams sent on (copies included).
    pub forwarded: u64,
    /// Dropped by the loss rate.
    pub lost: u64,
    /// Dropped by a partition.
    pub partitioned: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Held back for reordering.
    pub reordered: u64,
    /// Dropped because the direction's queue was full, or a send failed.
    pub overflow: u64,
}

impl Counts {
    /// Every datagram dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.lost + self.partitioned + self.overflow
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    lost: AtomicU64,
    partitioned: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    overflow: AtomicU64,
}

impl Counters {
    fn get(&self) -> Counts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            received: r(&self.received),
            forwarded: r(&self.forwarded),
            lost: r(&self.lost),
            partitioned: r(&self.partitioned),
            duplicated: r(&self.duplicated),
            reordered: r(&self.reordered),
            overflow: r(&self.overflow),
        }
    }

    fn add(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// The state the two directions share with the test: faults, partition, random source.
#[derive(Debug)]
struct Control {
    state: Mutex<State>,
    counters: [Counters; 2],
}

#[derive(Debug)]
struct State {
    faults: [Faults; 2],
    partitioned: bool,
    rng: StdRng,
    /// The latest delivery instant scheduled per direction (for `keep_order`).
    last: [Option<Instant>; 2],
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides the fate of a datagram arriving now in `dir`, counting it; `None`: dropped.
    fn admit(&self, dir: Direction) -> Option<Fate> {
        let c = &self.counters[dir.index()];
        Counters::add(&c.received);
        let mut st = self.lock();
        if st.partitioned {
            Counters::add(&c.partitioned);
            return None;
        }
        let i = dir.index();
        let faults = st.faults[i];
        let last = st.last[i];
        let (fate, reordered) = Fate::drawn(&faults, &mut st.rng, Instant::now(), last);
        if reordered {
            Counters::add(&c.reordered);
        }
        match fate {
            Fate::Lost => {
                Counters::add(&c.lost);
                return None;
            }
            // A datagram held back for reordering does not hold back the ones behind it.
            Fate::Deliver(at) | Fate::Duplicate(at, _) if reordered => {
                st.last[i] = Some(at - faults.reorder_gap)
            }
            Fate::Deliver(at) | Fate::Duplicate(at, _) => st.last[i] = Some(at),
        }
        drop(st);
        Some(fate)
    }
}

/// One datagram waiting in a direction's scheduler.
#[derive(Debug)]
struct Queued {
    at: Instant,
    seq: u64,
    bytes: Arc<[u8]>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    /// Reversed: the max-heap yields the earliest (then the first queued) datagram.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A running relay. Stops (and closes its sockets) when dropped.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    seed: u64,
    control: Arc<Control>,
    tasks: Vec<JoinHandle<()>>,
    clients: Arc<Mutex<HashMap<SocketAddr, ClientSide>>>,
}

#[derive(Debug)]
struct ClientSide {
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free 127.0.0.1 port and relays to `upstream`, clean until told
    /// otherwise. The seed is `MESHUP_RELAY_SEED` if set, else random; it is printed.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let seed = match std::env::var(SEED_ENV) {
            Ok(v) => v.trim().parse().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{SEED_ENV}={v:?} is not a u64 seed: {e}"),
                )
            })?,
            Err(_) => rand::random(),
        };
        Self::start_seeded(upstream, seed).await
    }

    /// [`Relay::start`] with a given seed (a replay, or a unit test's fixed draws).
    pub async fn start_seeded(upstream: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let listen = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = listen.local_addr()?;
        eprintln!("udp relay {addr} → {upstream}: seed {seed} (replay with {SEED_ENV}={seed})");
        let control = Arc::new(Control {
            state: Mutex::new(State {
                faults: [Faults::clean(); 2],
                partitioned: false,
                rng: StdRng::seed_from_u64(seed),
                last: [None; 2],
            }),
            counters: Default::default(),
        });
        let (up_tx, up_rx) = mpsc::channel(MAX_QUEUED);
        let (down_tx, down_rx) = mpsc::channel(MAX_QUEUED);
        let clients = Arc::new(Mutex::new(HashMap::new()));
        let tasks = vec![
            tokio::spawn(schedule(up_rx, control.clone(), Direction::ToUpstream)),
            tokio::spawn(schedule(down_rx, control.clone(), Direction::ToClient)),
            tokio::spawn(from_clients(
                listen,
                upstream,
                control.clone(),
                clients.clone(),
                up_tx,
                down_tx,
            )),
        ];
        Ok(Self {
            addr,
            upstream,
            seed,
            control,
            tasks,
            clients,
        })
    }

    /// Where clients send their datagrams.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the relay forwards them.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The seed of the random draws (print it; [`SEED_ENV`] replays it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Sets the faults of one direction, from the next datagram on (datagrams already
    /// waiting keep the delay they drew).
    pub fn set(&self, dir: Direction, faults: Faults) {
        let mut st = self.control.lock();
        st.faults[dir.index()] = faults;
        st.last[dir.index()] = None;
    }

    /// Sets the same faults both ways.
    pub fn set_both(&self, faults: Faults) {
        self.set(Direction::ToUpstream, faults);
        self.set(Direction::ToClient, faults);
    }

    /// Drops everything both ways while `on` (datagrams already waiting are dropped too).
    pub fn partition(&self, on: bool) {
        self.control.lock().partitioned = on;
    }

    /// The counts of one direction so far.
    pub fn counts(&self, dir: Direction) -> Counts {
        self.control.counters[dir.index()].get()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, c) in self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            c.task.abort();
        }
    }
}

/// Reads datagrams from clients; gives each new client an upstream socket (and a task that
/// reads the upstream's answers), and queues every datagram toward the upstream.
async fn from_clients(
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    control: Arc<Control>,
    clients: Arc<Mutex<HashMap<SocketAddr, ClientSide>>>,
    up: mpsc::Sender<Queued>,
    down: mpsc::Sender<Queued>,
) {
    let mut sockets: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        let Ok((n, client)) = listen.recv_from(&mut buf).await else {
            // ICMP errors surface here on some systems: nothing to do but go on.
            continue;
        };
        let socket = match sockets.get(&client) {
            Some(s) => s.clone(),
            None => {
                if sockets.len() >= MAX_CLIENTS {
                    Counters::add(&control.counters[0].overflow);
                    continue;
                }
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    Counters::add(&control.counters[0].overflow);
                    continue;
                };
                let s = Arc::new(s);
                let task = tokio::spawn(from_upstream(
                    s.clone(),
                    listen.clone(),
                    client,
                    control.clone(),
                    down.clone(),
                ));
                clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(client, ClientSide { task });
                sockets.insert(client, s.clone());
                s
            }
        };
        let bytes: Arc<[u8]> = Arc::from(&buf[..n]);
        enqueue(&control, Direction::ToUpstream, &up, &mut seq, || Queued {
            at: Instant::now(),
            seq: 0,
            bytes: bytes.clone(),
            socket: socket.clone(),
            to: upstream,
        });
    }
}

/// Reads the upstream's answers to one client and queues them toward that client.
async fn from_upstream(
    socket: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    control: Arc<Control>,
    down: mpsc::Sender<Queued>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut seq = 0u64;
    loop {
        let Ok((n, _)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let bytes: Arc<[u8]> = Arc::from(&buf[..n]);
        enqueue(&control, Direction::ToClient, &down, &mut seq, || Queued {
            at: Instant::now(),
            seq: 0,
            bytes: bytes.clone(),
            socket: listen.clone(),
            to: client,
        });
    }
}

/// Decides a datagram's fate and hands its copies to the direction's scheduler.
fn enqueue(
    control: &Control,
    dir: Direction,
    tx: &mpsc::Sender<Queued>,
    seq: &mut u64,
    make: impl Fn() -> Queued,
) {
    let Some(fate) = control.admit(dir) else {
        return;
    };
    let c = &control.counters[dir.index()];
    let times: &[Instant] = match &fate {
        Fate::Lost => &[],
        Fate::Deliver(at) => std::slice::from_ref(at),
        Fate::Duplicate(a, b) => {
            Counters::add(&c.duplicated);
            &[*a, *b]
        }
    };
    for at in times {
        *seq += 1;
        let mut q = make();
        q.at = *at;
        q.seq = *seq;
        if tx.try_send(q).is_err() {
            Counters::add(&c.overflow);
        }
    }
}

/// Holds one direction's datagrams until they are due and sends them. A partition drops
/// what is waiting as well.
async fn schedule(mut rx: mpsc::Receiver<Queued>, control: Arc<Control>, dir: Direction) {
    let c = &control.counters[dir.index()];
    let mut heap: BinaryHeap<Queued> = BinaryHeap::new();
    // Ties on `at` keep arrival order within a producer (each numbers its own datagrams).
    loop {
        let next = heap.peek().map(|q| q.at);
        tokio::select! {
            got = rx.recv() => match got {
                Some(q) => {
                    if heap.len() >= MAX_QUEUED {
                        Counters::add(&c.overflow);
                    } else {
                        heap.push(q);
                    }
                }
                None => return,
            },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                let partitioned = control.lock().partitioned;
                while heap.peek().is_some_and(|q| q.at <= now) {
                    let Some(q) = heap.pop() else { break };
                    if partitioned {
                        Counters::add(&c.partitioned);
                        continue;
                    }
                    match q.socket.try_send_to(&q.bytes, q.to) {
                        Ok(_) => Counters::add(&c.forwarded),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // The socket's buffer is full: wait for room, as a busy link does.
                            if q.socket.send_to(&q.bytes, q.to).await.is_ok() {
                                Counters::add(&c.forwarded);
                            } else {
                                Counters::add(&c.overflow);
                            }
                        }
                        Err(_) => Counters::add(&c.overflow),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn fates_follow_the_faults() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        // (faults, what every fate must satisfy)
        type Check = fn(Fate, Instant) -> bool;
        let table: [(Faults, Check); 5] = [
            (Faults::clean(), |f, now| f == Fate::Deliver(now)),
            (Faults::loss(1.0), |f, _| f == Fate::Lost),
            (
                Faults {
                    duplicate: 1.0,
                    ..Faults::clean()
                },
                |f, now| f == Fate::Duplicate(now, now),
            ),
            (
                Faults::delay(ms(50), ms(10)),
                |f, now| matches!(f, Fate::Deliver(at) if at >= now + ms(40) && at <= now + ms(60)),
            ),
            (
                Faults {
                    reorder: 1.0,
                    reorder_gap: ms(5),
                    ..Faults::clean()
                },
                |f, now| f == Fate::Deliver(now + ms(5)),
            ),
        ];
        for (faults, ok) in table {
            for _ in 0..1000 {
                let fate = Fate::of(&faults, &mut rng, now, None);
                assert!(ok(fate, now), "{faults:?}: {fate:?}");
            }
        }
    }

    #[test]
    fn keep_order_never_schedules_before_the_previous_datagram() {
        let start = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let faults = Faults::delay_in_order(ms(50), ms(10));
        let mut last = None;
        let mut reordered_without = 0;
        let mut last_free: Option<Instant> = None;
        for i in 0..10_000u64 {
            let now = start + Duration::from_micros(i * 100);
            let Fate::Deliver(at) = Fate::of(&faults, &mut rng, now, last) else {
                panic!("no loss configured");
            };
            assert!(last.is_none_or(|l| at >= l), "datagram {i} overtook");
            last = Some(at);
            let unordered = Faults {
                keep_order: false,
                ..faults
            };
            let Fate::Deliver(free) = Fate::of(&unordered, &mut rng, now, None) else {
                panic!("no loss configured");
            };
            if last_free.is_some_and(|l| free < l) {
                reordered_without += 1;
            }
            last_free = Some(free);
        }
        assert!(
            reordered_without > 1000,
            "jitter without keep_order reorders ({reordered_without})"
        );
    }

    #[test]
    fn a_seed_replays_the_same_fates() {
        let now = Instant::now();
        let faults = Faults {
            loss: 0.3,
            jitter: ms(10),
            delay: ms(20),
            duplicate: 0.1,
            ..Faults::clean()
        };
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..500)
                .map(|_| Fate::of(&faults, &mut rng, now, None))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    /// A UDP peer that answers every datagram with the same bytes (the relay's upstream).
    async fn udp_echo() -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = s.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    /// Sends `n` numbered datagrams through the relay, paced, and returns the numbers that
    /// came back with each one's round trip, once `quiet` passes without one.
    async fn round_trips(relay: &Relay, n: u32, quiet: Duration) -> Vec<(u32, Duration)> {
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        client.connect(relay.addr()).await.expect("connect");
        let sent_at = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
        let receiver = {
            let (client, sent_at) = (client.clone(), sent_at.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(Ok(k)) = tokio::time::timeout(quiet, client.recv(&mut buf)).await {
                    assert_eq!(k, 4);
                    let j = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                    let at: Instant = sent_at.lock().expect("lock")[j as usize];
                    got.push((j, at.elapsed()));
                }
                got
            })
        };
        for i in 0..n {
            sent_at.lock().expect("lock").push(Instant::now());
            client.send(&i.to_be_bytes()).await.expect("send");
            // Paced so no socket buffer overflows (that loss would not be the relay's).
            if i % 20 == 19 {
                tokio::time::sleep(ms(1)).await;
            }
        }
        receiver.await.expect("receiver")
    }

    #[tokio::test]
    async fn a_clean_relay_forwards_every_datagram_both_ways() {
        let (echo, _t) = udp_echo().await;
        let relay = Relay::start_seeded(echo, 1).await.expect("relay");
        let got = round_trips(&relay, 2000, ms(200)).await;
        assert_eq!(got.len(), 2000);
        let up = relay.counts(Direction::ToUpstream);
        let down = relay.counts(Direction::ToClient);
        assert_eq!((up.forwarded, up.dropped()), (2000, 0));
        assert_eq!((down.forwarded, down.dropped()), (2000, 0));
    }

    #[tokio::test]
    async fn measured_loss_is_within_bounds_of_the_rate() {
        let (echo, _t) = udp_echo().await;
        let relay = Relay::start_seeded(echo, 2).await.expect("relay");
        relay.set(Direction::ToUpstream, Faults::loss(0.05));
        let n = 10_000;
        let got = round_trips(&relay, n, ms(200)).await;
        let lost = f64::from(n) - got.len() as f64;
        // Binomial(10000, 0.05): mean 500, sd ≈ 21.8; ±5 sd.
        assert!((390.0..=610.0).contains(&lost), "lost {lost} of {n}");
        let up = relay.counts(Direction::ToUpstream);
        assert_eq!(up.lost as f64, lost, "{up:?}");
        assert_eq!(up.received, u64::from(n));
        assert_eq!(relay.counts(Direction::ToClient).dropped(), 0);
    }

    #[tokio::test]
    async fn measured_delay_is_within_bounds_both_ways() {
        let (echo, _t) = udp_echo().await;
        let relay = Relay::start_seeded(echo, 3).await.expect("relay");
        relay.set_both(Faults::delay(ms(30), ms(10)));
        let got = round_trips(&relay, 300, ms(300)).await;
        assert_eq!(got.len(), 300);
        let mut rtts: Vec<Duration> = got.iter().map(|(_, d)| *d).collect();
        rtts.sort();
        // Two legs of 20..40 ms each: 40..80 ms, plus scheduling.
        assert!(rtts[0] >= ms(40), "min {:?}", rtts[0]);
        let median = rtts[rtts.len() / 2];
        assert!(
            (ms(50)..=ms(75)).contains(&median),
            "median {median:?} (mean added 60 ms)"
        );
        assert!(rtts[rtts.len() - 1] <= ms(120), "max {:?}", rtts.last());
    }

    #[tokio::test]
    async fn duplication_and_reordering_are_counted_and_seen() {
        let (echo, _t) = udp_echo().await;
        let relay = Relay::start_seeded(echo, 4).await.expect("relay");
        relay.set(
            Direction::ToUpstream,
            Faults {
                duplicate: 0.1,
                reorder: 0.1,
                reorder_gap: ms(5),
                ..Faults::clean()
            },
        );
        let n = 2000;
        let got = round_trips(&relay, n, ms(200)).await;
        let up = relay.counts(Direction::ToUpstream);
        assert_eq!(got.len() as u64, u64::from(n) + up.duplicated, "{up:?}");
        assert!((100..=300).contains(&up.duplicated), "{up:?}");
        let overtaken = got.windows(2).filter(|w| w[1].0 < w[0].0).count();
        assert!(overtaken >= 50, "{overtaken} overtaken");
    }

    #[tokio::test]
    async fn a_partition_drops_everything_both_ways_and_heals() {
        let (echo, _t) = udp_echo().await;
        let relay = Relay::start_seeded(echo, 5).await.expect("relay");
        // A client known to the relay before the partition: its answers are dropped too.
        assert_eq!(round_trips(&relay, 10, ms(100)).await.len(), 10);
        relay.partition(true);
        assert!(round_trips(&relay, 500, ms(200)).await.is_empty());
        let up = relay.counts(Direction::ToUpstream);
        assert_eq!(up.partitioned, 500, "{up:?}");
        assert_eq!(up.forwarded, 10);
        relay.partition(false);
        assert_eq!(round_trips(&relay, 100, ms(100)).await.len(), 100);
    }
}
