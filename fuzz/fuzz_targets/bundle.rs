//! The cacerts directory loader over arbitrary file contents.
//! What is fed to which parser: [`plugca_fuzz::bundle`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::bundle(data);
});
