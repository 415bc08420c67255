//! The `x-forwarded-client-cert` header of a trusted gateway.
//! What is fed to which parser: [`plugca_fuzz::xfcc`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::xfcc(data);
});
