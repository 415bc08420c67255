//! Go durations from flags, env and fault specs.
//! What is fed to which parser: [`plugca_fuzz::duration`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::duration(data);
});
