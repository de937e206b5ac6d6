//! Every metric of `plex` (STYLE 14), named `plex_<noun>_<unit>`, labelled with the aggregate
//! and the plex. The caller registers them once (`register`) in the daemon's registry; an
//! aggregate whose options carry unregistered metrics still counts, nobody reads it.
//!
//! Invariants: counters only increase; every I/O error an aggregate sees (a failed or timed-out
//! read, write or flush, a block that fails its checksum) increments `plex_io_errors_total`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use crate::types::Uuid;

/// Labels of a per-plex counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlexLabels {
    /// The aggregate's uuid in hex.
    pub aggregate: String,
    /// 0 or 1.
    pub plex: u64,
}

/// Labels of an I/O error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IoErrorLabels {
    /// The aggregate's uuid in hex.
    pub aggregate: String,
    /// 0 or 1.
    pub plex: u64,
    /// `read`, `write`, `flush`, `checksum` or `timeout`.
    pub kind: String,
}

/// The counters of every aggregate of a process.
#[derive(Clone, Debug, Default)]
pub struct PlexMetrics {
    read_repairs: Family<PlexLabels, Counter>,
    unrepaired_reads: Family<PlexLabels, Counter>,
    io_errors: Family<IoErrorLabels, Counter>,
    drops: Family<PlexLabels, Counter>,
    resync_copied: Family<PlexLabels, Counter>,
}

/// The uuid as metrics and logs show it.
pub fn uuid_hex(uuid: Uuid) -> String {
    uuid.0.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl PlexMetrics {
    /// Registers every counter in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plex_read_repairs",
            "Reads served from the other plex, with the bad copy rewritten",
            self.read_repairs.clone(),
        );
        registry.register(
            "plex_unrepaired_reads",
            "Reads that failed on a plex and could not be served from the other",
            self.unrepaired_reads.clone(),
        );
        registry.register(
            "plex_io_errors",
            "I/O errors (failed or timed-out read, write or flush; checksum mismatches) per plex",
            self.io_errors.clone(),
        );
        registry.register("plex_drops", "Times a plex was dropped from its mirror", self.drops.clone());
        registry.register_with_unit(
            "plex_resync_copied",
            "Bytes resync copied to this plex and made durable",
            Unit::Bytes,
            self.resync_copied.clone(),
        );
    }

    fn labels(aggregate: Uuid, plex: usize) -> PlexLabels {
        PlexLabels { aggregate: uuid_hex(aggregate), plex: plex as u64 }
    }

    pub(crate) fn read_repaired(&self, aggregate: Uuid, plex: usize) {
        self.read_repairs.get_or_create(&Self::labels(aggregate, plex)).inc();
    }

    pub(crate) fn read_unrepaired(&self, aggregate: Uuid, plex: usize) {
        self.unrepaired_reads.get_or_create(&Self::labels(aggregate, plex)).inc();
    }

    pub(crate) fn io_error(&self, aggregate: Uuid, plex: usize, kind: &str) {
        let labels =
            IoErrorLabels { aggregate: uuid_hex(aggregate), plex: plex as u64, kind: kind.to_string() };
        self.io_errors.get_or_create(&labels).inc();
    }

    pub(crate) fn dropped(&self, aggregate: Uuid, plex: usize) {
        self.drops.get_or_create(&Self::labels(aggregate, plex)).inc();
    }

    pub(crate) fn resync_copied(&self, aggregate: Uuid, target: usize, bytes: u64) {
        self.resync_copied.get_or_create(&Self::labels(aggregate, target)).inc_by(bytes);
    }
}
