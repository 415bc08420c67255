//! Metrics of the in-cluster controllers: leadership, writes and errors, with
//! labels from closed enums (bounded cardinality: no namespace label).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which controller a sample is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Controller {
    root_configmap,
    istiod_tls,
    leader_election,
    self_signed_secret,
}

/// What a write did.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum WriteKind {
    /// The object was missing (never written, or deleted by someone).
    create,
    /// The object existed with other content (edited, stale after a reload, due for renewal).
    update,
    /// The object had to be deleted first (a Secret of another type).
    replace,
}

/// Where an error happened.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ErrorKind {
    /// A watch (list/watch) failed; it retries with backoff.
    watch,
    /// A create, update or delete was refused or failed.
    write,
    /// The CA could not issue (no bundle, signing failed).
    issue,
    /// Taking, renewing or checking the Lease failed.
    lease,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub controller: Controller,
    pub kind: WriteKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: Controller,
    pub kind: ErrorKind,
}

/// The controllers' metrics, registered once into the server's registry.
#[derive(Debug, Clone, Default)]
pub struct ControllerMetrics {
    /// 1 while this replica holds the Lease and may write.
    pub leader: Gauge,
    pub writes: Family<WriteLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
}

impl ControllerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugca_controller_leader",
            "1 while this replica holds the controllers' Lease and may write ConfigMaps and Secrets",
            self.leader.clone(),
        );
        registry.register(
            "plugca_controller_writes",
            "Objects written by the in-cluster controllers, by controller and kind",
            self.writes.clone(),
        );
        registry.register(
            "plugca_controller_errors",
            "Errors of the in-cluster controllers, by controller and kind",
            self.errors.clone(),
        );
    }

    pub fn wrote(&self, controller: Controller, kind: WriteKind) {
        self.writes
            .get_or_create(&WriteLabels { controller, kind })
            .inc();
    }

    pub fn failed(&self, controller: Controller, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels { controller, kind })
            .inc();
    }

    pub fn writes(&self, controller: Controller, kind: WriteKind) -> u64 {
        self.writes
            .get_or_create(&WriteLabels { controller, kind })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_families_render_with_bounded_labels() {
        let m = ControllerMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.leader.set(1);
        m.wrote(Controller::root_configmap, WriteKind::create);
        m.failed(Controller::istiod_tls, ErrorKind::write);
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry).unwrap();
        assert!(text.contains("plugca_controller_leader 1\n"), "{text}");
        assert!(
            text.contains(
                "plugca_controller_writes_total{controller=\"root_configmap\",kind=\"create\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "plugca_controller_errors_total{controller=\"istiod_tls\",kind=\"write\"} 1\n"
            ),
            "{text}"
        );
    }
}
