//! The node datapath: makes the cluster's VIP range (and a few node-local addresses such as the
//! DNS listen address) local on the node, so the pods of the node reach its gateway at any VIP.
//!
//! The gateway runs once per node (a DaemonSet with host network, or a VM). Pods send to a VIP
//! through their default route, which goes via the node; the node delivers the packet locally
//! when the VIP is a local address. This module makes it one:
//!
//! - a dummy interface it owns (`datapath.interface`, default `meshup0`), up (on a kernel
//!   built without the dummy driver, an empty bridge: it holds local addresses the same way);
//! - the node-local addresses (`datapath.addresses`) on it;
//! - ONE "AnyIP" route `local <vip_cidr> dev <interface> table local`, so every VIP of the
//!   range is local at once: VIP listeners bind without an address per VIP (no netlink churn
//!   as services come and go), the way NodeLocal DNSCache serves 169.254.20.10 from a dummy
//!   interface.
//!
//! [`plan`] is the pure part: from what the kernel has ([`Observed`]) and what the config asks
//! ([`Desired`]) it returns the missing [`Step`]s, or refuses an interface of the name that is
//! not a dummy (someone else's). [`prepare`] reads the kernel's state over rtnetlink, runs the
//! plan and, when the kernel refuses for lack of CAP_NET_ADMIN, says so with the exact `ip`
//! commands an operator can run beforehand instead. A set-up that exists already (made by an
//! operator, an init container, or the gateway this one replaces) is accepted and logged; it
//! needs no capability. Nothing is removed on exit: a replacement gateway takes the listeners
//! over, and the VIPs must stay local meanwhile.
//!
//! Without a `datapath` section the gateway changes nothing; [`check_vips_local`] then tells
//! whether a VIP of a non-loopback range can be bound, and start-up warns when it cannot.

use std::net::{IpAddr, SocketAddr, TcpListener};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

/// Default name of the dummy interface the gateway creates and owns.
pub const DEFAULT_INTERFACE: &str = "meshup0";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME: usize = 15;
/// Most node-local addresses one gateway may add.
pub const MAX_ADDRESSES: usize = 64;
/// The kernel's `local` routing table, where the VIP range's route goes.
const TABLE_LOCAL: u8 = 255;
/// errno values the set-up tells apart.
const EPERM: i32 = 1;
const EIO: i32 = 5;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
/// What the kernel answers for a link kind it has no driver for.
const EOPNOTSUPP: i32 = 95;

/// The `datapath:` config section: present on a node gateway (Kubernetes DaemonSet, VM);
/// absent where clients share the gateway's host (VIPs in 127.0.0.0/8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// The dummy interface the gateway creates (if absent) and owns. Default `meshup0`.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Node-local addresses besides the VIP range, e.g. the DNS listen address
    /// (`169.254.252.53/32`). Default: none.
    #[serde(default)]
    pub addresses: Vec<IpNet>,
}

fn default_interface() -> String {
    DEFAULT_INTERFACE.to_owned()
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            interface: default_interface(),
            addresses: Vec::new(),
        }
    }
}

impl DatapathConfig {
    /// Checks the section against the VIP range: `Err((field, message))`.
    pub fn validate(&self, vip_cidr: IpNet) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((field.to_owned(), message));
        let name = &self.interface;
        if name.is_empty()
            || name.len() > MAX_INTERFACE_NAME
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return bad(
                "datapath.interface",
                format!(
                    "{name:?} is not a Linux interface name (1 to {MAX_INTERFACE_NAME} characters, no '/', ':' or spaces); the default is {DEFAULT_INTERFACE}"
                ),
            );
        }
        if name == "lo" {
            return bad(
                "datapath.interface",
                "the gateway owns this interface, so it cannot be lo; use a name of its own such as meshup0".into(),
            );
        }
        if self.addresses.len() > MAX_ADDRESSES {
            return bad(
                "datapath.addresses",
                format!(
                    "{} addresses, more than {MAX_ADDRESSES}",
                    self.addresses.len()
                ),
            );
        }
        if vip_cidr.addr().is_loopback() {
            return bad(
                "datapath",
                format!(
                    "vip_cidr {vip_cidr} is in the loopback range, which is local already; remove the datapath section, or use a node range such as 169.254.253.0/24"
                ),
            );
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let field = format!("datapath.addresses[{i}]");
            let ip = a.addr();
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                return bad(
                    &field,
                    format!(
                        "{a} cannot be a node-local address; use one such as 169.254.252.53/32"
                    ),
                );
            }
            if vip_cidr.contains(&ip) {
                return bad(
                    &field,
                    format!(
                        "{a} is inside vip_cidr {vip_cidr}, which is local already and whose addresses are handed to services; pick an address outside it"
                    ),
                );
            }
            if self.addresses[..i].iter().any(|b| b.addr() == ip) {
                return bad(&field, format!("{a} is listed twice"));
            }
        }
        Ok(())
    }

    /// Whether `ip` is one of the node-local addresses or in `vip_cidr` (local once set up).
    pub fn makes_local(&self, ip: IpAddr, vip_cidr: IpNet) -> bool {
        vip_cidr.contains(&ip) || self.addresses.iter().any(|a| a.addr() == ip)
    }
}

/// Why the datapath could not be set up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// An interface of the name exists and is not a dummy (nor an empty bridge): someone
    /// else's, never taken over.
    #[error(
        "interface {interface} exists and is {what}, not a dummy interface: the gateway only takes over a dummy interface (or an empty bridge) of its own. Set datapath.interface to another name, or delete it (`ip link del {interface}`) if it is a leftover"
    )]
    Clash { interface: String, what: String },
    /// The kernel refused a change for lack of CAP_NET_ADMIN.
    #[error(
        "cannot set up the node datapath on {interface}: the kernel refused `{refused}` (permission denied). The gateway needs the CAP_NET_ADMIN capability for this (Kubernetes: securityContext.capabilities.add: [NET_ADMIN]; systemd: AmbientCapabilities=CAP_NET_ADMIN). Or run, as root, before the gateway starts (it then finds them done and needs no capability):\n{}{}",
        commands.iter().map(|c| format!("    {c}")).collect::<Vec<_>>().join("\n"),
        if commands.iter().any(|c| c.ends_with("type dummy")) {
            format!("\n(on a kernel without the dummy driver, `ip link add {interface} type bridge` instead of the first)")
        } else {
            String::new()
        }
    )]
    Permission {
        interface: String,
        refused: String,
        /// Every command still missing, in order.
        commands: Vec<String>,
    },
    /// Another netlink failure.
    #[error("cannot set up the node datapath: `{step}` failed: {message}")]
    Netlink { step: String, message: String },
}

/// What the config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub interface: String,
    pub addresses: Vec<IpNet>,
    pub vip_cidr: IpNet,
}

impl Desired {
    pub fn new(config: &DatapathConfig, vip_cidr: IpNet) -> Self {
        Self {
            interface: config.interface.clone(),
            addresses: config.addresses.clone(),
            // The kernel stores a route's destination without host bits.
            vip_cidr: vip_cidr.trunc(),
        }
    }

    /// The `ip` commands that set everything up by hand (what an operator runs instead of
    /// granting CAP_NET_ADMIN).
    pub fn commands(&self) -> Vec<String> {
        let all = plan(self, &Observed::default()).unwrap_or_default();
        all.iter().map(|s| s.command(&self.interface)).collect()
    }
}

/// The kernel's state that matters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The interface of the configured name, if there is one.
    pub link: Option<ObservedLink>,
    /// Addresses on that interface.
    pub addresses: Vec<IpNet>,
    /// `local` routes in the local table: (destination, interface name if known).
    pub local_routes: Vec<(IpNet, Option<String>)>,
}

/// One interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedLink {
    pub index: u32,
    /// The link kind (`dummy`, `veth`, ...); `None` for a device without one (a NIC).
    pub kind: Option<String>,
    pub up: bool,
    /// Interfaces enslaved to it (a bridge's ports).
    pub ports: usize,
}

/// One change the set-up makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    CreateDummy,
    SetUp,
    AddAddress(IpNet),
    /// The AnyIP route: every address of the range is local.
    AddLocalRoute(IpNet),
}

impl Step {
    /// The `ip` command that makes the same change.
    pub fn command(&self, interface: &str) -> String {
        match self {
            Step::CreateDummy => format!("ip link add {interface} type dummy"),
            Step::SetUp => format!("ip link set {interface} up"),
            Step::AddAddress(a) => format!("ip addr add {a} dev {interface}"),
            Step::AddLocalRoute(r) => format!("ip route add local {r} dev {interface} table local"),
        }
    }
}

/// The steps still missing, in the order they must run. Pure.
///
/// An interface of the name that is not a dummy is refused ([`DatapathError::Clash`]). A
/// `local` route of the VIP range on another device (an operator's `dev lo`) counts as done:
/// the VIPs are local either way, and adding ours would clash with it.
pub fn plan(desired: &Desired, observed: &Observed) -> Result<Vec<Step>, DatapathError> {
    let mut steps = Vec::new();
    match &observed.link {
        None => steps.extend([Step::CreateDummy, Step::SetUp]),
        Some(link) if !owned_kind(link) => {
            return Err(DatapathError::Clash {
                interface: desired.interface.clone(),
                what: match &link.kind {
                    Some(kind) if link.ports > 0 => {
                        format!("a {kind} interface with {} ports", link.ports)
                    }
                    Some(kind) => format!("a {kind} interface"),
                    None => "a device without a link kind (a network card?)".into(),
                },
            });
        }
        Some(link) if !link.up => steps.push(Step::SetUp),
        Some(_) => {}
    }
    for a in &desired.addresses {
        if !observed.addresses.contains(a) {
            steps.push(Step::AddAddress(*a));
        }
    }
    if !observed
        .local_routes
        .iter()
        .any(|(dst, _)| *dst == desired.vip_cidr)
    {
        steps.push(Step::AddLocalRoute(desired.vip_cidr));
    }
    Ok(steps)
}

/// Whether an existing interface is one the gateway may own: a dummy, or a bridge without
/// ports (what it creates on a kernel without the dummy driver).
fn owned_kind(link: &ObservedLink) -> bool {
    match link.kind.as_deref() {
        Some("dummy") => true,
        Some("bridge") => link.ports == 0,
        _ => false,
    }
}

/// Sets the datapath up (see the module docs): reads the kernel's state, plans, applies.
/// Idempotent: what exists is kept, and a change that races another process's (EEXIST)
/// counts as done.
pub async fn prepare(config: &DatapathConfig, vip_cidr: IpNet) -> Result<(), DatapathError> {
    let desired = Desired::new(config, vip_cidr);
    let netlink_error = |step: &str, e: &dyn std::fmt::Display| DatapathError::Netlink {
        step: step.to_owned(),
        message: e.to_string(),
    };
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| netlink_error("open a netlink socket", &e))?;
    let connection = tokio::spawn(connection);
    let result = apply(&handle, &desired).await;
    connection.abort();
    result
}

async fn apply(handle: &Handle, desired: &Desired) -> Result<(), DatapathError> {
    let observed = observe(handle, desired).await?;
    let steps = plan(desired, &observed)?;
    if steps.is_empty() {
        let route_dev = observed
            .local_routes
            .iter()
            .find(|(dst, _)| *dst == desired.vip_cidr)
            .and_then(|(_, dev)| dev.clone())
            .unwrap_or_else(|| "?".into());
        tracing::info!(
            interface = %desired.interface,
            vip_cidr = %desired.vip_cidr,
            route_dev = %route_dev,
            addresses = ?desired.addresses,
            "node datapath already set up (by an operator, or the gateway this one replaces): nothing to change"
        );
        return Ok(());
    }
    let mut index = observed.link.as_ref().map(|l| l.index);
    for (i, step) in steps.iter().enumerate() {
        let command = step.command(&desired.interface);
        let result = run_step(handle, desired, step, &mut index).await;
        match result {
            Ok(()) => tracing::info!(%command, "node datapath: done"),
            Err(code) if code == EEXIST => {
                tracing::info!(%command, "node datapath: exists already (set up meanwhile)")
            }
            Err(code) if code == EPERM => {
                return Err(DatapathError::Permission {
                    interface: desired.interface.clone(),
                    refused: command,
                    commands: steps[i..]
                        .iter()
                        .map(|s| s.command(&desired.interface))
                        .collect(),
                });
            }
            Err(code) => {
                return Err(DatapathError::Netlink {
                    step: command,
                    message: std::io::Error::from_raw_os_error(code).to_string(),
                });
            }
        }
    }
    tracing::info!(
        interface = %desired.interface,
        vip_cidr = %desired.vip_cidr,
        addresses = ?desired.addresses,
        "node datapath set up: the VIP range is local on this node (kept on exit for the next gateway)"
    );
    Ok(())
}

/// Runs one step; the error is the errno the kernel answered.
async fn run_step(
    handle: &Handle,
    desired: &Desired,
    step: &Step,
    index: &mut Option<u32>,
) -> Result<(), i32> {
    let iface = &desired.interface;
    match step {
        Step::CreateDummy => {
            let mut added = handle
                .link()
                .add(LinkDummy::new(iface).build())
                .execute()
                .await
                .map_err(|e| errno(&e));
            if added == Err(EOPNOTSUPP) {
                tracing::warn!(
                    interface = %iface,
                    "this kernel has no dummy interface driver (CONFIG_DUMMY); creating an empty bridge instead, which holds the local addresses the same way"
                );
                added = handle
                    .link()
                    .add(LinkBridge::new(iface).build())
                    .execute()
                    .await
                    .map_err(|e| errno(&e));
            }
            // Created here or meanwhile: either way, find its index.
            if added.is_ok() || added == Err(EEXIST) {
                *index = link_index(handle, iface).await?;
            }
            added
        }
        Step::SetUp => {
            let i = index.ok_or(ENODEV)?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(|e| errno(&e))
        }
        Step::AddAddress(a) => {
            let i = index.ok_or(ENODEV)?;
            handle
                .address()
                .add(i, a.addr(), a.prefix_len())
                .execute()
                .await
                .map_err(|e| errno(&e))
        }
        Step::AddLocalRoute(r) => {
            let i = index.ok_or(ENODEV)?;
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(r.addr(), r.prefix_len())
                .map_err(|_| EINVAL)?
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .table_id(u32::from(TABLE_LOCAL))
                .output_interface(i)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|e| errno(&e))
        }
    }
}

/// The errno of a netlink error (EIO when the kernel's answer was not an error code).
fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map_or(0, |c| c.get().abs()),
        _ => EIO,
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, i32> {
    Ok(find_link(handle, name).await?.map(|l| l.index))
}

/// The interface `name` with its port count (every link is read: a bridge's ports name it as
/// their controller).
async fn find_link(handle: &Handle, name: &str) -> Result<Option<ObservedLink>, i32> {
    let mut links = handle.link().get().execute();
    let mut found = None;
    let mut controllers = Vec::new();
    while let Some(msg) = links.try_next().await.map_err(|e| errno(&e))? {
        let is_it = msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
        if is_it {
            found = Some(observed_link(&msg));
        }
        controllers.extend(msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(i) => Some(*i),
            _ => None,
        }));
    }
    Ok(found.map(|mut link| {
        link.ports = controllers.iter().filter(|c| **c == link.index).count();
        link
    }))
}

fn observed_link(msg: &LinkMessage) -> ObservedLink {
    let kind = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(InfoKind::Dummy) => Some("dummy".to_owned()),
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    });
    ObservedLink {
        index: msg.header.index,
        kind,
        up: msg.header.flags.contains(LinkFlags::Up),
        ports: 0,
    }
}

/// Reads the interface, its addresses and the local table's `local` routes.
async fn observe(handle: &Handle, desired: &Desired) -> Result<Observed, DatapathError> {
    let failed = |what: &str, code: i32| DatapathError::Netlink {
        step: what.to_owned(),
        message: std::io::Error::from_raw_os_error(code).to_string(),
    };
    let link = find_link(handle, &desired.interface)
        .await
        .map_err(|c| failed(&format!("ip link show {}", desired.interface), c))?;
    let mut addresses = Vec::new();
    if let Some(link) = &link {
        let mut stream = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| failed("ip addr show", errno(&e)))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(net) = ip.and_then(|ip| IpNet::new(ip, msg.header.prefix_len).ok()) {
                addresses.push(net);
            }
        }
    }
    let mut local_routes = Vec::new();
    let family = match desired.vip_cidr {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    query.header.table = TABLE_LOCAL;
    let mut stream = handle.route().get(query).execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| failed("ip route show table local", errno(&e)))?
    {
        if msg.header.kind != RouteType::Local || route_table(&msg) != u32::from(TABLE_LOCAL) {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if let Some(net) =
            dst.and_then(|ip| IpNet::new(ip, msg.header.destination_prefix_length).ok())
        {
            let dev = match oif {
                Some(i) if link.as_ref().is_some_and(|l| l.index == i) => {
                    Some(desired.interface.clone())
                }
                Some(i) => Some(format!("ifindex {i}")),
                None => None,
            };
            local_routes.push((net, dev));
        }
    }
    Ok(Observed {
        link,
        addresses,
        local_routes,
    })
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// Whether a VIP of `vip_cidr` can be bound here (the range is local), checked by binding
/// one (its first host address, an ephemeral port) and letting it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipReach {
    /// Loopback VIPs: local, for clients on this host only.
    Loopback,
    /// The range is local: VIP listeners bind and clients routed to this node reach them.
    Local,
    /// Not local: VIP listeners cannot bind, so clients cannot reach the VIPs.
    NotLocal { probe: IpAddr, error: String },
}

/// Checks whether VIPs of `vip_cidr` can be bound on this host (see [`VipReach`]).
pub fn check_vips_local(vip_cidr: IpNet) -> VipReach {
    let probe = first_host(vip_cidr);
    if probe.is_loopback() {
        return VipReach::Loopback;
    }
    match TcpListener::bind(SocketAddr::new(probe, 0)) {
        Ok(_) => VipReach::Local,
        Err(e) => VipReach::NotLocal {
            probe,
            error: e.to_string(),
        },
    }
}

/// The first host address of a range (its network address + 1 when there is room).
fn first_host(net: IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

/// The start-up warning for a range that is not local (`None` when it is). Pure.
pub fn reach_warning(vip_cidr: IpNet, reach: &VipReach) -> Option<String> {
    match reach {
        VipReach::Loopback | VipReach::Local => None,
        VipReach::NotLocal { probe, error } => {
            let desired = Desired::new(&DatapathConfig::default(), vip_cidr);
            Some(format!(
                "vip_cidr {vip_cidr} is not local on this host (binding {probe} failed: {error}): VIP listeners cannot bind, so clients cannot reach the VIPs. Add a `datapath:` section (the gateway then sets the range up itself, with CAP_NET_ADMIN), or run `{}` (after `ip link add meshup0 type dummy` and `ip link set meshup0 up`) before the gateway starts; docs/datapath.md",
                desired.commands().last().cloned().unwrap_or_default()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("a network")
    }

    fn desired() -> Desired {
        Desired::new(
            &DatapathConfig {
                interface: "meshup0".into(),
                addresses: vec![net("169.254.252.53/32")],
            },
            net("169.254.253.0/24"),
        )
    }

    fn link(kind: Option<&str>, up: bool) -> Option<ObservedLink> {
        Some(ObservedLink {
            index: 7,
            kind: kind.map(str::to_owned),
            up,
            ports: 0,
        })
    }

    #[test]
    fn plans_only_what_is_missing() {
        let route = (net("169.254.253.0/24"), Some("meshup0".to_owned()));
        let addr = net("169.254.252.53/32");
        let cases: Vec<(&str, Observed, Vec<Step>)> = vec![
            (
                "nothing there: everything, in order",
                Observed::default(),
                vec![
                    Step::CreateDummy,
                    Step::SetUp,
                    Step::AddAddress(addr),
                    Step::AddLocalRoute(net("169.254.253.0/24")),
                ],
            ),
            (
                "all there (a replacement gateway): nothing",
                Observed {
                    link: link(Some("dummy"), true),
                    addresses: vec![addr],
                    local_routes: vec![route.clone()],
                },
                vec![],
            ),
            (
                "down, nothing else",
                Observed {
                    link: link(Some("dummy"), false),
                    addresses: vec![],
                    local_routes: vec![],
                },
                vec![
                    Step::SetUp,
                    Step::AddAddress(addr),
                    Step::AddLocalRoute(net("169.254.253.0/24")),
                ],
            ),
            (
                "an empty bridge (made on a kernel without the dummy driver), all there",
                Observed {
                    link: link(Some("bridge"), true),
                    addresses: vec![addr],
                    local_routes: vec![route.clone()],
                },
                vec![],
            ),
            (
                "the route on lo (an operator's): counts as done",
                Observed {
                    link: link(Some("dummy"), true),
                    addresses: vec![addr],
                    local_routes: vec![(net("169.254.253.0/24"), Some("ifindex 1".into()))],
                },
                vec![],
            ),
            (
                "another range's route does not count",
                Observed {
                    link: link(Some("dummy"), true),
                    addresses: vec![addr, net("10.9.9.9/32")],
                    local_routes: vec![(net("169.254.0.0/16"), None)],
                },
                vec![Step::AddLocalRoute(net("169.254.253.0/24"))],
            ),
            (
                "the address with another prefix does not count",
                Observed {
                    link: link(Some("dummy"), true),
                    addresses: vec![net("169.254.252.53/24")],
                    local_routes: vec![route.clone()],
                },
                vec![Step::AddAddress(addr)],
            ),
        ];
        for (name, observed, want) in cases {
            assert_eq!(plan(&desired(), &observed).expect(name), want, "{name}");
        }
    }

    #[test]
    fn an_interface_that_is_not_a_dummy_is_refused() {
        for (kind, ports, what) in [
            (Some("veth"), 0, "a veth interface"),
            (Some("bridge"), 2, "a bridge interface with 2 ports"),
            (None, 0, "without a link kind"),
        ] {
            let mut found = link(kind, true);
            if let Some(l) = found.as_mut() {
                l.ports = ports;
            }
            let observed = Observed {
                link: found,
                ..Observed::default()
            };
            let err = plan(&desired(), &observed)
                .expect_err("someone else's interface")
                .to_string();
            assert!(err.contains(what), "{err}");
            assert!(err.contains("datapath.interface"), "{err}");
            assert!(err.contains("ip link del meshup0"), "{err}");
        }
    }

    #[test]
    fn commands_are_the_manual_setup() {
        assert_eq!(
            desired().commands(),
            [
                "ip link add meshup0 type dummy",
                "ip link set meshup0 up",
                "ip addr add 169.254.252.53/32 dev meshup0",
                "ip route add local 169.254.253.0/24 dev meshup0 table local",
            ]
        );
        // Host bits of the range are dropped, as the kernel stores it.
        let d = Desired::new(&DatapathConfig::default(), net("169.254.253.9/24"));
        assert_eq!(
            d.commands().last().map(String::as_str),
            Some("ip route add local 169.254.253.0/24 dev meshup0 table local")
        );
    }

    #[test]
    fn permission_error_names_the_capability_and_the_commands() {
        let err = DatapathError::Permission {
            interface: "meshup0".into(),
            refused: "ip link add meshup0 type dummy".into(),
            commands: desired().commands(),
        }
        .to_string();
        assert!(err.contains("CAP_NET_ADMIN"), "{err}");
        assert!(err.contains("NET_ADMIN]"), "{err}");
        for c in desired().commands() {
            assert!(
                err.contains(&format!("    {c}\n")) || err.ends_with(&c),
                "{c}: {err}"
            );
        }
    }

    #[test]
    fn config_is_checked() {
        let vips = net("169.254.253.0/24");
        let ok = DatapathConfig {
            interface: "meshup0".into(),
            addresses: vec![net("169.254.252.53/32")],
        };
        ok.validate(vips).expect("valid");
        assert!(ok.makes_local("169.254.252.53".parse().expect("ip"), vips));
        assert!(ok.makes_local("169.254.253.77".parse().expect("ip"), vips));
        assert!(!ok.makes_local("169.254.252.54".parse().expect("ip"), vips));
        let cases: Vec<(DatapathConfig, IpNet, &str)> = vec![
            (
                DatapathConfig {
                    interface: "a-very-long-interface".into(),
                    ..ok.clone()
                },
                vips,
                "datapath.interface",
            ),
            (
                DatapathConfig {
                    interface: "lo".into(),
                    ..ok.clone()
                },
                vips,
                "cannot be lo",
            ),
            (
                DatapathConfig {
                    interface: "a/b".into(),
                    ..ok.clone()
                },
                vips,
                "datapath.interface",
            ),
            (ok.clone(), net("127.77.0.0/16"), "loopback range"),
            (
                DatapathConfig {
                    addresses: vec![net("169.254.253.53/32")],
                    ..ok.clone()
                },
                vips,
                "datapath.addresses[0]: 169.254.253.53/32 is inside vip_cidr",
            ),
            (
                DatapathConfig {
                    addresses: vec![net("169.254.252.53/32"), net("169.254.252.53/32")],
                    ..ok.clone()
                },
                vips,
                "datapath.addresses[1]: 169.254.252.53/32 is listed twice",
            ),
            (
                DatapathConfig {
                    addresses: vec![net("127.0.0.53/32")],
                    ..ok.clone()
                },
                vips,
                "datapath.addresses[0]",
            ),
        ];
        for (config, vips, want) in cases {
            let (field, message) = config.validate(vips).expect_err(want);
            let err = format!("{field}: {message}");
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn a_range_that_is_not_local_is_warned_about() {
        let vips = net("169.254.253.0/24");
        assert_eq!(reach_warning(vips, &VipReach::Local), None);
        assert_eq!(reach_warning(vips, &VipReach::Loopback), None);
        let warning = reach_warning(
            vips,
            &VipReach::NotLocal {
                probe: "169.254.253.1".parse().expect("ip"),
                error: "Cannot assign requested address (os error 99)".into(),
            },
        )
        .expect("a warning");
        assert!(
            warning.contains("clients cannot reach the VIPs"),
            "{warning}"
        );
        assert!(warning.contains("datapath:"), "{warning}");
        assert!(
            warning.contains("ip route add local 169.254.253.0/24 dev meshup0 table local"),
            "{warning}"
        );
        assert_eq!(
            check_vips_local(net("127.77.0.0/16")),
            VipReach::Loopback,
            "loopback ranges are local without a datapath"
        );
        assert_eq!(
            first_host(vips),
            "169.254.253.1".parse::<IpAddr>().expect("ip")
        );
    }
}
