//! Network namespaces made by a test: a node's network reproduced without a cluster.
//!
//! A [`Netns`] is a named network namespace (`ip netns add`), deleted on drop, with a name
//! unique to the test run (so parallel tests and leftovers of a killed run never collide). A
//! [`Node`] is a namespace that plays a machine (a Kubernetes node or a VM): its gateway runs
//! in it, started with `ip netns exec`. A [`Pod`] is a namespace linked to its node by a veth
//! pair, with a default route via the node, as a pod on a node's bridge or CNI route.
//! [`Netns::link`] links any two namespaces with a veth pair and an address on each end.
//!
//! Code of the test itself runs inside a namespace with [`Netns::run`] (a thread of its own
//! enters it): sockets made there belong to that namespace for their whole life, so a test
//! connects from a pod, or listens in a node, and then moves the socket anywhere; child
//! processes spawned there start in it too.
//!
//! Every address lives only inside the test's namespaces; the root namespace gets nothing.
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): without it [`require_root`] fails the test
//! with what to do. CI runs as root, so this is never a skip.

use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::IpNet;
use nix::sched::CloneFlags;

/// Where `ip netns add` keeps the namespaces' handles.
const NETNS_DIR: &str = "/var/run/netns";

/// Namespaces made by this process so far (part of each name).
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails the test, with what to do, unless it runs as root.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "\n\n*** this test builds network namespaces (`ip netns add`, veth pairs) and must run as \
         root (CI does); it runs as uid {euid}. Run the suite as root, e.g. in the CI container. \
         This is a failure, not a skip. ***\n"
    );
}

/// Runs `ip ARGS`; panics with its output unless it succeeds.
pub fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("iproute2's `ip` is required (`bash .ci/setup test`): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `f` on a thread of its own inside the namespace `name` (the thread enters it with
/// setns); returns what `f` returns. Blocks the caller until `f` returns.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("{NETNS_DIR}/{name}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let handle = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("network namespace {path}: {e}"));
                nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering network namespace {name}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One network namespace, deleted on drop (processes still in it are the caller's to end
/// first: their own handles end them on drop).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace for `role` (a short word: `east`, `pod1`), loopback up.
    pub fn new(role: &str) -> Self {
        require_root();
        let name = format!(
            "meshup-{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name (for `ip netns exec NAME`, `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS` (inside the namespace); panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `f` inside the namespace ([`run_in`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.name, f)
    }

    /// Links this namespace and `other` with a veth pair: `here` named `here_if` in this one,
    /// `there` named `there_if` in the other, both up.
    pub fn link(&self, here_if: &str, here: IpNet, other: &Netns, there_if: &str, there: IpNet) {
        ip(&[
            "link",
            "add",
            here_if,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            there_if,
            "netns",
            &other.name,
        ]);
        for (ns, ifname, addr) in [(self, here_if, here), (other, there_if, there)] {
            ns.ip(&["addr", "add", &addr.to_string(), "dev", ifname]);
            ns.ip(&["link", "set", ifname, "up"]);
        }
    }

    /// `ip route add default via VIA`.
    pub fn default_route(&self, via: IpAddr) {
        self.ip(&["route", "add", "default", "via", &via.to_string()]);
    }

    /// `ip -o addr show` and `ip route show table all` of the namespace, for failure messages.
    pub fn describe(&self) -> String {
        let addrs = self.ip(&["-o", "addr", "show"]);
        let routes = self.ip(&["route", "show", "table", "all"]);
        format!(
            "namespace {}:\n{}\n{}",
            self.name,
            String::from_utf8_lossy(&addrs.stdout),
            String::from_utf8_lossy(&routes.stdout)
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A namespace playing a machine: a Kubernetes node (host network) or a VM.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    pods: u8,
}

/// A namespace playing a pod on a node: one veth to the node, default route via it.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    /// The pod's address.
    pub addr: IpAddr,
    /// The node's end of the pod's link (the pod's default gateway).
    pub via: IpAddr,
}

impl Node {
    /// A fresh node namespace for `role`.
    pub fn new(role: &str) -> Self {
        Self {
            ns: Netns::new(role),
            pods: 0,
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// A new pod on this node: pod `i` (counting from 0) is linked over `10.<subnet>.<i>.0/30`,
    /// the node at `.1` (interface `pod<i>`), the pod at `.2` (interface `eth0`) with its
    /// default route via the node.
    pub fn add_pod(&mut self, role: &str, subnet: u8) -> Pod {
        let i = self.pods;
        self.pods += 1;
        let ns = Netns::new(role);
        let node: IpNet = format!("10.{subnet}.{i}.1/30").parse().expect("a network");
        let pod: IpNet = format!("10.{subnet}.{i}.2/30").parse().expect("a network");
        self.ns.link(&format!("pod{i}"), node, &ns, "eth0", pod);
        ns.default_route(node.addr());
        Pod {
            ns,
            addr: pod.addr(),
            via: node.addr(),
        }
    }

    /// Links this node and `other` over `10.<subnet>.0.0/30` (this one `.1`, the other `.2`,
    /// interfaces `link<subnet>`); returns (this node's address, the other's).
    pub fn link(&self, other: &Node, subnet: u8) -> (IpAddr, IpAddr) {
        let here: IpNet = format!("10.{subnet}.0.1/30").parse().expect("a network");
        let there: IpNet = format!("10.{subnet}.0.2/30").parse().expect("a network");
        let ifname = format!("link{subnet}");
        self.ns.link(&ifname, here, &other.ns, &ifname, there);
        (here.addr(), there.addr())
    }
}
