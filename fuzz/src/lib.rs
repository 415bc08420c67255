//! What each fuzz target feeds to plugca, in one place. The libFuzzer binaries
//! in `fuzz_targets/` call these functions, and so does the regression replay
//! `tests/fuzz_regressions.rs` (which includes this file by path), so an input
//! that crashed a fuzzer replays under plain `cargo test`.
//!
//! Each function takes arbitrary bytes, must not panic on any of them, and
//! asserts the properties that are cheap to check: a value that parses prints
//! back to text that parses to the same value; a re-encoding of accepted input
//! is accepted again. Only plugca's public API is used.

use std::path::Path;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use plugca::authn::jwks::JwtRule;
use plugca::authn::jwt::JwtAuthenticator;
use plugca::authn::xfcc::{self, XfccAuthenticator};
use plugca::authn::{Authenticator as _, RequestContext};
use plugca::ca::CaBundle;
use plugca::ca::bundle;
use plugca::ca::keys::CaKey;
use plugca::csr::VerifiedCsr;
use plugca::identity::{SpiffeId, TrustDomain};
use plugca::impersonation::NodeAccount;
use plugca::impersonation::policy::{Pattern, Policy};
use plugca::server::harness::{self as fault, Fault, Overrides};
use plugca::{duration, pem};

/// One target: feeds the bytes to a parser, returns whether it accepted them.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, as in `fuzz/Cargo.toml`, `fuzz/corpus/<name>/` and
/// `fuzz/regressions/<name>/`. Each returns whether the
/// parser under test accepted the input (the replay test checks the seeds).
pub const TARGETS: &[(&str, Target)] = &[
    ("csr", csr),
    ("pem", pem),
    ("bundle", bundle),
    ("xfcc", xfcc),
    ("spiffe", spiffe),
    ("duration", duration),
    ("fault", fault),
    ("policy", policy),
    ("jwt", jwt),
    ("jwt_rule", jwt_rule),
];

/// The CSR of `IstioCertificateRequest.csr`: DER, and PEM text as sent.
pub fn csr(data: &[u8]) -> bool {
    let der = VerifiedCsr::from_der(data);
    let pem_ok = std::str::from_utf8(data).is_ok_and(|text| VerifiedCsr::parse(text).is_ok());
    if let Ok(csr) = &der {
        let _ = (
            csr.key_kind(),
            csr.has_common_name(),
            csr.requested_uri_sans(),
        );
        let text = pem::encode("CERTIFICATE REQUEST", data);
        if text.len() <= plugca::csr::MAX_CSR_BYTES {
            assert!(
                VerifiedCsr::parse(&text).is_ok(),
                "a CSR accepted as DER is refused as PEM"
            );
        }
    }
    der.is_ok() || pem_ok
}

/// PEM text of mounted files (certificates, keys) and requests.
pub fn pem(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let parsed = pem::parse_all(text);
    if let Ok(blocks) = &parsed {
        assert!(!blocks.is_empty() && blocks.len() <= pem::MAX_BLOCKS);
        // Re-encoding every block gives the same blocks back. Only for labels
        // as RFC 7468 defines them: `encode` is called with constant labels.
        if blocks.iter().all(|b| rfc7468_label(&b.label)) {
            let again: String = blocks
                .iter()
                .map(|b| pem::encode(&b.label, &b.der))
                .collect();
            let reparsed = pem::parse_all(&again).expect("re-encoded PEM parses");
            assert_eq!(reparsed.len(), blocks.len());
            for (a, b) in blocks.iter().zip(&reparsed) {
                assert_eq!((&a.label, &a.der), (&b.label, &b.der));
            }
        }
        let first = pem::parse_first(text).expect("parse_first accepts what parse_all accepts");
        assert_eq!(first.der, blocks[0].der);
    }
    let _ = CaKey::ca_from_pem(text);
    if let Ok(key) = CaKey::from_pem(text) {
        // The key as plugca writes it (PKCS#8) loads again as the same key.
        let again = CaKey::from_pem(&key.secret_pkcs8_pem()).expect("re-encoded key parses");
        assert_eq!(again.public_spki(), key.public_spki());
        assert_eq!(again.kind(), key.kind());
    }
    parsed.is_ok()
}

/// Validity instant for bundle checks: fixed, so a replay is deterministic
/// (the committed test bundle in `certs/` is valid then).
const BUNDLE_NOW: i64 = 1_893_456_000; // 2030-01-01T00:00:00Z

/// The cacerts directory loader over arbitrary file contents. The input is
/// split at NUL bytes (PEM text has none): three parts are the Kubernetes
/// `tls.crt`, `tls.key`, `ca.crt` layout; otherwise the first four are
/// istiod's `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`,
/// and missing parts are missing files.
pub fn bundle(data: &[u8]) -> bool {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("a scratch directory for the bundle target");
    }
    let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let names: &[&str] = if parts.len() == 3 {
        &[bundle::TLS_CRT, bundle::TLS_KEY, bundle::TLS_CA]
    } else {
        &[
            bundle::CA_CERT,
            bundle::CA_KEY,
            bundle::CERT_CHAIN,
            bundle::ROOT_CERT,
        ]
    };
    let now =
        time::OffsetDateTime::from_unix_timestamp(BUNDLE_NOW).expect("a constant, valid time");
    DIR.with(|dir| {
        let dir = dir.path();
        for name in [
            bundle::CA_CERT,
            bundle::CA_KEY,
            bundle::CERT_CHAIN,
            bundle::ROOT_CERT,
            bundle::TLS_CRT,
            bundle::TLS_KEY,
            bundle::TLS_CA,
        ] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        for (name, part) in names.iter().zip(&parts) {
            std::fs::write(dir.join(name), part).expect("writing a scratch bundle file");
        }
        check_bundle(CaBundle::load_dir(dir, now))
    })
}

fn check_bundle(loaded: Result<Option<CaBundle>, plugca::ca::BundleError>) -> bool {
    let Ok(Some(ca)) = loaded else {
        return false;
    };
    assert!(!ca.path().is_empty() && !ca.roots().is_empty());
    // What the CA serves must itself be valid PEM certificates.
    for element in ca.served_chain().iter().chain(ca.response_tail()) {
        let blocks = pem::parse_all(element).expect("a served chain element is PEM");
        assert!(blocks.iter().all(|b| b.label == "CERTIFICATE"));
    }
    assert!(pem::parse_all(ca.root_bundle()).is_ok());
    assert!(ca.not_after_limit() <= ca.signing_cert().not_after);
    true
}

/// The `x-forwarded-client-cert` header of a trusted gateway, through the
/// parser and through the authenticator (which also checks every identity).
pub fn xfcc(data: &[u8]) -> bool {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(certs) = xfcc::parse(text)
    {
        let _ = xfcc::identities(&certs);
    }
    let Ok(value) = tonic::metadata::MetadataValue::try_from(data) else {
        return false;
    };
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(xfcc::XFCC_HEADER, value);
    let ctx = RequestContext {
        metadata: &metadata,
        peer_certs: None,
        remote_addr: Some(([127, 0, 0, 1], 15443).into()),
    };
    let authenticator = XfccAuthenticator::new(Vec::new());
    let Ok(Some(caller)) = ready(authenticator.authenticate(&ctx)) else {
        return false;
    };
    assert!(!caller.identities().is_empty());
    assert_eq!(caller.sans().len(), caller.identities().len());
    for id in caller.identities() {
        if let plugca::identity::Identity::Spiffe(spiffe) = id {
            assert!(SpiffeId::parse(&spiffe.to_string()).is_ok(), "{id:?}");
        }
    }
    true
}

/// SPIFFE IDs and trust domains (CSR SANs, XFCC, flags): both parsers over
/// the same text, with Display round trips.
pub fn spiffe(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    if let Ok(td) = TrustDomain::parse(text) {
        let again = TrustDomain::parse(&td.to_string()).expect("a printed trust domain parses");
        assert_eq!(again, td);
        assert!(
            !td.as_str().is_empty() && td.as_str().len() <= plugca::identity::MAX_TRUST_DOMAIN_LEN
        );
    }
    if let Ok(id) = SpiffeId::parse(text) {
        let again = SpiffeId::parse(&id.to_string()).expect("a printed SPIFFE ID parses");
        assert_eq!(again, id);
        assert_eq!(
            format!("spiffe://{}{}", id.trust_domain(), id.path()),
            id.as_str()
        );
        let td = TrustDomain::parse(id.trust_domain()).expect("an ID's trust domain parses");
        assert_eq!(td.as_str(), id.trust_domain());
        if let Some((ns, sa)) = id.namespace_and_service_account() {
            // The workload constructor is stricter (Kubernetes names); when it
            // accepts, it builds the same ID.
            if let Ok(built) = SpiffeId::workload(&td, ns, sa) {
                assert_eq!(built, id);
            }
        }
    }
    TrustDomain::parse(text).is_ok() || SpiffeId::parse(text).is_ok()
}

/// Go durations (flags, env, fault specs), with a round trip through
/// [`duration::format_go`].
pub fn duration(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(d) = duration::parse(text) else {
        return false;
    };
    let printed = duration::format_go(d);
    assert_eq!(duration::parse(&printed), Ok(d), "{printed:?}");
    true
}

/// Fault specs as the admin endpoint takes them: one per line or comma-separated.
pub fn fault(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    // The admin endpoint's split (`monitoring::parse_faults`, private).
    let mut faults = Vec::new();
    let mut all_parsed = true;
    for spec in text
        .split(['\n', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if let Ok(f) = spec.parse::<Fault>() {
            match &f {
                Fault::Latency(d) | Fault::ShortTtl(d) => {
                    let arg = spec.split_once(':').map(|(_, a)| a).unwrap_or_default();
                    assert_eq!(duration::parse(arg).as_ref(), Ok(d));
                }
                Fault::Refuse { code, .. } => {
                    assert_eq!(fault::parse_code(&(*code as i32).to_string()), Some(*code));
                }
                _ => {}
            }
            faults.push(f);
        } else {
            all_parsed = false;
        }
        let _ = fault::parse_code(spec);
    }
    let _ = Overrides::from_faults(&faults);
    all_parsed && !faults.is_empty()
}

/// The impersonation policy file (JSON), with two trusted node accounts.
pub fn policy(data: &[u8]) -> bool {
    let trusted = trusted_node_accounts();
    let Ok(policy) = Policy::parse(data, Path::new("policy.json"), trusted) else {
        return false;
    };
    for caller in trusted {
        for pattern in policy.allowed_for(caller) {
            let printed = pattern.to_string();
            let again = Pattern::parse(&printed).expect("a printed pattern parses");
            assert_eq!(&again, pattern);
            // An instance of the pattern (`*` as `x`) is allowed.
            let (ns, sa) = printed.split_once('/').expect("a pattern has a /");
            let concrete = |p: &str| {
                if p == "*" {
                    "x".to_string()
                } else {
                    p.to_string()
                }
            };
            assert!(policy.allows(caller, &concrete(ns), &concrete(sa)));
        }
    }
    let stranger: NodeAccount = "default/stranger"
        .parse()
        .expect("a constant, valid account");
    assert!(policy.allowed_for(&stranger).is_empty());
    true
}

fn trusted_node_accounts() -> &'static [NodeAccount] {
    static TRUSTED: OnceLock<Vec<NodeAccount>> = OnceLock::new();
    TRUSTED.get_or_init(|| {
        ["istio-system/ztunnel", "kube-system/ztunnel"]
            .iter()
            .map(|s| s.parse().expect("a constant, valid account"))
            .collect()
    })
}

/// Issuer, audience and trust domain of the `jwt` target's verifier.
pub const JWT_ISSUER: &str = "https://issuer.example";
pub const JWT_AUDIENCE: &str = "istio-ca";
pub const JWT_KID: &str = "fuzz";
/// The `jwt` target's signing key (P-256, public test material).
pub const JWT_KEY_PEM: &str = include_str!("../jwt-test-key.pem");

/// Bearer JWTs, before and after the signature check. The first byte picks
/// the mode (`'0'`, `'1'`, `'2'` in the seeds):
/// - 0: the rest is a token, verified against a JWKS holding [`JWT_KEY_PEM`];
/// - 1: the rest is header and claims JSON separated by a NUL byte, signed
///   with [`JWT_KEY_PEM`] and verified, so the claims reader after the
///   signature check sees arbitrary claims;
/// - 2: the rest is a JWKS document (as a file or an issuer serves it), used
///   to verify a valid token.
pub fn jwt(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else {
                return false;
            };
            check_verified(&jwt_verifier(&jwt_keys().jwks), token)
        }
        1 => {
            let (header, claims) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &b""[..]),
            };
            let token = sign_jwt(header, claims);
            check_verified(&jwt_verifier(&jwt_keys().jwks), &token)
        }
        _ => {
            let Ok(set) = serde_json::from_slice::<JwkSet>(rest) else {
                return false;
            };
            let _ = plugca::authn::jwt::KeySet::from_jwks(&set);
            let Ok(verifier) = JwtAuthenticator::from_jwks(
                &set,
                JWT_ISSUER.into(),
                vec![JWT_AUDIENCE.into()],
                jwt_trust_domain(),
            ) else {
                return false;
            };
            check_verified(&verifier, &jwt_keys().valid_token)
        }
    }
}

/// Signs `header.claims` (base64url of the raw bytes) with the test key.
pub fn sign_jwt(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jwt_keys().signing,
        jsonwebtoken::Algorithm::ES256,
    )
    .expect("ES256 signing with a valid P-256 key");
    format!("{message}.{signature}")
}

struct JwtKeys {
    signing: jsonwebtoken::EncodingKey,
    jwks: JwkSet,
    valid_token: String,
}

fn jwt_keys() -> &'static JwtKeys {
    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let pkcs8 = pem::parse_first(JWT_KEY_PEM).expect("the committed test key is PEM");
        // jsonwebtoken's PEM support is a feature plugca leaves off.
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&pkcs8.der);
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, jsonwebtoken::Algorithm::ES256)
                .expect("a JWK for the test key");
        jwk.common.key_id = Some(JWT_KID.into());
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(JWT_KID.into());
        let claims = serde_json::json!({
            "iss": JWT_ISSUER,
            "aud": [JWT_AUDIENCE],
            "sub": "system:serviceaccount:default:httpbin",
            "exp": 4_102_444_800i64, // 2100-01-01
            "nbf": 0,
        });
        let valid_token =
            jsonwebtoken::encode(&header, &claims, &signing).expect("encoding the test token");
        JwtKeys {
            signing,
            jwks: JwkSet { keys: vec![jwk] },
            valid_token,
        }
    })
}

fn jwt_trust_domain() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("a constant, valid trust domain")
}

/// A fresh verifier per input, so its token cache carries no state from one
/// input to the next (a replay then behaves as the fuzzer run did).
fn jwt_verifier(set: &JwkSet) -> JwtAuthenticator {
    JwtAuthenticator::from_jwks(
        set,
        JWT_ISSUER.into(),
        vec![JWT_AUDIENCE.into()],
        jwt_trust_domain(),
    )
    .expect("the test JWKS holds a usable key")
}

fn check_verified(verifier: &JwtAuthenticator, token: &str) -> bool {
    let Ok(id) = verifier.verify(token) else {
        return false;
    };
    assert_eq!(id.trust_domain(), "cluster.local");
    assert!(id.namespace_and_service_account().is_some(), "{id}");
    true
}

/// `JWT_RULE` / `--jwt-rule` JSON, trimmed as the config does; an accepted
/// rule written back as JSON parses to the same rule.
pub fn jwt_rule(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(rule) = JwtRule::parse(text.trim()) else {
        return false;
    };
    assert!(!rule.issuer.is_empty() && !rule.audiences().is_empty());
    let json = serde_json::json!({
        "issuer": rule.issuer,
        "jwks_uri": rule.jwks_uri,
        "audiences": rule.audiences,
    });
    assert_eq!(JwtRule::parse(&json.to_string()), Ok(rule));
    true
}

/// RFC 7468 labels: printable ASCII without `-`, single spaces inside.
fn rfc7468_label(label: &str) -> bool {
    label
        .bytes()
        .all(|b| (b.is_ascii_graphic() && b != b'-') || b == b' ')
        && !label.starts_with(' ')
        && !label.ends_with(' ')
        && !label.contains("  ")
}

/// Polls a future that completes without waiting (the XFCC authenticator
/// never awaits anything), so the targets need no async runtime.
fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the XFCC authenticator awaited something"),
    }
}
