//! PEM text from mounted files and requests.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = plugca::pem::parse_all(text);
        let _ = plugca::ca::keys::CaKey::from_pem(text);
    }
});
