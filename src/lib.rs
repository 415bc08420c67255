//! plugca: an Istio-compatible certificate authority for plugged-in CA certificates.
//!
//! # Layout
//! The modules follow a request's path:
//! - [`config`]: command-line flags and environment to a typed [`config::Config`]
//!   (also [`config::Config::from_args`] for tools and tests).
//! - [`ca`]: loading and checking the plugged-in bundle, CA keys, generation, leaf signing,
//!   and [`ca::Current`], the bundle serving now.
//! - [`authn`]: who the caller is ([`authn::Caller`]), one module per authenticator.
//! - [`impersonation`]: who may ask for another workload's certificate (ztunnel).
//! - [`kubernetes`]: API clients per cluster (TokenReview, pod watch).
//! - [`csr`]: untrusted CSR bytes to a [`csr::VerifiedCsr`].
//! - [`issuance`]: the CreateCertificate policy: identity, TTL, leaf, response chain.
//! - [`server`]: the gRPC handler; [`server::error`] the one error-to-status mapping,
//!   `server::audit` the audit line, [`server::harness`] faults and the issued log.
//! - [`tls`]: the serving certificate and the TLS listener.
//! - [`net`], [`limits`]: serving gRPC connections within connection, stream,
//!   request and age limits derived from the open-file limit.
//! - [`metrics`], [`monitoring`]: Prometheus metrics, `/ready`, `/healthz`, `/metrics`.
//! - [`logging`]: the log queue to stderr that drops (and counts) instead of
//!   blocking, and the refusal audit line rate.
//! - [`controllers`]: in-cluster writers (root ConfigMap, `istiod-tls`) behind a Lease.
//! - [`app`]: [`app::spawn`], the one way to start a server (the binary,
//!   `plugca bench`, `testing` and the integration tests), binding every
//!   listener first and running everything.
//! - [`client`], [`cli`]: the `plugca` subcommands (`serve`, `request`,
//!   `doctor` with its findings in `cli::doctor::findings`, `bench` with the
//!   load generator and the offline issuance ceiling in `cli::bench::*`).
//! - [`jwt_issuer`]: a JWT issuer (key, JWKS, tokens) for bench and tests.
//! - `testing` (feature `testing`): the in-process server and test CA.
//! - [`identity`], [`pem`], [`asn1`], [`duration`]: shared building blocks.
#![forbid(unsafe_code)]

pub mod app;
pub mod asn1;
pub mod authn;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod controllers;
pub mod csr;
pub mod duration;
pub mod fsutil;
pub mod identity;
pub mod impersonation;
pub mod issuance;
pub mod jwt_issuer;
pub mod kubernetes;
pub mod limits;
pub mod logging;
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
