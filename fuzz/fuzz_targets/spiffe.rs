//! SPIFFE IDs and trust domains, with Display round trips.
//! What is fed to which parser: [`plugca_fuzz::spiffe`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::spiffe(data);
});
