//! The catalog over TLS to etcd, with client certificates (`--client-cert-auth`), configured
//! through the `catalog.tls` section as a gateway does it; and what a gateway without the
//! right certificates gets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::tls::Pki;
use common::*;
use meshup_federation::config::{Backend, CatalogConfig, TlsConfig};
use meshup_federation::store::{self, Store};
use tokio_util::sync::CancellationToken;

fn tls_config(server: &EtcdServer, ca: &Pki, client: Option<&Pki>) -> CatalogConfig {
    CatalogConfig {
        backend: Backend::Etcd,
        endpoints: vec![server.endpoint()],
        prefix: "/meshup-test".into(),
        tls: Some(TlsConfig {
            ca: ca.ca.clone(),
            cert: client.map(|p| p.client_cert.clone()),
            key: client.map(|p| p.client_key.clone()),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_syncs_over_mutual_tls_and_refuses_without_the_right_certificates() {
    let server = tokio::task::spawn_blocking(EtcdServer::start_tls)
        .await
        .expect("etcd start task");
    within(Duration::from_secs(60), async {
        let pki = server.tls().expect("a TLS etcd").clone();
        assert!(server.endpoint().starts_with("https://"));

        let config = tls_config(&server, &pki, Some(&pki));
        let store: Arc<dyn Store> = config
            .connect(None)
            .await
            .expect("connects with the CA and a client certificate");
        let cancel = CancellationToken::new();
        let publisher = publish_pay(store.clone(), "east", 3, &cancel);
        let view = watch_catalog(store.clone(), &cancel);
        let mut snaps = view.snapshots();
        let synced = tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.export_count() == 1),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(synced, "publish → watch did not round-trip over TLS");
        publisher.shutdown().await;
        cancel.cancel();

        // No client certificate: etcd refuses it. In TLS 1.3 the client may learn that only
        // after its first request (the handshake looks complete from its side), so either
        // connect fails naming TLS, or every request fails; nothing is written either way.
        let without = tls_config(&server, &pki, None);
        let key = "/meshup-test/written-without-a-certificate".to_owned();
        match tokio::time::timeout(Duration::from_secs(20), without.connect(None)).await {
            Ok(Err(e)) => assert!(e.to_string().contains("TLS to etcd"), "{e}"),
            Ok(Ok(bare)) => {
                let put = store::put(bare.as_ref(), key.clone(), "x", 0).await;
                assert!(
                    put.is_err(),
                    "a write without a client certificate: {put:?}"
                );
            }
            Err(_) => panic!("connect without a client certificate hung"),
        }
        let kept = store::get(store.as_ref(), key)
            .await
            .expect("read with the good client");
        assert!(
            kept.is_none(),
            "etcd stored a write made without a certificate"
        );

        // A CA that did not sign etcd's certificate: the client refuses the server during
        // the handshake, and connect says so instead of retrying forever.
        let other_dir = tempfile::tempdir().expect("temp dir");
        let other = Pki::generate(other_dir.path()).expect("other PKI");
        let untrusted = tls_config(&server, &other, Some(&pki));
        let refused = tokio::time::timeout(Duration::from_secs(20), untrusted.connect(None))
            .await
            .expect("connect trusting another CA did not hang");
        match refused {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("TLS to etcd") && msg.contains("certificate"),
                    "{msg}"
                );
            }
            Ok(_) => panic!("connect trusting another CA must fail"),
        }
    })
    .await;
}
