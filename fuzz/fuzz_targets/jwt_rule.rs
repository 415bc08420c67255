//! `JWT_RULE` / `--jwt-rule` JSON.
//! What is fed to which parser: [`plugca_fuzz::jwt_rule`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::jwt_rule(data);
});
