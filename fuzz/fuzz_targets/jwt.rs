//! Bearer JWTs before and after the signature check, and JWKS documents.
//! What is fed to which parser: [`plugca_fuzz::jwt`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::jwt(data);
});
