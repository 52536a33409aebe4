//! The node datapath (docs/datapath.md), shown in network namespaces made by the test.
//!
//! A "node" namespace of cluster east runs a real `meshup gateway` that puts the VIP range
//! and the node-local DNS address on a dummy interface it creates itself; two "pod"
//! namespaces hang off it by veth pairs with a default route via the node; a second node of
//! cluster west, linked to the first, runs its gateway and a backend; a real etcd listens on
//! east's uplink address. A client in each pod resolves the service through the node-local
//! DNS with `dig` and sends a few hundred KB to the VIP, which come back byte-exact from the
//! west backend.
//!
//! The other tests start the gateway with a `datapath` section where it cannot do its work:
//! without CAP_NET_ADMIN (it names the capability and the `ip` commands to run instead), with
//! those commands run beforehand (it accepts the set-up and needs no capability), with an
//! interface of the name that is not a dummy (refused), and without a `datapath` section on a
//! non-loopback range (it warns that clients cannot reach the VIPs).
//!
//! Two more replace gateways under load in that set-up (docs/upgrade.md): one node's
//! gateway by a new process, with pods' new connections, a long stream and `dig` running
//! throughout; and a rolling upgrade of a cluster across two nodes, each new process under a
//! new gateway id as a DaemonSet's new pod, with the other cluster calling in. Nothing may
//! fail, and the other cluster must end up seeing only the new gateways.
//!
//! Runs as root (CI does); otherwise it fails, saying so.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, dig_in, path_str};
use meshup_tests::netns::{Netns, Node, Pod, require_root};
use meshup_tests::procs::ChildGuard;
use meshup_tests::{EtcdServer, eventually_ok, meshup_bin};
use sha2::{Digest as _, Sha256};

/// East's VIP range: local on east's node through the dummy interface.
const EAST_VIPS: &str = "169.254.253.0/24";
/// The node-local DNS address (what the cluster DNS forwards `clusterset.local` to).
const NODE_DNS: &str = "169.254.252.53";
/// West needs no datapath here (nobody calls from west): loopback VIPs.
const WEST_VIPS: &str = "127.78.0.0/16";
/// Bytes each pod sends through the VIP.
const PAYLOAD: usize = 384 * 1024;
const SERVICE: &str = "echo.prod";
const PORT: u16 = 7000;

/// A TCP echo server whose socket lives in a namespace (made there by [`Netns::run`]),
/// served by threads of the test; counts the bytes it echoed.
struct Echo {
    addr: SocketAddr,
    echoed: Arc<AtomicU64>,
}

impl Echo {
    fn start(ns: &Netns) -> Self {
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .expect("bind the backend in west's node");
        let addr = listener.local_addr().expect("addr");
        let echoed = Arc::new(AtomicU64::new(0));
        let count = echoed.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut reader = stream;
                    let Ok(mut writer) = reader.try_clone() else {
                        return;
                    };
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = reader.read(&mut buf) {
                        if n == 0 || writer.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Self { addr, echoed }
    }
}

/// Sends `payload` over `stream` (a writer thread) while reading as many bytes back; returns
/// them.
fn round_trip(stream: TcpStream, payload: &[u8]) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = stream;
    std::thread::scope(|s| {
        s.spawn(move || writer.write_all(payload).expect("send through the VIP"));
        let mut back = vec![0u8; payload.len()];
        reader
            .read_exact(&mut back)
            .expect("the same number of bytes back");
        back
    })
}

fn payload(seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAYLOAD);
    let mut block = Sha256::digest([seed]);
    while out.len() < PAYLOAD {
        out.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    out.truncate(PAYLOAD);
    out
}

/// The node DNS address (what the cluster DNS forwards `clusterset.local` to), port 53.
fn node_dns() -> SocketAddr {
    SocketAddr::new(NODE_DNS.parse().expect("ip"), 53)
}

/// East's node, with two pods and a ready gateway that makes the datapath itself (and, with
/// `handover`, listens for a successor), linked to west's node with its ready gateway and a
/// backend exporting `echo.prod`; etcd on east's uplink address, started inside east so both
/// nodes reach it. Fields drop in order: processes before the namespaces they run in.
struct TwoNodes {
    east_gw: GatewayProcess,
    _west_gw: GatewayProcess,
    _certs: Certs,
    backend: Echo,
    _etcd: EtcdServer,
    pods: [Pod; 2],
    _west: Node,
    east: Node,
}

async fn two_nodes(prefix: &str, handover: bool) -> TwoNodes {
    require_root();
    let mut east = Node::new("east");
    let west = Node::new("west");
    let (east_ip, west_ip) = east.link(&west, 77);
    let pods = [east.add_pod("pod0", 78), east.add_pod("pod1", 78)];
    let etcd = east.ns.run(|| EtcdServer::start_on(east_ip));
    let backend = Echo::start(&west.ns);
    let certs = Certs::new(&["east", "west"]);
    let mut west_gw = GatewayProcess::start(GatewaySpec {
        netns: Some(west.name()),
        tunnel_ip: Some(west_ip),
        exports: vec![("echo", "prod", PORT, backend.addr)],
        ..GatewaySpec::new("west", WEST_VIPS, &etcd, &certs, prefix)
    });
    let mut east_gw = GatewayProcess::start(GatewaySpec {
        netns: Some(east.name()),
        tunnel_ip: Some(east_ip),
        dns_listen: Some(node_dns()),
        datapath: Some(("meshup0", vec!["169.254.252.53/32"])),
        handover,
        drain_deadline: Duration::from_secs(20),
        ..GatewaySpec::new("east", EAST_VIPS, &etcd, &certs, prefix)
    });
    west_gw.wait_ready().await;
    east_gw.wait_ready().await;
    TwoNodes {
        east_gw,
        _west_gw: west_gw,
        _certs: certs,
        backend,
        _etcd: etcd,
        pods,
        _west: west,
        east,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_a_remote_backend_through_their_nodes_vip_range() {
    let mut f = two_nodes("/datapath", false).await;
    let TwoNodes {
        east,
        pods,
        backend,
        east_gw,
        ..
    } = &mut f;
    let dns = node_dns();

    // The gateway made the datapath itself: a dummy interface, up, with the DNS address, and
    // one local route for the whole VIP range.
    let link = String::from_utf8_lossy(&east.ns.ip(&["-d", "link", "show", "meshup0"]).stdout)
        .into_owned();
    // An empty bridge where the kernel has no dummy driver (as on the CI's VMs).
    assert!(
        (link.contains("dummy") || link.contains("bridge")) && link.contains(",UP"),
        "meshup0 is not an up dummy interface (or empty bridge):\n{link}"
    );
    let addrs =
        String::from_utf8_lossy(&east.ns.ip(&["-o", "addr", "show", "dev", "meshup0"]).stdout)
            .into_owned();
    assert!(addrs.contains("inet 169.254.252.53/32"), "{addrs}");
    let routes = String::from_utf8_lossy(
        &east
            .ns
            .ip(&[
                "route", "show", "table", "local", "type", "local", EAST_VIPS,
            ])
            .stdout,
    )
    .into_owned();
    assert!(
        routes.contains(&format!("local {EAST_VIPS} dev meshup0")),
        "no AnyIP route for the VIP range:\n{routes}\n{}",
        east.ns.describe()
    );

    let vip = east_gw.wait_routable(SERVICE, PORT).await;
    let vips: ipnet::IpNet = EAST_VIPS.parse().expect("net");
    assert!(vips.contains(&vip.ip()), "{vip} is not in {EAST_VIPS}");
    let name = "echo.prod.svc.clusterset.local";
    for (i, pod) in pods.iter().enumerate() {
        // The pod's resolver is the node-local DNS address.
        let answers = eventually_ok(
            &format!("{} resolves {name} at {dns}", pod.ns.name()),
            Duration::from_secs(20),
            || async {
                let a = dig_in(Some(pod.ns.name()), dns, name)?;
                anyhow::ensure!(!a.is_empty(), "no answer yet");
                Ok::<_, anyhow::Error>(a)
            },
        )
        .await;
        assert_eq!(
            answers,
            vec![vip.ip()],
            "{} got another address",
            pod.ns.name()
        );

        // Connect from the pod's own network stack, to the VIP, through its default route.
        let stream = eventually_ok(
            &format!("{} connects to {vip}", pod.ns.name()),
            Duration::from_secs(20),
            || async {
                pod.ns
                    .run(|| TcpStream::connect_timeout(&vip, Duration::from_secs(2)))
            },
        )
        .await;
        let local = stream.local_addr().expect("local addr");
        assert_eq!(local.ip(), pod.addr, "the connection is not the pod's");
        let sent = payload(i as u8);
        let before = backend.echoed.load(Ordering::Relaxed);
        let back = tokio::task::block_in_place(|| round_trip(stream, &sent));
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&sent),
            "{} got other bytes back from {vip}",
            pod.ns.name()
        );
        assert!(
            backend.echoed.load(Ordering::Relaxed) >= before + PAYLOAD as u64,
            "the bytes did not go through the west backend"
        );
        println!(
            "{} ({}) -> {name} = {vip}: {PAYLOAD} bytes back byte-exact from west's backend",
            pod.ns.name(),
            pod.addr
        );
    }
    assert_eq!(
        backend.echoed.load(Ordering::Relaxed),
        2 * PAYLOAD as u64,
        "west's backend echoed exactly both pods' bytes"
    );
}

/// A config for a gateway alone (embedded catalog) with `extra` appended.
fn lone_config(certs: &Certs, vip_cidr: &str, extra: &str) -> String {
    let dir = certs.of("east");
    format!(
        r#"cluster: east
trust_domain: {td}
catalog:
  backend: embedded
vip_cidr: {vip_cidr}
tunnel:
  listen: 127.0.0.1:0
  cert: {dir}/cert.pem
  key: {dir}/key.pem
  bundle: {dir}/bundle.pem
dns:
  listen: 127.0.0.1:0
admin:
  http: 127.0.0.1:15020
{extra}"#,
        td = meshup_tests::gateways::TRUST_DOMAIN,
        dir = dir.display(),
    )
}

const DATAPATH: &str = "datapath:\n  interface: meshup0\n  addresses: [169.254.252.53/32]\n";

/// Starts `meshup gateway` in `ns`, without CAP_NET_ADMIN when `drop_net_admin` (setpriv
/// drops it from the bounding set, so root's exec does not get it back).
fn start_gateway(ns: &Netns, dir: &Path, config: &str, drop_net_admin: bool) -> ChildGuard {
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config).expect("write config");
    let mut command = ns.command("setpriv");
    if drop_net_admin {
        command.args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"]);
    }
    command
        .arg("--")
        .arg(meshup_bin())
        .args(["gateway", "--config", path_str(&path)])
        .env("NO_COLOR", "1")
        .env("MESHUP_LOG", "info");
    ChildGuard::spawn("meshup gateway", command, &dir.join("gateway.log")).expect("start gateway")
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
}

/// The gateway's `/ready` inside `ns`.
async fn wait_ready_in(ns: &Netns, gateway: &mut ChildGuard) {
    eventually_ok("the gateway is ready", Duration::from_secs(20), || {
        let ready = gateway.ensure_running().and_then(|()| {
            let admin: SocketAddr = "127.0.0.1:15020".parse()?;
            let (code, body) = ns.run(|| meshup_tests::http::get(admin, "/ready"))?;
            anyhow::ensure!(code == 200, "/ready: {code} {body}");
            Ok(())
        });
        async move { ready }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_capability_it_names_it_and_the_commands_that_do_instead() {
    require_root();
    let node = Netns::new("nocap");
    let certs = Certs::new(&["east"]);
    let dir = tempfile::tempdir().expect("dir");
    let config = lone_config(&certs, EAST_VIPS, DATAPATH);

    let mut refused = start_gateway(&node, dir.path(), &config, true);
    let err = tokio::task::block_in_place(|| refused.wait_exit(Duration::from_secs(20)))
        .expect_err("the gateway must refuse to start without its datapath");
    let log = log_of(dir.path());
    assert!(log.contains("CAP_NET_ADMIN"), "{err}\n{log}");
    let commands = [
        "ip link add meshup0 type dummy",
        "ip link set meshup0 up",
        "ip addr add 169.254.252.53/32 dev meshup0",
        "ip route add local 169.254.253.0/24 dev meshup0 table local",
    ];
    for c in commands {
        assert!(log.contains(&format!("    {c}")), "{c} not in:\n{log}");
    }
    // Nothing half-done: the first step was refused.
    let links = String::from_utf8_lossy(&node.ip(&["link", "show"]).stdout).into_owned();
    assert!(!links.contains("meshup0"), "{links}");

    // The operator runs the commands it printed; the gateway, still without the capability,
    // finds them done, says so and starts.
    for c in commands {
        let args: Vec<&str> = c.split_whitespace().skip(1).collect();
        let done = std::process::Command::new("ip")
            .args(["-n", node.name()])
            .args(&args)
            .status()
            .expect("run ip")
            .success();
        if !done {
            // Only the dummy may be missing (a kernel without its driver): then the
            // alternative the gateway printed.
            assert!(c.ends_with("type dummy"), "`{c}` failed");
            assert!(
                log.contains("`ip link add meshup0 type bridge` instead of the first"),
                "{log}"
            );
            node.ip(&["link", "add", "meshup0", "type", "bridge"]);
        }
    }
    let mut gateway = start_gateway(&node, dir.path(), &config, true);
    wait_ready_in(&node, &mut gateway).await;
    let log = log_of(dir.path());
    assert!(log.contains("node datapath already set up"), "{log}");
    // A VIP of the range binds (the AnyIP route makes every one local).
    let vip: SocketAddr = "169.254.253.77:0".parse().expect("addr");
    node.run(|| TcpListener::bind(vip))
        .expect("a VIP listener binds with the local route");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interface_of_the_name_that_is_not_a_dummy_is_refused() {
    require_root();
    let node = Netns::new("clash");
    node.ip(&[
        "link", "add", "meshup0", "type", "veth", "peer", "name", "other0",
    ]);
    let certs = Certs::new(&["east"]);
    let dir = tempfile::tempdir().expect("dir");
    let mut refused = start_gateway(
        &node,
        dir.path(),
        &lone_config(&certs, EAST_VIPS, DATAPATH),
        false,
    );
    tokio::task::block_in_place(|| refused.wait_exit(Duration::from_secs(20)))
        .expect_err("a veth named meshup0 is someone else's");
    let log = log_of(dir.path());
    assert!(
        log.contains("interface meshup0 exists and is a veth interface, not a dummy interface"),
        "{log}"
    );
    assert!(log.contains("datapath.interface"), "{log}");
    // Left as it was.
    let link =
        String::from_utf8_lossy(&node.ip(&["-d", "link", "show", "meshup0"]).stdout).into_owned();
    assert!(link.contains("veth"), "{link}");
    let routes =
        String::from_utf8_lossy(&node.ip(&["route", "show", "table", "local"]).stdout).into_owned();
    assert!(!routes.contains("169.254.253.0/24"), "{routes}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_datapath_a_range_that_is_not_local_is_warned_about() {
    require_root();
    let node = Netns::new("nodp");
    let certs = Certs::new(&["east"]);
    let dir = tempfile::tempdir().expect("dir");
    let mut gateway = start_gateway(
        &node,
        dir.path(),
        &lone_config(&certs, EAST_VIPS, ""),
        false,
    );
    wait_ready_in(&node, &mut gateway).await;
    let log = log_of(dir.path());
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("vip_cidr 169.254.253.0/24 is not local"))
        .unwrap_or_else(|| panic!("no warning about the VIP range in:\n{log}"));
    assert!(
        warning.contains("clients cannot reach the VIPs"),
        "{warning}"
    );
    assert!(warning.contains("datapath"), "{warning}");
}

/// Counts of what one pod's clients saw while the node's gateway was replaced.
#[derive(Debug, Default)]
struct PodLoad {
    connections: AtomicU64,
    failed: std::sync::Mutex<Vec<String>>,
    dns_answers: AtomicU64,
    dns_failed: std::sync::Mutex<Vec<String>>,
    streamed: AtomicU64,
}

impl PodLoad {
    /// Stops the client threads, waits for them, and returns the failures: (connections and
    /// streams, DNS).
    fn finish(
        &self,
        stop: &AtomicBool,
        threads: Vec<std::thread::JoinHandle<()>>,
    ) -> (Vec<String>, Vec<String>) {
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("client thread");
        }
        (
            self.failed.lock().expect("lock").clone(),
            self.dns_failed.lock().expect("lock").clone(),
        )
    }

    /// Waits until at least `conns` more connections and `answers` more DNS answers got
    /// through (from now).
    async fn progress(&self, conns: u64, answers: u64) {
        let (c0, d0) = (
            self.connections.load(Ordering::Relaxed),
            self.dns_answers.load(Ordering::Relaxed),
        );
        eventually_ok(
            "the clients get through",
            Duration::from_secs(20),
            || async {
                let c = self.connections.load(Ordering::Relaxed) - c0;
                let d = self.dns_answers.load(Ordering::Relaxed) - d0;
                anyhow::ensure!(c >= conns && d >= answers, "{c} connections, {d} answers");
                Ok(())
            },
        )
        .await;
    }
}

/// `dig` for the service through the node-local DNS from inside `ns` until `stop`; every
/// answer must be `vip`.
fn dig_loop(ns: String, dns: SocketAddr, vip: IpAddr, load: Arc<PodLoad>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match dig_in(Some(&ns), dns, "echo.prod.svc.clusterset.local") {
            Ok(a) if a == vec![vip] => {
                load.dns_answers.fetch_add(1, Ordering::Relaxed);
            }
            Ok(a) => load
                .dns_failed
                .lock()
                .expect("lock")
                .push(format!("{ns}: {a:?}")),
            Err(e) => load
                .dns_failed
                .lock()
                .expect("lock")
                .push(format!("{ns}: {e:#}")),
        }
    }
}

/// New connections to `vip` from inside the pod `ns` (64 bytes each, echo checked), until
/// `stop`.
fn connection_loop(ns: String, vip: SocketAddr, load: Arc<PodLoad>, stop: Arc<AtomicBool>) {
    meshup_tests::netns::run_in(&ns, || {
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let started = std::time::SystemTime::now();
            let sent = format!("{n:064}").into_bytes();
            let attempt = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(&sent)?;
                let mut back = vec![0u8; sent.len()];
                s.read_exact(&mut back)?;
                if back != sent {
                    return Err(std::io::Error::other("other bytes came back"));
                }
                Ok(())
            })();
            match attempt {
                Ok(()) => load.connections.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    let at = started
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    load.failed.lock().expect("lock").push(format!(
                        "{ns} -> {vip} #{n} (started at {}.{:06} s since the epoch): {e}",
                        at.as_secs(),
                        at.subsec_micros()
                    ));
                    0
                }
            };
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// One long connection from inside `ns`: 1 KiB every 5 ms, every byte checked, until `stop`.
fn long_stream(ns: String, vip: SocketAddr, load: Arc<PodLoad>, stop: Arc<AtomicBool>) {
    meshup_tests::netns::run_in(&ns, || {
        let run = || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut back = vec![0u8; 1024];
            while !stop.load(Ordering::Relaxed) {
                let at = load.streamed.load(Ordering::Relaxed);
                let chunk: Vec<u8> = (0..1024u64).map(|i| ((at + i) % 251) as u8).collect();
                s.write_all(&chunk)?;
                s.read_exact(&mut back)?;
                if back != chunk {
                    return Err(std::io::Error::other(format!("bytes differ at {at}")));
                }
                load.streamed.fetch_add(1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        };
        if let Err(e) = run() {
            load.failed
                .lock()
                .expect("lock")
                .push(format!("long stream: {e}"));
        }
    })
}

/// The zero-downtime upgrade on a node (docs/upgrade.md), in the node set-up above: a pod
/// opening new connections to the VIP, another pod's long stream, and `dig` through the
/// node-local DNS address run while the node's gateway is replaced by a new process. No
/// connection, DNS answer or byte is lost; the old process exits 0 after its drain.
#[tokio::test(flavor = "multi_thread")]
async fn replacing_the_nodes_gateway_loses_no_pod_connection_and_no_dns_answer() {
    let mut f = two_nodes("/upgrade", true).await;
    let TwoNodes {
        pods, east_gw: old, ..
    } = &mut f;
    let dns = node_dns();
    let vip = old.wait_routable(SERVICE, PORT).await;
    let name = "echo.prod.svc.clusterset.local";
    eventually_ok(
        "pod0 resolves the service",
        Duration::from_secs(20),
        || async {
            anyhow::ensure!(dig_in(Some(pods[0].ns.name()), dns, name)? == vec![vip.ip()]);
            Ok(())
        },
    )
    .await;

    let load = Arc::new(PodLoad::default());
    let stop = Arc::new(AtomicBool::new(false));
    let end_stream = Arc::new(AtomicBool::new(false));
    let mut threads = vec![
        std::thread::spawn({
            let (ns, load, stop) = (pods[0].ns.name().to_owned(), load.clone(), stop.clone());
            move || connection_loop(ns, vip, load, stop)
        }),
        std::thread::spawn({
            let (ns, load, end) = (
                pods[1].ns.name().to_owned(),
                load.clone(),
                end_stream.clone(),
            );
            move || long_stream(ns, vip, load, end)
        }),
    ];
    threads.push(std::thread::spawn({
        let (ns, load, stop) = (pods[1].ns.name().to_owned(), load.clone(), stop.clone());
        move || dig_loop(ns, dns, vip.ip(), load, stop)
    }));
    load.progress(50, 5).await;

    let mut new = old.start_successor();
    new.wait_taken_over().await;
    load.progress(50, 5).await; // both processes up
    old.signal("-TERM");
    eventually_ok(
        "the old process drains",
        Duration::from_secs(20),
        || async {
            anyhow::ensure!(old.log_text().contains("draining after a hand-over"));
            Ok(())
        },
    )
    .await;
    load.progress(50, 5).await; // the new process alone takes new connections
    end_stream.store(true, Ordering::Relaxed);
    let code = old.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "old process log:\n{}", old.log_text());
    load.progress(50, 5).await; // the old one gone
    let (failed, dns_failed) = load.finish(&stop, threads);
    println!(
        "node upgrade in namespaces: {} new connections from pod0 ({} failed), long stream from pod1 {} bytes intact, {} DNS answers via {dns} ({} failed)",
        load.connections.load(Ordering::Relaxed),
        failed.len(),
        load.streamed.load(Ordering::Relaxed),
        load.dns_answers.load(Ordering::Relaxed),
        dns_failed.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(dns_failed.is_empty(), "DNS failures: {dns_failed:?}");
    assert!(load.streamed.load(Ordering::Relaxed) >= 64 * 1024);
}

/// A rolling upgrade of a cluster, one gateway per node across two nodes, the way a
/// DaemonSet with `maxSurge: 1` does it: each node's new process has a new gateway id (the
/// new pod's name), takes the node over, and the old one drains. Throughout, a pod on each
/// node opens new connections to another cluster's service through its node's VIP and asks
/// the node-local DNS, and the other cluster calls a service both nodes export. Nothing
/// fails, DNS always answers the same VIP, and the other cluster ends up seeing the two new
/// gateways and forgetting the old ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_across_two_nodes_loses_nothing() {
    require_root();
    let west = Node::new("west");
    let mut east_a = Node::new("east-a");
    let mut east_b = Node::new("east-b");
    let (west_a, a_ip) = west.link(&east_a, 77);
    let (west_b, b_ip) = west.link(&east_b, 79);
    east_a.ns.default_route(west_a);
    east_b.ns.default_route(west_b);
    let pods = [east_a.add_pod("pod-a", 78), east_b.add_pod("pod-b", 80)];
    let etcd = west.ns.run(|| EtcdServer::start_on(west_a));
    let backend = Echo::start(&west.ns);
    let (pay_a, pay_b) = (Echo::start(&east_a.ns), Echo::start(&east_b.ns));
    let certs = Certs::new(&["east", "west"]);
    let mut west_gw = GatewayProcess::start(GatewaySpec {
        netns: Some(west.name()),
        tunnel_ip: Some(west_a),
        exports: vec![("echo", "prod", PORT, backend.addr)],
        ..GatewaySpec::new("west", WEST_VIPS, &etcd, &certs, "/rolling")
    });
    let dns: SocketAddr = SocketAddr::new(NODE_DNS.parse().expect("ip"), 53);
    let east = |node: &Node, ip, id, pay: &Echo| {
        GatewayProcess::start(GatewaySpec {
            netns: Some(node.name()),
            tunnel_ip: Some(ip),
            dns_listen: Some(dns),
            datapath: Some(("meshup0", vec!["169.254.252.53/32"])),
            handover: true,
            replica_id: Some(id),
            exports: vec![("pay", "prod", 7100, pay.addr)],
            drain_deadline: Duration::from_secs(20),
            ..GatewaySpec::new("east", EAST_VIPS, &etcd, &certs, "/rolling")
        })
    };
    let mut olds = vec![
        east(&east_a, a_ip, "east-a-1", &pay_a),
        east(&east_b, b_ip, "east-b-1", &pay_b),
    ];
    west_gw.wait_ready().await;
    for g in &mut olds {
        g.wait_ready().await;
    }
    let vip = olds[0].wait_routable(SERVICE, PORT).await;
    assert_eq!(
        olds[1].wait_routable(SERVICE, PORT).await,
        vip,
        "the nodes agree on the VIP"
    );
    let pay_vip = west_gw.wait_routable("pay.prod", 7100).await;

    let load = Arc::new(PodLoad::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (ns, target) in [
        (pods[0].ns.name().to_owned(), vip),
        (pods[1].ns.name().to_owned(), vip),
        (west.name().to_owned(), pay_vip),
    ] {
        let (load, stop) = (load.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            connection_loop(ns, target, load, stop)
        }));
    }
    for pod in &pods {
        let (ns, load, stop) = (pod.ns.name().to_owned(), load.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            dig_loop(ns, dns, vip.ip(), load, stop)
        }));
    }
    load.progress(60, 6).await;

    let mut news = Vec::new();
    for (old, id) in olds.iter_mut().zip(["east-a-2", "east-b-2"]) {
        let mut new = old.start_successor_as(id);
        new.wait_taken_over().await;
        load.progress(60, 6).await;
        old.signal("-TERM");
        let code = old.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "{id}'s predecessor:\n{}", old.log_text());
        load.progress(60, 6).await;
        news.push(new);
    }
    let seen = eventually_ok(
        "the other cluster sees the new gateways only",
        Duration::from_secs(20),
        || async {
            let ids: Vec<String> = west_gw
                .catalog_gateways("east")?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            anyhow::ensure!(ids == ["east-a-2", "east-b-2"], "{ids:?}");
            Ok(ids)
        },
    )
    .await;
    load.progress(60, 6).await;
    let (failed, dns_failed) = load.finish(&stop, threads);
    println!(
        "rolling upgrade of 2 nodes: {} new connections ({} failed), {} DNS answers ({} failed); west sees {seen:?}",
        load.connections.load(Ordering::Relaxed),
        failed.len(),
        load.dns_answers.load(Ordering::Relaxed),
        dns_failed.len(),
    );
    if !failed.is_empty() || !dns_failed.is_empty() {
        let labels = ["east-a-1", "east-b-1", "east-a-2", "east-b-2", "west"];
        for (label, g) in labels
            .iter()
            .zip(olds.iter().chain(&news).chain([&west_gw]))
        {
            println!("---- {label} log:\n{}", g.log_text());
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(dns_failed.is_empty(), "DNS failures: {dns_failed:?}");
    assert!(
        pay_a.echoed.load(Ordering::Relaxed) > 0 && pay_b.echoed.load(Ordering::Relaxed) > 0,
        "the other cluster's calls reached both nodes' backends"
    );
}
