//! The certificate authority proper: bundle loading and checks, keys,
//! generation of CA certificates, and leaf signing. No tokio or tonic here.

pub mod bundle;
pub mod cert;
pub mod current;
pub mod generate;
pub mod keys;
pub mod rotation;
pub mod selfsigned;
pub mod signer;

pub use bundle::{BundleError, CaBundle, Layout};
pub use current::Current;
pub use signer::{IssuedLeaf, LeafSpec, SignError, Signer};
