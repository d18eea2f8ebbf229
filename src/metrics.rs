//! Every metric name and label concord exports, declared once with its unit and help.
//! Dashboards and alerts may use only names from this module. Labels are bounded by
//! configuration (system, entity, field, outcome, error class); never a record id, a
//! value, a URL or a message.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

// Labels.
pub const LABEL_SYSTEM: &str = "system";
pub const LABEL_ENTITY: &str = "entity";
pub const LABEL_FIELD: &str = "field";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_OP: &str = "op";
pub const LABEL_CLASS: &str = "class";
pub const LABEL_POLICY: &str = "policy";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_VERSION: &str = "version";
pub const LABEL_LINK: &str = "link";
pub const LABEL_METHOD: &str = "method";
pub const LABEL_DURABILITY: &str = "durability";

/// Build information; value 1, the version in a label.
pub const BUILD_INFO: &str = "concord_build_info";
/// Records captured from a source, by system and entity.
pub const CHANGES_CAPTURED: &str = "concord_changes_captured_total";
/// Changes merged, by entity and outcome (applied, noop, flagged, deleted, skipped).
pub const CHANGES_MERGED: &str = "concord_changes_merged_total";
/// Field proposals rejected by authority, by entity, field and non-owner policy.
pub const FIELD_REJECTIONS: &str = "concord_field_rejections_total";
/// Fields changed by two systems since the last agreed version.
pub const CONFLICTS: &str = "concord_conflicts_total";
/// Changes that failed validation against the canonical schema or mapping.
pub const VALIDATION_FAILURES: &str = "concord_validation_failures_total";
/// Items put in the dead-letter queue, by system, entity and reason class.
pub const DEAD_LETTERS: &str = "concord_dead_letters_total";
/// Current dead-letter queue entries, by system.
pub const DLQ_DEPTH: &str = "concord_dlq_entries";
/// Current pending outbox entries, by system.
pub const OUTBOX_DEPTH: &str = "concord_outbox_entries";
/// Write attempts, by system, entity, op and outcome (ok, retry, dead_letter, dry_run,
/// conflict: refused because the record changed in the system, read again and merged).
pub const WRITES: &str = "concord_writes_total";
/// Age of the oldest change a source holds that concord has not captured yet.
pub const SOURCE_LAG: &str = "concord_source_lag_seconds";
/// From source commit to applied in the target system, by target system.
pub const END_TO_END_LATENCY: &str = "concord_end_to_end_latency_seconds";
/// Duration of one state store commit, by durability: `durable` (its pages written and
/// its sync asked for, which runs behind it: [`STATE_SYNC_DURATION`]) or `lazy` (a batch
/// commit of a group, made durable by the next durable commit).
pub const STATE_COMMIT_DURATION: &str = "concord_state_commit_duration_seconds";
/// Duration of one sync (`fdatasync`) of the state file, run behind the writer.
pub const STATE_SYNC_DURATION: &str = "concord_state_sync_duration_seconds";
/// Export files finished, by system and outcome (processed, failed).
pub const FILES: &str = "concord_files_total";
/// Unix time of the last successful poll (even one that found nothing) or write, by system.
pub const LAST_SUCCESS: &str = "concord_last_success_timestamp_seconds";
/// Errors talking to a system, by system and class (transient, permanent, fatal).
pub const SYSTEM_ERRORS: &str = "concord_system_errors_total";
/// 1 while a link is running, 0 once it stopped on a fatal error, by link.
pub const LINK_UP: &str = "concord_link_up";
/// Records in the state store.
pub const RECORDS: &str = "concord_records";
/// Admin API requests, by outcome (status class).
pub const ADMIN_REQUESTS: &str = "concord_admin_requests_total";
/// WAL the server keeps for a link's replication slot (current WAL position minus the
/// slot's restart_lsn), by system and link.
pub const PG_SLOT_RETAINED_WAL: &str = "concord_postgres_slot_retained_wal_bytes";
/// How far a slot's confirmed flush position trails the server's current WAL position,
/// by system and link.
pub const PG_SLOT_CONFIRMED_LAG: &str = "concord_postgres_slot_confirmed_lag_bytes";

/// HTTP requests to REST systems, by system, method and status class (2xx, 4xx, 5xx,
/// error for no answer). Never the URL.
pub const HTTP_REQUESTS: &str = "concord_http_requests_total";
/// Duration of one HTTP request to a REST system, answer body included, by system.
pub const HTTP_REQUEST_DURATION: &str = "concord_http_request_duration_seconds";
/// Share of a system's rate budget left (0..1), from its rate-limit headers, by system.
pub const RATE_LIMIT_HEADROOM: &str = "concord_rate_limit_headroom_ratio";

/// Every metric name above, for the tests that hold dashboards, alerts and the
/// exposition to this list.
pub const ALL: &[&str] = &[
    BUILD_INFO,
    CHANGES_CAPTURED,
    CHANGES_MERGED,
    FIELD_REJECTIONS,
    CONFLICTS,
    VALIDATION_FAILURES,
    DEAD_LETTERS,
    DLQ_DEPTH,
    OUTBOX_DEPTH,
    WRITES,
    SOURCE_LAG,
    END_TO_END_LATENCY,
    STATE_COMMIT_DURATION,
    STATE_SYNC_DURATION,
    FILES,
    LAST_SUCCESS,
    SYSTEM_ERRORS,
    LINK_UP,
    RECORDS,
    ADMIN_REQUESTS,
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    RATE_LIMIT_HEADROOM,
    PG_SLOT_RETAINED_WAL,
    PG_SLOT_CONFIRMED_LAG,
];

/// Buckets for latency histograms, in seconds: 1 ms to 5 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Every histogram name, so the exporter renders each as a histogram with
/// [`LATENCY_BUCKETS`].
pub const HISTOGRAMS: &[&str] = &[
    END_TO_END_LATENCY,
    STATE_COMMIT_DURATION,
    STATE_SYNC_DURATION,
    HTTP_REQUEST_DURATION,
];

/// Registers help text and units with the recorder. Call once after installing it.
pub fn describe() {
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    describe_gauge!(
        PG_SLOT_RETAINED_WAL,
        Unit::Bytes,
        "WAL the PostgreSQL server retains for the link's replication slot."
    );
    describe_gauge!(
        PG_SLOT_CONFIRMED_LAG,
        Unit::Bytes,
        "Bytes of WAL between the server's position and the slot's confirmed flush position."
    );
    describe_counter!(CHANGES_CAPTURED, Unit::Count, "Records captured from a source.");
    describe_counter!(CHANGES_MERGED, Unit::Count, "Changes merged, by outcome.");
    describe_counter!(
        FIELD_REJECTIONS,
        Unit::Count,
        "Field changes rejected by field authority."
    );
    describe_counter!(
        CONFLICTS,
        Unit::Count,
        "Fields changed by two systems since the last agreed version."
    );
    describe_counter!(
        VALIDATION_FAILURES,
        Unit::Count,
        "Changes that failed mapping or schema validation."
    );
    describe_counter!(DEAD_LETTERS, Unit::Count, "Items put in the dead-letter queue.");
    describe_gauge!(DLQ_DEPTH, Unit::Count, "Entries in the dead-letter queue.");
    describe_gauge!(OUTBOX_DEPTH, Unit::Count, "Pending writes in the outbox.");
    describe_counter!(WRITES, Unit::Count, "Write attempts to systems, by outcome.");
    describe_gauge!(SOURCE_LAG, Unit::Seconds, "Age of the oldest change not yet captured.");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "Time from source commit to applied in the target."
    );
    describe_histogram!(
        STATE_COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one state store commit."
    );
    describe_histogram!(
        STATE_SYNC_DURATION,
        Unit::Seconds,
        "Duration of one sync of the state file, run behind the writer."
    );
    describe_counter!(FILES, Unit::Count, "Export files finished, by outcome.");
    describe_gauge!(
        LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the last successful capture or write."
    );
    describe_counter!(SYSTEM_ERRORS, Unit::Count, "Errors talking to a system, by class.");
    describe_gauge!(LINK_UP, "1 while a link runs, 0 after it stopped on a fatal error.");
    describe_gauge!(RECORDS, Unit::Count, "Records in the state store.");
    describe_counter!(ADMIN_REQUESTS, Unit::Count, "Admin API requests, by status class.");
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests to REST systems, by status class."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Duration of one HTTP request to a REST system."
    );
    describe_gauge!(
        RATE_LIMIT_HEADROOM,
        "Share of the system's rate budget left, from its rate-limit headers."
    );
    metrics::gauge!(BUILD_INFO, LABEL_VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
}
