//! Fault specs as the admin endpoint and `--fault` take them.
//! What is fed to which parser: [`plugca_fuzz::fault`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::fault(data);
});
