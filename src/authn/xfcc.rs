//! Identities forwarded by a trusted gateway in `x-forwarded-client-cert`
//! (Envoy's XFCC), as istiod's `XfccAuthenticator`: only when
//! `--trusted-gateway-cidrs` is set, only from a peer inside one of those
//! CIDRs or on loopback, from the first header value. Identities, per element
//! (hop) in order: every `URI=`, every `DNS=`, then the Subject's CN.
//!
//! Stricter than istiod: the header is bounded, malformed quoting or pairs are
//! refused, and every identity must be a SPIFFE ID, an IP address or a DNS
//! name (it becomes a SAN of the issued certificate). A DNS name may hold `*`
//! only as its whole leftmost label above a registrable-looking domain
//! (`*.example.com`, not `*`, `*.com`, `*.*.com` or `a*b.example`); the CA's
//! own serving names (and wildcards covering them) are refused, so a gateway
//! cannot obtain a certificate that impersonates the CA; identities are
//! de-duplicated and at most [`MAX_XFCC_IDENTITIES`] become SANs. Trust
//! domains of SPIFFE IDs are checked where every caller is (`TrustDomains`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use tracing::warn;

use crate::authn::{Authenticator, AuthnError, Caller, RequestContext};
use crate::identity::Identity;
use crate::metrics::AuthnKind;

pub const XFCC_HEADER: &str = "x-forwarded-client-cert";
/// Longest XFCC header value parsed.
pub const MAX_XFCC_BYTES: usize = 16 * 1024;
/// Most distinct identities (SANs) one forwarded request may give.
pub const MAX_XFCC_IDENTITIES: usize = 16;
/// First labels of istiod's Service names: `<name>.<namespace>.svc[...]` is
/// the CA's own name in any namespace.
const CA_SERVICE_NAMES: [&str; 3] = ["istiod", "istiod-remote", "istio-pilot"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XfccError {
    #[error("peer {peer} is not a trusted gateway (not loopback, not in --trusted-gateway-cidrs)")]
    UntrustedPeer { peer: String },
    #[error("the XFCC header is not ASCII")]
    NotAscii,
    #[error("the XFCC header is longer than {MAX_XFCC_BYTES} bytes")]
    TooLong,
    #[error("malformed XFCC header: {0}")]
    Malformed(String),
    #[error("the XFCC header names no identity (no URI, DNS or Subject CN)")]
    NoIdentities,
    #[error("XFCC identity {0:?} is not a SPIFFE ID, IP address or DNS name")]
    BadIdentity(String),
    #[error(
        "XFCC identity {0:?} has a wildcard that is not the whole leftmost label of a name with at least two more labels"
    )]
    BadWildcard(String),
    #[error("XFCC identity {0:?} is (or covers) a serving name of this CA")]
    CaServingName(String),
    #[error("the XFCC header names {count} distinct identities, more than {MAX_XFCC_IDENTITIES}")]
    TooManyIdentities { count: usize },
}

/// An IPv4 or IPv6 network, `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "not a CIDR like 172.17.0.0/16 (no /prefix)".to_string())?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {prefix:?} is not a number from 0 to {max}"))?;
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Broader than a /8 (IPv4) or a /32 (IPv6), e.g. `0.0.0.0/0`: most of
    /// the internet may then forward identities.
    pub fn is_very_broad(&self) -> bool {
        match self.network {
            IpAddr::V4(_) => self.prefix < 8,
            IpAddr::V6(_) => self.prefix < 32,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(&n.octets(), &a.octets(), self.prefix.into())
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix_eq(&n.octets(), &a.octets(), self.prefix.into())
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, a dual-stack listener's
/// view of an IPv4 peer) as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: usize) -> bool {
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// Whether a request from `peer` may carry forwarded identities.
pub fn is_trusted_gateway(peer: Option<SocketAddr>, cidrs: &[Cidr]) -> bool {
    let Some(peer) = peer else { return false };
    let ip = canonical(peer.ip());
    ip.is_loopback() || cidrs.iter().any(|c| c.contains(ip))
}

/// One element (hop) of an XFCC header.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ForwardedCert {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub subject: Option<String>,
}

/// Parses an XFCC header value: elements separated by `,`, key=value pairs by
/// `;`, values optionally in double quotes with `\` escapes.
pub fn parse(header: &str) -> Result<Vec<ForwardedCert>, XfccError> {
    if header.len() > MAX_XFCC_BYTES {
        return Err(XfccError::TooLong);
    }
    let malformed = |m: &str| XfccError::Malformed(m.to_string());
    let mut certs = Vec::new();
    for element in split_unquoted(header, ',').map_err(|e| malformed(&e))? {
        if element.trim().is_empty() {
            return Err(malformed("empty element"));
        }
        let mut cert = ForwardedCert::default();
        for pair in split_unquoted(&element, ';').map_err(|e| malformed(&e))? {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| malformed("a field is not key=value"))?;
            let value = unquote(value.trim()).map_err(|e| malformed(&e))?;
            match key.trim().to_ascii_lowercase().as_str() {
                "uri" => cert.uris.push(value),
                "dns" => cert.dns.push(value),
                "subject" => cert.subject = Some(value),
                "by" | "hash" | "cert" | "chain" => {}
                _ => {
                    return Err(malformed(
                        "unknown field (want By, Hash, Cert, Chain, Subject, URI, DNS)",
                    ));
                }
            }
        }
        certs.push(cert);
    }
    Ok(certs)
}

/// istiod's identity order: per element, URIs, then DNS names, then the CN.
pub fn identities(certs: &[ForwardedCert]) -> Vec<String> {
    let mut ids = Vec::new();
    for c in certs {
        ids.extend(c.uris.iter().filter(|u| !u.is_empty()).cloned());
        ids.extend(c.dns.iter().filter(|d| !d.is_empty()).cloned());
        if let Some(cn) = c.subject.as_deref().and_then(common_name) {
            ids.push(cn);
        }
    }
    ids
}

/// [`identities`], de-duplicated (first occurrence kept), capped, and each
/// checked with the CA's serving names `reserved` (lower case).
pub fn checked_identities(
    certs: &[ForwardedCert],
    reserved: &[String],
) -> Result<Vec<String>, XfccError> {
    let mut ids = identities(certs);
    if ids.is_empty() {
        return Err(XfccError::NoIdentities);
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    if ids.len() > MAX_XFCC_IDENTITIES {
        return Err(XfccError::TooManyIdentities { count: ids.len() });
    }
    for id in &ids {
        check_identity(id, reserved)?;
    }
    Ok(ids)
}

/// The CN of an RFC 4514-style subject (`CN=x,OU=y`), if any.
fn common_name(subject: &str) -> Option<String> {
    let mut rdn = String::new();
    let mut parts = Vec::new();
    let mut escaped = false;
    for ch in subject.chars() {
        match ch {
            _ if escaped => {
                rdn.push(ch);
                escaped = false;
            }
            '\\' => escaped = true,
            ',' | '+' => parts.push(std::mem::take(&mut rdn)),
            _ => rdn.push(ch),
        }
    }
    parts.push(rdn);
    parts.into_iter().find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("cn") && !v.trim().is_empty()).then(|| v.trim().to_string())
    })
}

fn split_unquoted(s: &str, sep: char) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped) = (false, false);
    for ch in s.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if quoted => {
                cur.push(ch);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    out.push(cur);
    Ok(out)
}

fn unquote(v: &str) -> Result<String, String> {
    let Some(inner) = v.strip_prefix('"') else {
        if v.contains('"') {
            return Err("stray quote in a value".into());
        }
        return Ok(v.to_string());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| "text after a quoted value".to_string())?;
    // Only `\"` is Envoy's escape; other backslashes belong to the value
    // (a Subject's RFC 4514 escapes such as `\,`).
    let mut out = String::new();
    let mut escaped = false;
    for ch in inner.chars() {
        match ch {
            _ if escaped => {
                if ch != '"' {
                    out.push('\\');
                }
                out.push(ch);
                escaped = false;
            }
            '\\' => escaped = true,
            '"' => return Err("text after a quoted value".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks one forwarded identity: SAN-shaped, wildcards only as
/// `*.<at least two labels>`, not a serving name of the CA (`reserved`, lower case).
fn check_identity(id: &str, reserved: &[String]) -> Result<(), XfccError> {
    let short = || id.chars().take(256).collect::<String>();
    if id.starts_with("spiffe://") || id.parse::<IpAddr>().is_ok() {
        return if valid_identity(id) {
            Ok(())
        } else {
            Err(XfccError::BadIdentity(short()))
        };
    }
    let (wildcard, base) = match id.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, id),
    };
    if base.contains('*') || (wildcard && base.split('.').count() < 2) || id == "*" {
        return Err(XfccError::BadWildcard(short()));
    }
    if !valid_identity(base) {
        return Err(XfccError::BadIdentity(short()));
    }
    let name = base.trim_end_matches('.').to_ascii_lowercase();
    let covers = |served: &str| {
        if wildcard {
            served
                .split_once('.')
                .is_some_and(|(_, parent)| parent == name)
        } else {
            served == name
        }
    };
    let ca_service = |served: &str| {
        let labels: Vec<&str> = served.split('.').collect();
        labels.len() >= 3 && CA_SERVICE_NAMES.contains(&labels[0]) && labels[2] == "svc"
    };
    let is_ca_name = reserved.iter().any(|r| covers(r))
        || if wildcard {
            // `*.<ns>.svc` covers `istiod.<ns>.svc`.
            ca_service(&format!("istiod.{name}"))
        } else {
            ca_service(&name)
        };
    if is_ca_name {
        return Err(XfccError::CaServingName(short()));
    }
    Ok(())
}

/// A SPIFFE ID, an IP address or a DNS name: what may become a SAN (its
/// wildcards are checked by [`check_identity`]).
fn valid_identity(id: &str) -> bool {
    Identity::parse(id).is_ok()
}

/// Takes the caller's identities from a trusted gateway's XFCC header.
pub struct XfccAuthenticator {
    cidrs: Vec<Cidr>,
    /// The CA's own serving DNS names, lower case: never issued through XFCC.
    reserved: Vec<String>,
}

impl XfccAuthenticator {
    /// Warns (once, at start) about very broad gateway ranges.
    pub fn new(cidrs: Vec<Cidr>) -> Self {
        for c in cidrs.iter().filter(|c| c.is_very_broad()) {
            warn!(cidr = %c, "--trusted-gateway-cidrs includes a very broad range: any peer in it may forward identities in x-forwarded-client-cert; list only the gateways' addresses");
        }
        XfccAuthenticator {
            cidrs,
            reserved: Vec::new(),
        }
    }

    /// The CA's serving DNS names (`tls::serving_dns_names`), which a gateway
    /// may not obtain certificates for.
    pub fn reserving(mut self, serving_dns_names: &[String]) -> Self {
        self.reserved = serving_dns_names
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        self
    }
}

#[tonic::async_trait]
impl Authenticator for XfccAuthenticator {
    fn name(&self) -> &'static str {
        "XFCC (trusted gateway)"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(value) = ctx.metadata.get(XFCC_HEADER) else {
            return Ok(None);
        };
        if !is_trusted_gateway(ctx.remote_addr, &self.cidrs) {
            return Err(XfccError::UntrustedPeer {
                peer: ctx
                    .remote_addr
                    .map_or_else(|| "-".into(), |a| a.to_string()),
            }
            .into());
        }
        let header = value.to_str().map_err(|_| XfccError::NotAscii)?;
        let ids = checked_identities(&parse(header)?, &self.reserved)?
            .iter()
            .map(|id| {
                Identity::parse(id)
                    .map_err(|_| XfccError::BadIdentity(id.chars().take(256).collect()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let peer = ctx
            .remote_addr
            .map_or_else(|| "-".into(), |a| a.ip().to_string());
        Ok(Some(Caller::new(
            ids,
            AuthnKind::xfcc,
            format!("XFCC from gateway {peer}"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// Case 13's trusted-address table.
    #[test]
    fn loopback_is_always_trusted_and_other_peers_only_inside_a_cidr() {
        for (peer, nets, trusted) in [
            ("127.0.0.1:9901", &[][..], true),
            ("172.0.0.1:9901", &[][..], false),
            ("172.17.0.2:9901", &["172.17.0.0/16"][..], true),
            (
                "[2001:db8:1234:1a00::]:80",
                &["2001:db8:1234:1a00::/56"][..],
                true,
            ),
            ("110.17.0.2:9901", &["172.17.0.0/16"][..], false),
            ("[::1]:9901", &[][..], true),
            ("[::ffff:127.0.0.1]:9901", &[][..], true),
            ("[::ffff:172.17.3.4]:9901", &["172.17.0.0/16"][..], true),
            (
                "172.18.0.1:9901",
                &["172.17.0.0/16", "10.0.0.0/8"][..],
                false,
            ),
            (
                "10.200.0.1:9901",
                &["172.17.0.0/16", "10.0.0.0/8"][..],
                true,
            ),
            (
                "[2001:db8:1234:1b00::]:80",
                &["2001:db8:1234:1a00::/56"][..],
                false,
            ),
        ] {
            assert_eq!(
                is_trusted_gateway(Some(peer.parse().unwrap()), &cidrs(nets)),
                trusted,
                "{peer} in {nets:?}"
            );
        }
        assert!(!is_trusted_gateway(None, &cidrs(&["0.0.0.0/0"])));
        assert!(is_trusted_gateway(
            Some("8.8.8.8:1".parse().unwrap()),
            &cidrs(&["0.0.0.0/0"])
        ));
    }

    #[test]
    fn cidrs_need_an_address_and_a_prefix_in_range() {
        assert_eq!(
            "10.1.0.0/16".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        for bad in [
            "10.1.0.0",
            "10.1.0.0/33",
            "::/129",
            "x/8",
            "10.1.0.0/",
            "10.1.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(
            "10.1.2.3/12"
                .parse::<Cidr>()
                .unwrap()
                .contains("10.15.0.1".parse().unwrap())
        );
        assert!(
            !"10.1.2.3/12"
                .parse::<Cidr>()
                .unwrap()
                .contains("10.16.0.1".parse().unwrap())
        );
    }

    #[test]
    fn istios_example_header_gives_the_uri() {
        let h = r#"Hash=meshclient;Subject="";URI=spiffe://mesh.example.com/ns/otherns/sa/othersa"#;
        assert_eq!(
            identities(&parse(h).unwrap()),
            ["spiffe://mesh.example.com/ns/otherns/sa/othersa"]
        );
    }

    #[test]
    fn identities_are_uris_then_dns_then_cn_per_hop() {
        let h = concat!(
            r#"By=spiffe://gw;Hash=ab;Subject="CN=first.example.com,OU=a\,b";URI=spiffe://td/ns/a/sa/b;DNS=a.example.com;DNS=b.example.com;URI=spiffe://td/ns/a/sa/c,"#,
            r#"By=spiffe://gw;Hash=cd;Subject="O=x+CN=second";DNS=c.example.com"#
        );
        assert_eq!(
            identities(&parse(h).unwrap()),
            [
                "spiffe://td/ns/a/sa/b",
                "spiffe://td/ns/a/sa/c",
                "a.example.com",
                "b.example.com",
                "first.example.com",
                "c.example.com",
                "second",
            ]
        );
    }

    #[test]
    fn quoted_values_may_hold_separators() {
        let certs = parse(r#"Subject="CN=a;b,c=d";URI=spiffe://td/x"#).unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].subject.as_deref(), Some("CN=a;b,c=d"));
        assert_eq!(certs[0].uris, ["spiffe://td/x"]);
    }

    #[test]
    fn junk_headers_are_refused() {
        for junk in [
            "junk",
            "URI=spiffe://td/x,",
            ";;",
            r#"Subject="unterminated"#,
            r#"Subject="a"b;URI=x"#,
            "Frob=1",
            r#"URI=a"b"#,
        ] {
            assert!(
                matches!(parse(junk), Err(XfccError::Malformed(_))),
                "{junk}"
            );
        }
        assert_eq!(
            parse(&"a".repeat(MAX_XFCC_BYTES + 1)),
            Err(XfccError::TooLong)
        );
    }

    #[test]
    fn only_san_shaped_identities_are_accepted() {
        for ok in [
            "spiffe://td/ns/a/sa/b",
            "10.0.0.1",
            "::1",
            "a.example.com",
            "*.example.com",
        ] {
            assert!(Identity::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "spiffe://td/ns//sa/b",
            "a b",
            "-a.com",
            "a..com",
            "ex\u{e9}.com",
            "",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }

    fn reserved() -> Vec<String> {
        crate::tls::serving_dns_names(&["ca.Example.org".into()])
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    }

    #[test]
    fn a_wildcard_is_only_the_whole_leftmost_label_of_a_deep_enough_name() {
        for ok in [
            "*.example.com",
            "*.a.b.example",
            "a.example.com",
            "10.0.0.1",
        ] {
            assert_eq!(check_identity(ok, &reserved()), Ok(()), "{ok}");
        }
        for bad in [
            "*",
            "*.com",
            "*.*.com",
            "a*b*c.example",
            "a.*.example.com",
            "*a.example.com",
            "a*.example.com",
            "**.example.com",
            "*.",
            "*.example.*",
        ] {
            assert_eq!(
                check_identity(bad, &reserved()),
                Err(XfccError::BadWildcard(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_cas_own_serving_names_and_wildcards_over_them_are_refused() {
        for bad in [
            "istiod.istio-system.svc",
            "ISTIOD.istio-system.svc",
            "*.istio-system.svc",
            "istiod.other-ns.svc",
            "istiod-remote.x.svc.cluster.local",
            "*.other-ns.svc",
            "localhost",
            "ca.example.org",
            "*.example.org",
        ] {
            assert_eq!(
                check_identity(bad, &reserved()),
                Err(XfccError::CaServingName(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(check_identity("istiod.example.com", &reserved()), Ok(()));
        assert_eq!(check_identity("*.svc.example.com", &reserved()), Ok(()));
    }

    #[test]
    fn identities_are_deduplicated_and_capped() {
        let h = "URI=spiffe://td/ns/a/sa/b;DNS=a.example.com;DNS=a.example.com,URI=spiffe://td/ns/a/sa/b";
        assert_eq!(
            checked_identities(&parse(h).unwrap(), &[]).unwrap(),
            ["spiffe://td/ns/a/sa/b", "a.example.com"]
        );
        let many: Vec<String> = (0..=MAX_XFCC_IDENTITIES)
            .map(|n| format!("DNS=n{n}.example.com"))
            .collect();
        assert_eq!(
            checked_identities(&parse(&many.join(";")).unwrap(), &[]),
            Err(XfccError::TooManyIdentities {
                count: MAX_XFCC_IDENTITIES + 1
            })
        );
        let same = vec!["DNS=a.example.com"; 100].join(";");
        assert_eq!(
            checked_identities(&parse(&same).unwrap(), &[]).unwrap(),
            ["a.example.com"]
        );
    }

    #[test]
    fn very_broad_gateway_ranges_are_recognised() {
        for (cidr, broad) in [
            ("0.0.0.0/0", true),
            ("0.0.0.0/1", true),
            ("10.0.0.0/8", false),
            ("172.17.0.0/16", false),
            ("::/0", true),
            ("2000::/3", true),
            ("2001:db8::/32", false),
        ] {
            assert_eq!(
                cidr.parse::<Cidr>().unwrap().is_very_broad(),
                broad,
                "{cidr}"
            );
        }
    }
}
