//! The few DER encodings the CA writes itself: a PKCS#8 wrapper for PKCS#1 and
//! SEC1 keys, and the GeneralNames of a subjectAltName.

/// rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
pub const RSA_ENCRYPTION_ALG: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// id-ecPublicKey (1.2.840.10045.2.1).
pub const ID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 / P-256 (1.2.840.10045.3.1.7).
pub const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// secp384r1 / P-384 (1.3.132.0.34).
pub const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Appends a DER TLV.
pub fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    push_tlv(&mut out, tag, content);
    out
}

/// PKCS#8 PrivateKeyInfo { version 0, algorithm, OCTET STRING key }.
pub fn pkcs8_wrap(algorithm_identifier: &[u8], private_key: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(private_key.len() + algorithm_identifier.len() + 8);
    body.extend_from_slice(&[0x02, 0x01, 0x00]);
    body.extend_from_slice(algorithm_identifier);
    push_tlv(&mut body, 0x04, private_key);
    tlv(0x30, &body)
}

/// AlgorithmIdentifier for an EC key on the curve whose OID TLV is given.
pub fn ec_algorithm(curve_oid_tlv: &[u8]) -> Vec<u8> {
    let mut body = ID_EC_PUBLIC_KEY.to_vec();
    body.extend_from_slice(curve_oid_tlv);
    tlv(0x30, &body)
}

/// One entry of a GeneralNames sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneralName {
    Uri(String),
    Dns(String),
    Ip(std::net::IpAddr),
}

impl std::fmt::Display for GeneralName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GeneralName::Uri(u) => write!(f, "URI:{u}"),
            GeneralName::Dns(d) => write!(f, "DNS:{d}"),
            GeneralName::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// DER of `GeneralNames` (the extnValue content of subjectAltName).
pub fn general_names(names: &[GeneralName]) -> Vec<u8> {
    let mut body = Vec::new();
    for name in names {
        match name {
            GeneralName::Dns(s) => push_tlv(&mut body, 0x82, s.as_bytes()),
            GeneralName::Uri(s) => push_tlv(&mut body, 0x86, s.as_bytes()),
            GeneralName::Ip(std::net::IpAddr::V4(a)) => push_tlv(&mut body, 0x87, &a.octets()),
            GeneralName::Ip(std::net::IpAddr::V6(a)) => push_tlv(&mut body, 0x87, &a.octets()),
        }
    }
    tlv(0x30, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_use_the_long_form() {
        assert_eq!(tlv(0x04, &[0; 3])[..2], [0x04, 3]);
        assert_eq!(tlv(0x04, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn general_names_encode_each_type() {
        let der = general_names(&[
            GeneralName::Uri("spiffe://a/b".into()),
            GeneralName::Dns("x".into()),
            GeneralName::Ip("10.0.0.1".parse().unwrap()),
        ]);
        assert_eq!(
            der,
            [
                vec![0x30, 23, 0x86, 12],
                b"spiffe://a/b".to_vec(),
                vec![0x82, 1, b'x', 0x87, 4, 10, 0, 0, 1]
            ]
            .concat()
        );
    }
}
