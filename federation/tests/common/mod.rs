//! Shared pieces of the federation integration tests.
//!
//! The etcd harness lives in the `meshup-tests` crate (`tests/src/`), which depends on the
//! gateway; including its files by path keeps these tests independent of the gateway build.
#![allow(dead_code)]

#[path = "../../../tests/src/etcd.rs"]
pub mod etcd;
#[path = "../../../tests/src/eventually.rs"]
pub mod eventually;
