//! The impersonation policy file (JSON).
//! What is fed to which parser: [`plugca_fuzz::policy`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::policy(data);
});
