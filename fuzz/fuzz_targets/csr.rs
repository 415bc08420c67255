//! Untrusted CSR bytes, as a client sends them in `IstioCertificateRequest.csr`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = plugca::csr::VerifiedCsr::from_der(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = plugca::csr::VerifiedCsr::parse(text);
    }
});
