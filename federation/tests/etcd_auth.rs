//! With etcd authentication on, a cluster's gateways can write only under their own
//! cluster's prefix, while reading the whole catalog (promise 8).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshup_core::model::encode;
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::store::{self, Store, StoreError};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_write_only_under_their_own_cluster() {
    let fixture = Fixture::etcd().await;
    let Fixture::Etcd { server, .. } = &fixture else {
        unreachable!("Fixture::etcd builds an etcd fixture")
    };
    let root = layout().root().to_owned();
    let ctl = |args: &[&str]| {
        server
            .etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e:#}"))
    };
    let own = format!("{root}clusters/east/");
    let vips = format!("{root}vips/east/");
    let claims = format!("{root}vip-claims/east/");
    tokio::task::block_in_place(|| {
        ctl(&["user", "add", "root", "--new-user-password=root-pw"]);
        ctl(&["user", "grant-role", "root", "root"]);
        ctl(&["role", "add", "gw-east"]);
        ctl(&[
            "role",
            "grant-permission",
            "gw-east",
            "--prefix=true",
            "read",
            &root,
        ]);
        for prefix in [&own, &vips, &claims] {
            ctl(&[
                "role",
                "grant-permission",
                "gw-east",
                "--prefix=true",
                "readwrite",
                prefix,
            ]);
        }
        ctl(&["user", "add", "east-gw", "--new-user-password=east-pw"]);
        ctl(&["user", "grant-role", "east-gw", "gw-east"]);
        ctl(&["auth", "enable"]);
    });
    within(Duration::from_secs(60), async {
        // Through the configuration section, as the gateway does it: the password comes
        // from a file.
        let dir = tempfile::tempdir().expect("temp dir");
        let password_file = dir.path().join("etcd-password");
        std::fs::write(&password_file, "east-pw\n").expect("write password file");
        let config = CatalogConfig {
            backend: Backend::Etcd,
            endpoints: vec![server.endpoint()],
            prefix: "/meshup-test".into(),
            username: Some("east-gw".into()),
            password_file: Some(password_file),
            ..Default::default()
        };
        let east: Arc<dyn Store> = config
            .connect(None)
            .await
            .expect("east connects with its credentials");
        assert_eq!(config.layout().expect("layout"), layout());
        let cancel = CancellationToken::new();
        let publisher = publish_pay(east.clone(), "east", 3, &cancel);
        let view = watch_catalog(east.clone(), &cancel);
        let mut snaps = view.snapshots();
        let ok = tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.export_count() == 1),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(ok, "east's own records were not published or not readable");

        // Writing as another cluster is refused by etcd, not merely by convention.
        let west_key = layout().gateway(&cluster("west"), &gateway_id("gw-0"));
        let denied = store::put(east.as_ref(), west_key, encode(&gateway("west", "gw-0")), 0).await;
        assert!(matches!(denied, Err(StoreError::Rejected(_))), "{denied:?}");
        let west_vip = format!("{root}vips/west/prod/pay");
        let denied = store::put(east.as_ref(), west_vip, "x", 0).await;
        assert!(matches!(denied, Err(StoreError::Rejected(_))), "{denied:?}");
        // A wrong password fails at connect with a clear, non-retryable error.
        let wrong = EtcdStore::connect(EtcdOptions {
            endpoints: vec![server.endpoint()],
            user: Some(("east-gw".into(), "nope".into())),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await;
        assert!(matches!(&wrong, Err(e) if !e.is_retryable()), "{wrong:?}");
        publisher.shutdown().await;
        cancel.cancel();
    })
    .await;
}
