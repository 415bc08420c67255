//! PEM text and private keys from mounted files and requests.
//! What is fed to which parser: [`plugca_fuzz::pem`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::pem(data);
});
