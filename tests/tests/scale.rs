//! Scale behaviour at a size CI can afford, with a real `meshup gateway` process on a real
//! etcd and real DNS queries: a gateway joining a catalog of many clusters reports `/ready`
//! only once it answers every clusterset service, and `pinned_names` decides which
//! cluster-pinned names get a VIP. The full-size figures come from `bench/scale`.
//!
//! The `meshup` binary must be built (`cargo build --workspace`; `.ci/test` does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::keys::KeyLayout;
use meshup_federation::publisher::PublisherHandle;
use meshup_federation::store::{self, Store};
use meshup_tests::dns::{Answer, query_a};
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec};
use meshup_tests::scale::{cluster, clusterset_name, pinned_name, publish, service};
use meshup_tests::{EtcdServer, eventually_ok, poll_until};
use tokio_util::sync::CancellationToken;

/// The publishers' lease TTL (long: the test is not about expiry).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// One DNS query's wait.
const QUERY_WAIT: Duration = Duration::from_secs(2);

struct Federation {
    etcd: EtcdServer,
    store: Arc<dyn Store>,
    _publishers: Vec<PublisherHandle>,
    _cancel: tokio_util::sync::DropGuard,
}

/// A real etcd holding `clusters` × `services` export records under `prefix`, published by
/// one live publisher per cluster.
async fn federation(prefix: &str, clusters: usize, services: usize) -> Federation {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .expect("connect to etcd"),
    );
    let cancel = CancellationToken::new();
    let layout = KeyLayout::new(prefix).expect("prefix");
    let publishers = publish(
        store.clone(),
        &layout,
        clusters,
        services,
        clusters,
        LEASE_TTL,
        Duration::from_secs(30),
        &cancel,
    )
    .await
    .expect("publish the federation");
    Federation {
        etcd,
        store,
        _publishers: publishers,
        _cancel: cancel.drop_guard(),
    }
}

fn addresses(dns: SocketAddr, name: &str) -> Answer {
    query_a(dns, name, QUERY_WAIT).unwrap_or_else(|e| panic!("query {name}: {e:#}"))
}

/// 20 clusters × 25 services: 500 export records, 25 clusterset VIPs and 500 pinned ones.
/// Before the fix `/ready` came with the first catalog sync, before any VIP existed, and a
/// client of a ready gateway got no address for most names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_gateway_is_ready_only_once_it_answers_every_clusterset_service() {
    const CLUSTERS: usize = 20;
    const SERVICES: usize = 25;
    let f = federation("/scale", CLUSTERS, SERVICES).await;
    let certs = Certs::new(&["joiner"]);
    let started = Instant::now();
    let joiner = GatewayProcess::start(GatewaySpec {
        log_filter: Some("info"),
        ..GatewaySpec::new("joiner", "127.81.0.0/16", &f.etcd, &certs, "/scale")
    });
    let dns = joiner.dns_addr().await;
    assert!(
        poll_until(Duration::from_secs(30), || async {
            matches!(joiner.admin_get("/ready"), Ok((200, _)))
        })
        .await,
        "joiner not ready within 30 s; log:\n{}",
        joiner.log_text()
    );
    let ready = started.elapsed();
    // The exact promise: once ready, every clusterset name answers with an address.
    let unanswered: Vec<(String, Answer)> = (0..SERVICES)
        .map(|s| clusterset_name(&service(s)))
        .map(|name| {
            let answer = addresses(dns, &name);
            (name, answer)
        })
        .filter(|(_, answer)| answer.addresses().is_empty())
        .collect();
    assert!(
        unanswered.is_empty(),
        "ready after {ready:?} but {} of {SERVICES} clusterset names have no address: {unanswered:?}",
        unanswered.len()
    );
    // The pinned names follow (allocated after every clusterset VIP).
    let all_pinned = eventually_ok(
        "every pinned name answers",
        Duration::from_secs(20),
        || async {
            for s in 0..SERVICES {
                for c in 0..CLUSTERS {
                    let name = pinned_name(&service(s), &cluster(c));
                    if addresses(dns, &name).addresses().is_empty() {
                        anyhow::bail!("{name} has no address yet");
                    }
                }
            }
            Ok::<_, anyhow::Error>(started.elapsed())
        },
    )
    .await;
    eprintln!(
        "{} records: ready {ready:?} after the spawn, every clusterset name answered then; \
         all {} pinned names by {all_pinned:?}",
        CLUSTERS * SERVICES,
        CLUSTERS * SERVICES
    );
}

/// `pinned_names: none` allocates only clusterset VIPs (a pinned name exists and answers
/// NODATA); a list gives pinned VIPs to the listed services only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_names_decide_which_pinned_names_get_a_vip() {
    const CLUSTERS: usize = 4;
    const SERVICES: usize = 5;
    let f = federation("/pinned", CLUSTERS, SERVICES).await;
    let certs = Certs::new(&["lean", "picky"]);
    let mut lean = GatewayProcess::start(GatewaySpec {
        pinned_names: Some("none"),
        ..GatewaySpec::new("lean", "127.82.0.0/24", &f.etcd, &certs, "/pinned")
    });
    let picky_list = format!("[{}]", service(1));
    let mut picky = GatewayProcess::start(GatewaySpec {
        pinned_names: Some(&picky_list),
        ..GatewaySpec::new("picky", "127.82.1.0/24", &f.etcd, &certs, "/pinned")
    });
    lean.wait_ready().await;
    picky.wait_ready().await;
    let (lean_dns, picky_dns) = (lean.dns_addr().await, picky.dns_addr().await);
    for s in 0..SERVICES {
        let name = clusterset_name(&service(s));
        assert!(
            !addresses(lean_dns, &name).addresses().is_empty(),
            "lean: {name}"
        );
        assert!(
            !addresses(picky_dns, &name).addresses().is_empty(),
            "picky: {name}"
        );
    }
    // picky's one pinned service answers in every cluster, once its pinned VIPs are there.
    eventually_ok(
        "picky's listed pinned names",
        Duration::from_secs(10),
        || async {
            for c in 0..CLUSTERS {
                let name = pinned_name(&service(1), &cluster(c));
                if addresses(picky_dns, &name).addresses().is_empty() {
                    anyhow::bail!("{name} has no address yet");
                }
            }
            Ok::<_, anyhow::Error>(())
        },
    )
    .await;
    // Exactly the VIPs each asked for are in the catalog: lean one per service, picky one
    // per service plus one per cluster for the listed service.
    let vips_of = |cluster: &'static str| {
        let store = f.store.clone();
        async move {
            store::list_prefix(
                store.as_ref(),
                format!("/pinned/v1/vips/{cluster}/").as_bytes(),
            )
            .await
            .map(|(kvs, _)| kvs.len())
        }
    };
    assert_eq!(vips_of("lean").await.expect("list"), SERVICES);
    assert_eq!(vips_of("picky").await.expect("list"), SERVICES + CLUSTERS);
    // A pinned name without a VIP exists (the cluster exports the service): NODATA, not
    // NXDOMAIN, so resolvers do not give up on the search list.
    for (dns, s) in [(lean_dns, 1), (picky_dns, 0)] {
        let name = pinned_name(&service(s), &cluster(2));
        assert_eq!(addresses(dns, &name), Answer::Addresses(vec![]), "{name}");
    }
}

/// A gateway raises its soft limit on open files to the hard one at start-up (two
/// descriptors per VIP listener: 10,000 services outgrow the usual soft limit of 1,024). The
/// test lowers its own soft limit with util-linux's `prlimit`; the gateway inherits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_raises_its_open_files_limit_to_the_hard_one() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let me = std::process::id().to_string();
    let lowered = std::process::Command::new("prlimit")
        .args(["--pid", &me, "--nofile=512:"])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(lowered.success(), "prlimit --nofile=512: failed");
    let limits = |pid: &str| -> (String, String) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("an open files line")
            .to_owned();
        let mut fields = line["Max open files".len()..].split_whitespace();
        let soft = fields.next().expect("soft").to_owned();
        let hard = fields.next().expect("hard").to_owned();
        (soft, hard)
    };
    let (soft, hard) = limits(&me);
    assert_eq!(soft, "512", "the test's own soft limit was lowered");
    assert_ne!(hard, "512", "a hard limit above the soft one, to raise to");

    let certs = Certs::new(&["joiner"]);
    let mut gateway = GatewayProcess::start(GatewaySpec {
        log_filter: Some("info"),
        ..GatewaySpec::new("joiner", "127.81.0.0/16", &etcd, &certs, "/limits")
    });
    gateway.wait_ready().await;
    assert_eq!(
        limits(&gateway.pid().to_string()),
        (hard.clone(), hard),
        "the gateway's open files limits; log:\n{}",
        gateway.log_text()
    );
}

/// The `meshup` binary is linked with packed relative relocations (DT_RELR, `gateway/build.rs`):
/// an idle gateway otherwise keeps ~600 KiB of relocation records resident, the loader having
/// read them all at start-up (docs/scale.md, "An idle gateway"). Read from the binary's own
/// dynamic section: DT_RELR present, the classic relocation table (DT_RELASZ) small.
#[test]
fn the_binary_packs_its_relative_relocations() {
    const DT_RELASZ: u64 = 8;
    const DT_RELR: u64 = 36;
    const PT_DYNAMIC: u32 = 2;
    let elf = std::fs::read(meshup_tests::meshup::meshup_bin()).expect("read the meshup binary");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().expect("2 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().expect("8 bytes"));
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "64-bit little-endian");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let dynamic = (0..usize::from(phnum))
        .map(|i| phoff + i * usize::from(phentsize))
        .find(|&ph| u32_at(ph) == PT_DYNAMIC)
        .map(|ph| (u64_at(ph + 8) as usize, u64_at(ph + 32) as usize))
        .expect("a dynamic section: the binary is dynamically linked");
    let (offset, size) = dynamic;
    let entries: Vec<(u64, u64)> = (offset..offset + size)
        .step_by(16)
        .map(|at| (u64_at(at), u64_at(at + 8)))
        .collect();
    let tag = |t: u64| entries.iter().find(|(k, _)| *k == t).map(|(_, v)| *v);
    assert!(tag(DT_RELR).is_some(), "no DT_RELR: relocations not packed");
    let rela = tag(DT_RELASZ).unwrap_or(0);
    assert!(
        rela < 64 * 1024,
        "{rela} bytes of RELA relocation records (over 600 KiB unpacked)"
    );
}
