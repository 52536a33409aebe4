//! Table tests of the pure answer function: every name form, without a server.

use super::*;
use crate::fixture::three_clusters;

/// The three-cluster fixture as seen from `east`.
fn zone() -> ZoneView {
    let settings = ZoneSettings::from_config(&DnsConfig::default()).expect("settings");
    ZoneView::new(
        Arc::new(settings),
        ClusterName::new("east").expect("name"),
        Arc::new(three_clusters()),
    )
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("name")
}

fn rdata_strings(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| format!("{} {}", r.record_type(), r.data))
        .collect()
}

#[test]
fn every_name_form() {
    let z = zone();
    use RecordType as T;
    let nx = ResponseCode::NXDomain;
    let ok = ResponseCode::NoError;
    // (name, type, rcode, answers)
    let cases: &[(&str, RecordType, ResponseCode, &[&str])] = &[
        ("pay.prod.svc.clusterset.local.", T::A, ok, &["A 10.64.0.1"]),
        ("PaY.pRoD.SVC.ClusterSet.LOCAL.", T::A, ok, &["A 10.64.0.1"]),
        ("pay.prod.svc.clusterset.local.", T::AAAA, ok, &[]),
        ("pay.prod.svc.clusterset.local.", T::MX, ok, &[]),
        (
            "pay.prod.svc.clusterset.local.",
            T::ANY,
            ok,
            &["A 10.64.0.1"],
        ),
        (
            "v6.prod.svc.clusterset.local.",
            T::AAAA,
            ok,
            &["AAAA fd00::6"],
        ),
        ("v6.prod.svc.clusterset.local.", T::A, ok, &[]),
        // In the catalog, no VIP for this cluster yet: NODATA.
        ("novip.prod.svc.clusterset.local.", T::A, ok, &[]),
        ("nothere.prod.svc.clusterset.local.", T::A, nx, &[]),
        (
            "_http._tcp.pay.prod.svc.clusterset.local.",
            T::SRV,
            ok,
            &["SRV 10 100 8080 pay.prod.svc.clusterset.local."],
        ),
        (
            "_dns._udp.pay.prod.svc.clusterset.local.",
            T::SRV,
            ok,
            &["SRV 10 100 53 pay.prod.svc.clusterset.local."],
        ),
        ("_http._udp.pay.prod.svc.clusterset.local.", T::SRV, nx, &[]),
        ("_nope._tcp.pay.prod.svc.clusterset.local.", T::SRV, nx, &[]),
        ("_http._tcp.pay.prod.svc.clusterset.local.", T::A, ok, &[]),
        ("_tcp.pay.prod.svc.clusterset.local.", T::SRV, ok, &[]),
        ("_sctp.pay.prod.svc.clusterset.local.", T::SRV, nx, &[]),
        ("dns-version.clusterset.local.", T::TXT, ok, &["TXT 1.0.0"]),
        ("dns-version.clusterset.local.", T::A, ok, &[]),
        (
            "clusterset.local.",
            T::SOA,
            ok,
            &["SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 42 60 10 3600 5"],
        ),
        (
            "clusterset.local.",
            T::NS,
            ok,
            &["NS ns.dns.clusterset.local."],
        ),
        (
            "clusterset.local.",
            T::ANY,
            ok,
            &["SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 42 60 10 3600 5"],
        ),
        ("clusterset.local.", T::A, ok, &[]),
        ("ns.dns.clusterset.local.", T::A, ok, &["A 127.0.0.1"]),
        ("dns.clusterset.local.", T::A, ok, &[]),
        // Empty non-terminals.
        ("svc.clusterset.local.", T::A, ok, &[]),
        ("prod.svc.clusterset.local.", T::A, ok, &[]),
        ("shop.svc.clusterset.local.", T::TXT, ok, &[]),
        ("other.svc.clusterset.local.", T::A, nx, &[]),
        // Cluster-pinned.
        (
            "pay.prod.svc.west.clusterset.local.",
            T::A,
            ok,
            &["A 10.64.0.2"],
        ),
        ("pay.prod.svc.east.clusterset.local.", T::A, ok, &[]),
        ("pay.prod.svc.south.clusterset.local.", T::A, nx, &[]),
        ("cart.shop.svc.south.clusterset.local.", T::A, ok, &[]),
        ("west.clusterset.local.", T::A, ok, &[]),
        ("svc.west.clusterset.local.", T::A, ok, &[]),
        ("prod.svc.west.clusterset.local.", T::A, ok, &[]),
        ("shop.svc.west.clusterset.local.", T::A, nx, &[]),
        ("north.clusterset.local.", T::A, nx, &[]),
        // Reserved form: does not exist.
        ("west.pay.prod.svc.clusterset.local.", T::A, nx, &[]),
        ("a.b.c.d.e.f.clusterset.local.", T::A, nx, &[]),
    ];
    for (qname, qtype, rcode, answers) in cases {
        let got = resolve(&z, &name(qname), *qtype);
        assert_eq!(got.rcode, *rcode, "{qname} {qtype}");
        assert!(got.authoritative, "{qname} {qtype}");
        assert_eq!(rdata_strings(&got.answers), *answers, "{qname} {qtype}");
        for r in &got.answers {
            assert_eq!(r.name, name(qname).to_lowercase(), "owner of {qname}");
        }
        if got.answers.is_empty() {
            // NODATA and NXDOMAIN: SOA in authority, TTL = min(SOA TTL, minimum).
            assert_eq!(got.authorities.len(), 1, "{qname} {qtype}");
            assert_eq!(got.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(got.authorities[0].ttl, z.settings.negative_ttl);
        }
    }
}

#[test]
fn binary_labels_do_not_exist() {
    let z = zone();
    let odd = Name::from_labels([&b"\xff\x00"[..], b"svc", b"clusterset", b"local"]).expect("name");
    assert_eq!(
        resolve(&z, &odd, RecordType::A).rcode,
        ResponseCode::NXDomain
    );
}

#[test]
fn outside_the_zone_is_refused_without_aa() {
    let z = zone();
    for qname in ["example.com.", "local.", ".", "clusterset.local.evil."] {
        let got = resolve(&z, &name(qname), RecordType::A);
        assert_eq!(got.rcode, ResponseCode::Refused, "{qname}");
        assert!(!got.authoritative);
        assert!(got.answers.is_empty() && got.authorities.is_empty());
    }
}

#[test]
fn srv_carries_the_target_address_and_soa_the_ns() {
    let z = zone();
    let got = resolve(
        &z,
        &name("_http._tcp.pay.prod.svc.clusterset.local."),
        RecordType::SRV,
    );
    assert_eq!(rdata_strings(&got.additionals), ["A 10.64.0.1"]);
    assert_eq!(
        got.additionals[0].name,
        name("pay.prod.svc.clusterset.local.")
    );
    let got = resolve(&z, &name("clusterset.local."), RecordType::SOA);
    assert_eq!(
        rdata_strings(&got.authorities),
        ["NS ns.dns.clusterset.local."]
    );
    assert_eq!(rdata_strings(&got.additionals), ["A 127.0.0.1"]);
}

#[test]
fn existing_names_are_exactly_the_names_that_exist() {
    let z = zone();
    let names = existing_names(&z);
    for n in &names {
        let got = resolve(&z, n, RecordType::CAA);
        assert_eq!(
            got.rcode,
            ResponseCode::NoError,
            "{n} listed but does not exist"
        );
    }
    // Spot checks of names that must be listed.
    for n in [
        "pay.prod.svc.west.clusterset.local.",
        "_dns._udp.pay.prod.svc.clusterset.local.",
        "_udp.pay.prod.svc.clusterset.local.",
        "ns.dns.clusterset.local.",
        "dns.clusterset.local.",
        "south.clusterset.local.",
    ] {
        assert!(names.contains(&name(n)), "{n} missing");
    }
}

#[test]
fn zone_is_configurable() {
    let cfg = DnsConfig {
        zone: "mesh.example".into(),
        ..DnsConfig::default()
    };
    let settings = ZoneSettings::from_config(&cfg).expect("settings");
    let base = zone();
    let z = ZoneView::new(
        Arc::new(settings),
        base.local.clone(),
        base.snapshot.clone(),
    );
    let got = resolve(&z, &name("pay.prod.svc.mesh.example."), RecordType::A);
    assert_eq!(rdata_strings(&got.answers), ["A 10.64.0.1"]);
    let got = resolve(&z, &name("pay.prod.svc.clusterset.local."), RecordType::A);
    assert_eq!(got.rcode, ResponseCode::Refused);
}
