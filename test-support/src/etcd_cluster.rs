//! A real three-member etcd cluster on loopback, for leader loss and quorum loss.
//!
//! Each member is an [`EtcdServer`] (same spawning, logging, health polling and restart)
//! with its own free client and peer ports and temp data dir; the three are started
//! together (a member is healthy only once a leader is elected, which needs a quorum) and
//! then waited on one by one.
//!
//! Faults, per member:
//! - [`EtcdCluster::kill9`]: SIGKILL, a crash. [`EtcdCluster::restart`] starts it again on
//!   the same ports and data dir, so it rejoins as the same member.
//! - [`EtcdCluster::stop`] / [`EtcdCluster::resume`]: SIGSTOP / SIGCONT. This is how a
//!   member *outage* is modelled, because it is the outage clients handle worst and the
//!   one regions see most (a partition, a hung host): the TCP connections stay open and
//!   nothing answers, no RST tells a client to go elsewhere, and the member comes back with
//!   its state as it was, as a healed partition does. A killed member would refuse
//!   connections at once, which every client handles.
//!
//! [`EtcdCluster::leader`] asks each running member for its status over etcd's JSON gateway
//! (`POST /v3/maintenance/status`) and names the leader a quorum follows;
//! [`EtcdCluster::wait_leader`] polls it every few milliseconds and returns when a (new)
//! leader is first seen.
//!
//! Like [`EtcdServer`], the methods block the calling thread; call them from a
//! multi-thread tokio runtime or `spawn_blocking`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::etcd::{EtcdEndpoints, EtcdServer, START_ATTEMPTS, etcdctl_at, require_binary};

/// Members of an [`EtcdCluster`].
pub const MEMBERS: usize = 3;
/// How often [`EtcdCluster::wait_leader`] asks the members.
const LEADER_POLL: Duration = Duration::from_millis(10);
/// The key [`EtcdCluster::wait_writable`] writes, and how long one attempt may take.
const WRITE_PROBE_KEY: &str = "/etcd-cluster-write-probe";
const WRITE_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Timeout of one status request (a paused member is not asked at all).
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);

/// Three etcd members on 127.0.0.1. Every member is killed (SIGKILL) on drop, paused ones
/// too.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
    /// Members stopped with SIGSTOP (alive, answering nothing).
    paused: [bool; MEMBERS],
}

/// What one member says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    pub member_id: u64,
    /// The leader this member follows; 0 while it knows none.
    pub leader: u64,
    pub raft_term: u64,
}

impl EtcdCluster {
    /// Starts three members with etcd's default timing (heartbeat 100 ms, election
    /// timeout 1 s) and waits until every one is healthy (a leader is elected).
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Like [`EtcdCluster::start`], with extra flags for every member (kept across
    /// restarts), e.g. `--election-timeout=500`.
    pub fn start_with_args(extra_args: &[&str]) -> Self {
        require_binary("etcd");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(extra_args) {
                Ok(cluster) => return cluster,
                Err(e) => last_error = Some(e),
            }
        }
        panic!(
            "a {MEMBERS}-member etcd did not start after {START_ATTEMPTS} attempts: {last_error:?}"
        );
    }

    fn try_start(extra_args: &[&str]) -> anyhow::Result<Self> {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut members = (0..MEMBERS)
            .map(|_| EtcdServer::prepare(extra_args, false, host))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let initial_cluster = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("member-{i}={}", m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for (i, m) in members.iter_mut().enumerate() {
            m.name = format!("member-{i}");
            m.initial_cluster = initial_cluster.clone();
        }
        // All first: no member is healthy before a quorum runs.
        for m in &mut members {
            m.spawn()?;
        }
        for i in 0..MEMBERS {
            if let Err(e) = members[i].wait_healthy() {
                for m in &mut members {
                    m.kill_child();
                }
                return Err(e.context(format!("member {i}")));
            }
        }
        Ok(Self {
            members,
            paused: [false; MEMBERS],
        })
    }

    /// Member `i` (its endpoint, log, pid).
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// The client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// Members that run and are not paused.
    pub fn answering(&self) -> Vec<usize> {
        (0..MEMBERS)
            .filter(|&i| self.members[i].is_running() && !self.paused[i])
            .collect()
    }

    /// The status member `i` reports (its id, the leader it follows, its term).
    pub fn status(&self, i: usize) -> anyhow::Result<MemberStatus> {
        member_status(self.members[i].client_addr())
    }

    /// The member a quorum follows as leader, asked of every answering member now; `None`
    /// during an election or without a quorum.
    pub fn leader(&self) -> Option<usize> {
        let statuses: Vec<(usize, MemberStatus)> = self
            .answering()
            .into_iter()
            .filter_map(|i| self.status(i).ok().map(|s| (i, s)))
            .collect();
        leader_of(&statuses)
    }

    /// Polls [`EtcdCluster::leader`] until a leader other than `not` is followed by a
    /// quorum; returns it and the instant it was first seen (at most [`LEADER_POLL`] plus
    /// one status round trip after the election). Fails after `timeout`.
    pub fn wait_leader(
        &self,
        not: Option<usize>,
        timeout: Duration,
    ) -> anyhow::Result<(usize, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader().filter(|l| Some(*l) != not) {
                return Ok((leader, Instant::now()));
            }
            if Instant::now() >= deadline {
                let statuses: Vec<_> = (0..MEMBERS)
                    .map(|i| (i, self.paused[i], self.status(i).map_err(|e| e.to_string())))
                    .collect();
                bail!("no leader (other than {not:?}) within {timeout:?}: {statuses:?}");
            }
            std::thread::sleep(LEADER_POLL);
        }
    }

    /// Polls a write through the answering members until one is committed, and returns the
    /// instant that attempt began (the cluster was writable at the latest when it ended). A
    /// member just resumed from SIGSTOP reports the leader it followed before it stopped, so
    /// [`EtcdCluster::wait_leader`] can name a leader whose term the cluster is leaving: in
    /// one run the resumed pair named its old leader at once while requests were answered
    /// "no leader" for 6 s more. A committed write proves a quorum follows a leader. The key
    /// lies outside every catalog prefix. Fails after `timeout`.
    pub fn wait_writable(&self, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Instant::now();
            let put = self.etcdctl(&[
                "put",
                WRITE_PROBE_KEY,
                "1",
                &format!("--command-timeout={}ms", WRITE_PROBE_TIMEOUT.as_millis()),
            ]);
            match put {
                Ok(_) => return Ok(attempt),
                Err(e) if Instant::now() >= deadline => {
                    bail!("no write committed within {timeout:?}: {e:#}")
                }
                Err(_) => std::thread::sleep(LEADER_POLL),
            }
        }
    }

    /// SIGKILL member `i`; returns the instant just before.
    pub fn kill9(&mut self, i: usize) -> Instant {
        let at = Instant::now();
        self.members[i].kill9();
        self.paused[i] = false;
        at
    }

    /// Starts member `i` again after [`EtcdCluster::kill9`] on its ports and data dir and
    /// waits until it is healthy (back in the cluster).
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
        self.paused[i] = false;
    }

    /// SIGKILL every member: the whole cluster down, as a region losing its etcd (an outage
    /// with connections refused; [`EtcdCluster::stop`] models one that hangs). Returns the
    /// instant just before.
    pub fn kill_all(&mut self) -> Instant {
        let at = Instant::now();
        for i in 0..MEMBERS {
            self.kill9(i);
        }
        at
    }

    /// Starts every member again after [`EtcdCluster::kill_all`], on their ports and data
    /// dirs, all first (no member is healthy before a quorum runs), then waits until each is
    /// healthy. Returns the instant just before the first start.
    pub fn restart_all(&mut self) -> anyhow::Result<Instant> {
        let at = Instant::now();
        for m in &mut self.members {
            m.kill_child();
            m.spawn()?;
        }
        for (i, m) in self.members.iter_mut().enumerate() {
            m.wait_healthy().with_context(|| format!("member {i}"))?;
        }
        self.paused = [false; MEMBERS];
        Ok(at)
    }

    /// SIGSTOP member `i` (see the module docs for why an outage is a pause); returns the
    /// instant just before.
    pub fn stop(&mut self, i: usize) -> Instant {
        let at = Instant::now();
        self.members[i].pause();
        self.paused[i] = true;
        at
    }

    /// SIGCONT member `i` after [`EtcdCluster::stop`]; returns the instant just before.
    pub fn resume(&mut self, i: usize) -> Instant {
        let at = Instant::now();
        self.members[i].resume();
        self.paused[i] = false;
        at
    }

    /// `etcdctl` against the answering members.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let endpoints: Vec<String> = self
            .answering()
            .into_iter()
            .map(|i| self.members[i].endpoint())
            .collect();
        anyhow::ensure!(!endpoints.is_empty(), "no etcd member answers");
        etcdctl_at(&endpoints, args, None)
    }
}

impl EtcdEndpoints for EtcdCluster {
    fn endpoints(&self) -> Vec<String> {
        EtcdCluster::endpoints(self)
    }
}

/// The leader a quorum of [`MEMBERS`] follows, given what each answering member says: the
/// member whose id a majority names as leader and that names itself. Pure, so it is
/// table-tested.
pub fn leader_of(statuses: &[(usize, MemberStatus)]) -> Option<usize> {
    let quorum = MEMBERS / 2 + 1;
    statuses.iter().find_map(|&(i, s)| {
        let followers = statuses
            .iter()
            .filter(|(_, o)| o.leader == s.member_id)
            .count();
        (s.leader == s.member_id && s.member_id != 0 && followers >= quorum).then_some(i)
    })
}

/// `POST /v3/maintenance/status` on one member's client port (plain HTTP/1.0).
fn member_status(addr: SocketAddr) -> anyhow::Result<MemberStatus> {
    let mut stream = TcpStream::connect_timeout(&addr, STATUS_TIMEOUT)?;
    stream.set_read_timeout(Some(STATUS_TIMEOUT))?;
    stream.set_write_timeout(Some(STATUS_TIMEOUT))?;
    stream.write_all(
        b"POST /v3/maintenance/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no HTTP body in {response:?}"))?;
    parse_status(body)
}

/// The fields of a status answer (the JSON gateway writes 64-bit numbers as strings).
fn parse_status(body: &str) -> anyhow::Result<MemberStatus> {
    let json: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("status is not JSON: {body:?}"))?;
    let number = |v: &serde_json::Value| -> anyhow::Result<u64> {
        match v {
            serde_json::Value::String(s) => Ok(s.parse()?),
            serde_json::Value::Number(n) => n.as_u64().context("not a u64"),
            // Zero values are left out of proto3 JSON.
            serde_json::Value::Null => Ok(0),
            other => bail!("not a number: {other}"),
        }
    };
    Ok(MemberStatus {
        member_id: number(&json["header"]["member_id"])?,
        leader: number(&json["leader"])?,
        raft_term: number(&json["raftTerm"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(member_id: u64, leader: u64) -> MemberStatus {
        MemberStatus {
            member_id,
            leader,
            raft_term: 2,
        }
    }

    #[test]
    fn the_leader_is_the_member_a_quorum_follows_and_that_leads_itself() {
        type Case<'a> = (&'a [(usize, MemberStatus)], Option<usize>);
        let cases: &[Case] = &[
            // All three follow member 2 (id 30).
            (&[(0, s(10, 30)), (1, s(20, 30)), (2, s(30, 30))], Some(2)),
            // The leader and one follower answer: a quorum.
            (&[(0, s(10, 10)), (2, s(30, 10))], Some(0)),
            // Election in progress: nobody follows anybody.
            (&[(0, s(10, 0)), (1, s(20, 0))], None),
            // One member alone believes it leads (a resumed old leader): no quorum.
            (&[(0, s(10, 10)), (1, s(20, 30)), (2, s(30, 30))], Some(2)),
            (&[(0, s(10, 10))], None),
            // Followers name a member that did not answer: not confirmed.
            (&[(0, s(10, 30)), (1, s(20, 30))], None),
            (&[], None),
        ];
        for (statuses, want) in cases {
            assert_eq!(leader_of(statuses), *want, "{statuses:?}");
        }
    }

    #[test]
    fn status_answers_of_the_json_gateway_parse() {
        let body = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"5","raft_term":"3"},"version":"3.4.23","dbSize":"20480","leader":"10276657743932975437","raftIndex":"9","raftTerm":"3","raftAppliedIndex":"9","dbSizeInUse":"20480"}"#;
        assert_eq!(
            parse_status(body).expect("parses"),
            MemberStatus {
                member_id: 10276657743932975437,
                leader: 10276657743932975437,
                raft_term: 3
            }
        );
        // No leader: the field is left out.
        let body = r#"{"header":{"member_id":"7"},"raftTerm":"4"}"#;
        assert_eq!(parse_status(body).expect("parses").leader, 0);
        assert!(parse_status("not json").is_err());
    }
}
