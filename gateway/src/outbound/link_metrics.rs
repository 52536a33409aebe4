//! The peer links as Prometheus series, read at scrape time from the links snapshot the
//! gateway refreshes every second (`app::spawn_link_refresh`): RTT and packet counts per
//! destination cluster, and the age of the oldest live connection. Nothing is recorded on the
//! data path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshup_core::names::ClusterName;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tokio::sync::watch;

use super::PeerLink;
use crate::tunnel::metrics::Label;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    source_cluster: Label,
    destination_cluster: Label,
}

/// One destination cluster's links, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ClusterLinks {
    /// The highest smoothed RTT among the cluster's gateways (the one that limits it).
    rtt: Duration,
    lost: u64,
    sent: u64,
    /// The oldest live connection's age.
    oldest: Duration,
}

/// Sums the links per destination cluster. Pure.
fn per_cluster(links: &[PeerLink]) -> BTreeMap<&ClusterName, ClusterLinks> {
    let mut out: BTreeMap<&ClusterName, ClusterLinks> = BTreeMap::new();
    for l in links {
        let c = out.entry(&l.peer.cluster).or_default();
        c.rtt = c.rtt.max(l.rtt);
        c.lost += l.lost_packets;
        c.sent += l.sent_packets;
        c.oldest = c.oldest.max(l.age);
    }
    out
}

/// Encodes `meshup_tunnel_rtt_seconds`, `meshup_tunnel_connection_age_seconds`,
/// `meshup_tunnel_lost_packets_total` and `meshup_tunnel_sent_packets_total`.
#[derive(Debug)]
pub struct LinkCollector {
    local: ClusterName,
    links: watch::Receiver<Arc<Vec<PeerLink>>>,
}

impl LinkCollector {
    pub fn new(local: ClusterName, links: watch::Receiver<Arc<Vec<PeerLink>>>) -> Self {
        Self { local, links }
    }
}

impl Collector for LinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let links = self.links.borrow().clone();
        let clusters = per_cluster(&links);
        let labels = |c: &ClusterName| PairLabels {
            source_cluster: Label::from(&self.local),
            destination_cluster: Label::from(c),
        };
        let mut rtt = encoder.encode_descriptor(
            "tunnel_rtt_seconds",
            "Smoothed QUIC round-trip time to a peer cluster (the highest among its gateways' live connections)",
            None,
            MetricType::Gauge,
        )?;
        for (c, l) in &clusters {
            let set = labels(c);
            rtt.encode_family(&set)?
                .encode_gauge(&l.rtt.as_secs_f64())?;
        }
        let mut age = encoder.encode_descriptor(
            "tunnel_connection_age_seconds",
            "Age of the oldest live QUIC connection to a peer cluster (connections are replaced before half the peer certificate's lifetime)",
            None,
            MetricType::Gauge,
        )?;
        for (c, l) in &clusters {
            let set = labels(c);
            age.encode_family(&set)?
                .encode_gauge(&l.oldest.as_secs_f64())?;
        }
        for (name, help, value) in [
            (
                "tunnel_lost_packets",
                "QUIC packets declared lost on the live connections to a peer cluster (restarts with each connection)",
                (|l: &ClusterLinks| l.lost) as fn(&ClusterLinks) -> u64,
            ),
            (
                "tunnel_sent_packets",
                "QUIC packets sent on the live connections to a peer cluster (restarts with each connection)",
                |l: &ClusterLinks| l.sent,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (c, l) in &clusters {
                let set = labels(c);
                m.encode_family(&set)?
                    .encode_counter::<NoLabelSet, _, u64>(&value(l), None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::pool::PeerKey;

    fn link(cluster: &str, port: u16, rtt_ms: u64, lost: u64, sent: u64) -> PeerLink {
        let age = Duration::from_secs(rtt_ms * 10);
        PeerLink {
            peer: PeerKey {
                cluster: ClusterName::new(cluster).expect("cluster"),
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            },
            rtt: Duration::from_millis(rtt_ms),
            mtu: 1200,
            lost_packets: lost,
            sent_packets: sent,
            black_holes: 0,
            open_streams: 0,
            age,
        }
    }

    #[test]
    fn links_sum_per_cluster_with_the_worst_rtt() {
        let links = [
            link("west", 1, 3, 1, 100),
            link("west", 2, 7, 2, 50),
            link("north", 3, 20, 0, 10),
        ];
        let got: Vec<(String, ClusterLinks)> = per_cluster(&links)
            .into_iter()
            .map(|(c, l)| (c.to_string(), l))
            .collect();
        let want = [("north", 20, 0, 10, 200), ("west", 7, 3, 150, 70)].map(
            |(c, rtt, lost, sent, oldest)| {
                (
                    c.to_owned(),
                    ClusterLinks {
                        rtt: Duration::from_millis(rtt),
                        lost,
                        sent,
                        oldest: Duration::from_secs(oldest),
                    },
                )
            },
        );
        assert_eq!(got, want);
    }
}
