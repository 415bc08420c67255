//! The CSR a client sends in `IstioCertificateRequest.csr` (DER and PEM).
//! What is fed to which parser: [`plugca_fuzz::csr`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    plugca_fuzz::csr(data);
});
