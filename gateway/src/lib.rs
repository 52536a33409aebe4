//! meshup-gateway: the east-west gateway and the `meshup` binary.
//!
//! One gateway process runs, per cluster: a QUIC endpoint ([`tunnel`]), outbound listeners on
//! VIPs ([`outbound`]), an inbound stream server ([`inbound`]), the DNS server (meshup-dns), a
//! catalog publisher and watcher (meshup-federation), endpoint probes ([`health`]) and the
//! admin HTTP server ([`admin`]) and the gRPC admin API ([`grpc`]); [`cli`] holds the
//! `meshup` client commands that talk to that API. [`exports`] holds the exports (the config
//! file's and the API's) as they change at runtime, and [`reload`] reloads the config file on
//! SIGHUP and when it changes. [`datapath`] makes the VIP range local on a node. [`app`] wires them together: bind, run, drain.

pub mod admin;
pub mod app;
pub mod certs;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod demo;
pub mod exports;
pub mod grace;
pub mod grpc;
pub mod handover;
pub mod health;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod notify;
pub mod outbound;
pub mod readiness;
pub mod reload;
pub mod tunnel;
