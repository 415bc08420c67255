//! plugca: an Istio-compatible certificate authority for plugged-in CA certificates.
//!
//! # Layout
//! The modules follow a request's path:
//! - [`config`]: command-line flags and environment to a typed [`config::Config`].
//! - [`ca`]: loading and checking the plugged-in bundle, CA keys, generation, leaf signing.
//! - [`authn`]: who the caller is ([`authn::Caller`]), one module per authenticator.
//! - [`impersonation`]: who may ask for another workload's certificate (ztunnel).
//! - [`kubernetes`]: API clients per cluster (TokenReview, pod watch).
//! - [`csr`]: untrusted CSR bytes to a [`csr::VerifiedCsr`].
//! - [`issuance`]: the CreateCertificate policy: identity, TTL, leaf, response chain.
//! - [`server`]: the gRPC service and the one error-to-status mapping.
//! - [`tls`]: the serving certificate and the TLS listener.
//! - [`net`], [`limits`]: serving gRPC connections within connection, stream,
//!   request and age limits derived from the open-file limit.
//! - [`metrics`], [`monitoring`]: Prometheus metrics, `/ready`, `/healthz`, `/metrics`.
//! - [`app`]: binds the listeners and runs everything.
//! - [`client`], [`cli`]: the `plugca` subcommands (`serve`, `request`, ...).
//! - [`bench`]: `plugca bench`, the load generator and the offline issuance ceiling.
//! - [`identity`], [`pem`], [`asn1`], [`duration`]: shared building blocks.
#![forbid(unsafe_code)]

pub mod app;
pub mod asn1;
pub mod authn;
pub mod bench;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod csr;
pub mod duration;
pub mod fault;
pub mod fsutil;
pub mod identity;
pub mod impersonation;
pub mod issuance;
pub mod kubernetes;
pub mod limits;
pub mod metrics;
pub mod monitoring;
pub mod net;
pub mod pem;
pub mod reload;
pub mod server;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

/// Generated protobuf and gRPC code for `istio.v1.auth`.
pub mod pb {
    tonic::include_proto!("istio.v1.auth");

    /// Encoded descriptor set of the proto (and its imports), for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ca_descriptor.bin"));
}
