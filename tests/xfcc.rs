//! XFCC (spec 3.2, case 13): identities forwarded by a trusted gateway in
//! `x-forwarded-client-cert`, accepted only with --trusted-gateway-cidrs and
//! only from trusted peers (the test client is on loopback, which is always
//! trusted; peers outside the CIDRs are covered by the unit table in
//! src/authn/xfcc.rs).

mod common;
mod support;

use common::*;
use plugca::client::CsrShape;
use plugca::pb::IstioCertificateRequest;
use support::logs;
use tonic::Code;

const XFCC: &str =
    r#"Hash=meshclient;Subject="";URI=spiffe://mesh.example.com/ns/otherns/sa/othersa"#;

fn body() -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr: csr(&p256(), None, CsrShape::Ztunnel),
        validity_duration: 0,
        metadata: None,
    }
}

async fn xfcc_server() -> Server {
    Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--trusted-gateway-cidrs",
        "172.17.0.0/16",
        // Istio's example header names this trust domain.
        "--trust-domain-aliases",
        "mesh.example.com",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loopback_gateway_forwards_the_client_identity() {
    let server = xfcc_server().await;
    let mut client = server.client().await;
    let chain = send_raw(&mut client, body(), &[("x-forwarded-client-cert", XFCC)])
        .await
        .unwrap();
    webpki_verify(&chain);
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://mesh.example.com/ns/otherns/sa/othersa"]
    );
    // Several hops, DNS names and a Subject CN, in istiod's order.
    let hops = concat!(
        r#"Hash=a;Subject="CN=gw.example.com";URI=spiffe://mesh.example.com/ns/a/sa/b;DNS=b.example.com,"#,
        r#"Hash=b;DNS=c.example.com"#
    );
    let chain = send_raw(&mut client, body(), &[("x-forwarded-client-cert", hops)])
        .await
        .unwrap();
    let facts = leaf_facts(&chain[0]);
    assert_eq!(facts.uris, ["spiffe://mesh.example.com/ns/a/sa/b"]);
    assert_eq!(
        facts.dns,
        ["b.example.com", "gw.example.com", "c.example.com"]
    );
    assert_eq!(
        metric(
            &server,
            "plugca_certificates_issued_total{authenticator=\"xfcc\",key=\"p256\"}"
        )
        .await
        .as_deref(),
        Some("2")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_junk_header_is_refused_with_the_reason_in_the_log() {
    let logs = logs();
    let server = xfcc_server().await;
    let mut client = server.client().await;
    for (junk, reason) in [
        (
            "junk-header-x1",
            "XFCC: malformed XFCC header: a field is not key=value",
        ),
        (
            "Hash=x;Subject=\"\"",
            "XFCC: the XFCC header names no identity",
        ),
        (
            "URI=spiffe://td/ns/a b",
            "XFCC: XFCC identity \"spiffe://td/ns/a b\" is not a SPIFFE ID",
        ),
    ] {
        assert_eq!(
            send_raw(&mut client, body(), &[("x-forwarded-client-cert", junk)])
                .await
                .unwrap_err(),
            (Code::Unauthenticated, "request authenticate failure".into()),
            "{junk}"
        );
        logs.assert_line(&["CreateCertificate refused", reason]);
    }
    server.stop().await;
}

/// Without --trusted-gateway-cidrs the header means nothing, even from loopback.
#[tokio::test(flavor = "multi_thread")]
async fn without_trusted_gateways_the_header_is_ignored() {
    let server = Server::start(&["--cacerts-dir", CERTS]).await;
    let mut client = server.client().await;
    assert_eq!(
        send_raw(&mut client, body(), &[("x-forwarded-client-cert", XFCC)])
            .await
            .unwrap_err(),
        (Code::Unauthenticated, "request authenticate failure".into())
    );
    server.stop().await;
}

/// A client certificate comes first in the chain and wins over XFCC.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_wins_over_forwarded_identities() {
    let server = xfcc_server().await;
    let mut client = server.client().await;
    let key = p256();
    let own = send_raw(
        &mut client,
        IstioCertificateRequest {
            csr: csr(&key, None, CsrShape::Ztunnel),
            validity_duration: 0,
            metadata: None,
        },
        &[(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/gw/sa/client",
        )],
    )
    .await
    .unwrap();
    let mut mtls = server
        .client_with(Some((own[..own.len() - 1].concat(), key.serialize_pem())))
        .await;
    let chain = send_raw(&mut mtls, body(), &[("x-forwarded-client-cert", XFCC)])
        .await
        .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).uris,
        ["spiffe://cluster.local/ns/gw/sa/client"]
    );
    server.stop().await;
}

/// Issue #12 item 7: a trusted gateway cannot forward an identity of another
/// trust domain than ours and its aliases.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_identity_outside_the_trust_domains_is_refused() {
    let logs = logs();
    let server = xfcc_server().await;
    let mut client = server.client().await;
    let evil = "URI=spiffe://evil.example/ns/default/sa/x";
    assert_eq!(
        send_raw(&mut client, body(), &[("x-forwarded-client-cert", evil)])
            .await
            .unwrap_err(),
        (Code::Unauthenticated, "request authenticate failure".into())
    );
    logs.assert_line(&[
        "CreateCertificate refused",
        "identity \"spiffe://evil.example/ns/default/sa/x\" is in trust domain \"evil.example\", not in cluster.local, mesh.example.com",
    ]);
    server.stop().await;
}

/// Issue #12 item 6: wildcards other than a whole leftmost label, the CA's own
/// serving names (defaults and --server-dns-names) and too many SANs are
/// refused; repeated identities become one SAN.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_wildcards_and_the_cas_own_names_are_refused() {
    let logs = logs();
    let server = Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--trusted-gateway-cidrs",
        "172.17.0.0/16",
        "--server-dns-names",
        "ca.plugca.example",
    ])
    .await;
    let mut client = server.client().await;
    let many: Vec<String> = (0..40).map(|n| format!("DNS=n{n}.example.com")).collect();
    let many = many.join(";");
    for (header, reason) in [
        ("DNS=*", "XFCC identity \"*\" has a wildcard"),
        ("DNS=*.*.com", "XFCC identity \"*.*.com\" has a wildcard"),
        (
            "DNS=a*b*c.example",
            "XFCC identity \"a*b*c.example\" has a wildcard",
        ),
        ("DNS=*.com", "XFCC identity \"*.com\" has a wildcard"),
        (
            "DNS=istiod.istio-system.svc",
            "XFCC identity \"istiod.istio-system.svc\" is (or covers) a serving name of this CA",
        ),
        (
            "DNS=*.istio-system.svc",
            "XFCC identity \"*.istio-system.svc\" is (or covers) a serving name of this CA",
        ),
        (
            "DNS=ca.plugca.example",
            "XFCC identity \"ca.plugca.example\" is (or covers) a serving name of this CA",
        ),
        (
            many.as_str(),
            "the XFCC header names 40 distinct identities, more than 16",
        ),
    ] {
        assert_eq!(
            send_raw(&mut client, body(), &[("x-forwarded-client-cert", header)])
                .await
                .unwrap_err(),
            (Code::Unauthenticated, "request authenticate failure".into()),
            "{header}"
        );
        logs.assert_line(&["CreateCertificate refused", reason]);
    }
    let chain = send_raw(
        &mut client,
        body(),
        &[(
            "x-forwarded-client-cert",
            "DNS=*.apps.example.com;DNS=a.example.com;DNS=a.example.com,DNS=a.example.com",
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        leaf_facts(&chain[0]).dns,
        ["*.apps.example.com", "a.example.com"]
    );
    server.stop().await;
}

/// Issue #12 item 6: a gateway range like 0.0.0.0/0 is accepted but warned about.
#[tokio::test(flavor = "multi_thread")]
async fn a_very_broad_gateway_range_is_warned_about_at_start() {
    let logs = logs();
    let server = Server::start(&[
        "--cacerts-dir",
        CERTS,
        "--trusted-gateway-cidrs",
        "0.0.0.0/0",
    ])
    .await;
    logs.assert_line(&["very broad range", "cidr=0.0.0.0/0"]);
    server.stop().await;
}
