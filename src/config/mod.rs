//! Configuration: the system inventory, the canonical entities with their field
//! authority, and the links that say how each system holds each entity, in one TOML file.
//!
//! Every struct denies unknown keys so that a typo is an error with its path rather
//! than a silently ignored setting. Parsing (`load`) and checking references
//! (`validate`) are separate: parsing reports the first syntax or type error with its
//! path, validation reports every semantic problem at once, each with its path.
//!
//! Secrets are never literal: see [`secret`].

mod load;
pub mod secret;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{LoadError, load, parse};
pub use secret::SecretRef;
pub use validate::{Problem, validate};

/// The JSON Schema (2020-12) of the configuration file, generated from these types.
/// `schemas/concord.config.schema.json` is this value, pretty-printed; a test keeps
/// the two equal.
pub fn json_schema() -> serde_json::Value {
    schemars::schema_for!(Config).to_value()
}

/// Default number of changes merged in one redb write transaction: large enough that
/// the fsync of a commit (about a millisecond) is shared by many changes, small enough
/// that a batch is a fraction of a second of work.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Outbox entries an applier takes per round toward a PostgreSQL system, where a round
/// is one transaction of multi-row statements: large rounds make few commits, and the
/// rows of a round are written in order whatever its size.
pub const DEFAULT_POSTGRES_WRITE_BATCH_SIZE: usize = 4000;
/// Default admin listener: loopback only, so nothing is exposed without a decision.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Default number of attempts before a write goes to the dead-letter queue.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// First retry delay; doubled per attempt, with jitter.
pub const DEFAULT_BACKOFF_MIN_MS: u64 = 200;
/// Ceiling of the retry delay, so a long outage is probed at least once a minute.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 60_000;
/// Decisions kept by default: enough to explain a month of a mid-sized deployment.
pub const DEFAULT_DECISION_RETENTION: u64 = 1_000_000;
/// Write-attempt log entries kept by default.
pub const DEFAULT_TXLOG_RETENTION: u64 = 1_000_000;
/// Age after which decisions and the write-attempt log are pruned, in days.
pub const DEFAULT_RETENTION_DAYS: u64 = 30;
/// Default capture interval for polled sources.
pub const DEFAULT_CAPTURE_INTERVAL_SECS: u64 = 10;
/// redb page cache; bounds the memory the state store may use.
pub const DEFAULT_STATE_CACHE_MB: u64 = 48;
/// Longest a captured batch's commit waits for its fsync (group commit).
pub const DEFAULT_DURABLE_INTERVAL_MS: u64 = 100;
/// Upper bound of `state.durable_interval_ms`.
pub const MAX_DURABLE_INTERVAL_MS: u64 = 10_000;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where concord keeps its state.
    pub state: StateConfig,
    /// The admin HTTP listener (health, metrics, status API).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Merge loop and applier tuning.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Connected applications by name.
    pub systems: BTreeMap<String, SystemConfig>,
    /// Canonical record types by name.
    pub entities: BTreeMap<String, EntityConfig>,
    /// How each system holds each entity.
    #[serde(default)]
    pub links: Vec<LinkConfig>,
    /// Directory that relative paths in this file are resolved against; set by `load`
    /// to the directory of the configuration file.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory holding `concord.redb`; relative to the configuration file.
    pub dir: PathBuf,
    /// redb page cache in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Group commit: captured batches committed within this many milliseconds of the
    /// last fsync are committed without one, and the next durable commit covers them.
    /// Their sources are acknowledged, and the writes they plan are sent, only once
    /// durable; a crash before that loses them whole and their sources deliver them
    /// again. 0 makes every batch durable on its own (one fsync per batch).
    #[serde(default = "default_durable_interval_ms")]
    pub durable_interval_ms: u64,
    /// Decisions kept: at least this many, pruned oldest first a write transaction's
    /// group at a time (see `StateStore`'s decisions table), so up to one group more.
    #[serde(default = "default_decision_retention")]
    pub max_decisions: u64,
    /// Most write-attempt log entries kept; the oldest are pruned first.
    #[serde(default = "default_txlog_retention")]
    pub max_write_log: u64,
    /// Decisions and write-attempt log entries older than this are pruned.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// Encryption at rest of record values. Off when absent, so existing state files
    /// and examples keep working; a store created with it cannot be opened without it.
    #[serde(default)]
    pub encryption: Option<StateEncryption>,
}

/// `[state] encryption = { key = { credential = "state-key" } }`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateEncryption {
    /// The key-encryption key: 64 hexadecimal characters (32 bytes, `openssl rand -hex
    /// 32`). It wraps the data keys stored in the state file and is never stored there.
    pub key: SecretRef,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Socket address of the admin listener. Loopback unless told otherwise.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer tokens. When any is set, every endpoint except `/healthz` and `/readyz`
    /// requires one. A list, so an old and a new token overlap during a rotation.
    #[serde(default)]
    pub tokens: Vec<AdminToken>,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<AdminTls>,
    /// Must be true for a listener on a non-loopback address (which also needs tokens):
    /// exposing record data beyond the host is a decision, not a default.
    #[serde(default)]
    pub allow_public: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            tokens: Vec::new(),
            tls: None,
            allow_public: false,
        }
    }
}

/// One admin API bearer token.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Who holds the token; recorded as `who` in the audit log. Never the secret.
    pub name: String,
    /// The token itself, through a file, environment variable or credential.
    pub secret: SecretRef,
}

/// Certificate and private key for the admin listener, PEM files relative to the
/// configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Changes merged per redb transaction.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Write attempts before a write is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Largest retry delay in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_min_ms: DEFAULT_BACKOFF_MIN_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
        }
    }
}

/// One connected application.
///
/// serde cannot combine `deny_unknown_fields` with `flatten` (every key of the
/// flattened connector would count as unknown), so unknown keys are rejected one level
/// down: the connector's own settings struct denies them. The JSON Schema still denies
/// them here (`unevaluatedProperties: false`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SystemConfig {
    /// Connector type and its settings.
    #[serde(flatten)]
    pub connector: ConnectorConfig,
    /// Whether concord reads from, writes to, or both.
    #[serde(default)]
    pub direction: Direction,
    /// Request budget toward this system, shared by all its links.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Credentials, always by reference.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// What this system is, for the inventory (`concord plan`).
    #[serde(default)]
    pub description: Option<String>,
    /// Outbox entries taken per applier round toward this system (see
    /// [`write_batch_size`](Self::write_batch_size) for the default).
    #[serde(default)]
    pub write_batch_size: Option<usize>,
}

impl SystemConfig {
    /// Outbox entries per applier round: the configured size, or
    /// [`DEFAULT_POSTGRES_WRITE_BATCH_SIZE`] toward PostgreSQL (one transaction per
    /// round) and `engine.batch_size` toward the others (a round toward a rate-limited API
    /// or an export file stays short).
    pub fn write_batch_size(&self, engine: &EngineConfig) -> usize {
        self.write_batch_size.unwrap_or(match self.connector {
            ConnectorConfig::Postgres(_) => DEFAULT_POSTGRES_WRITE_BATCH_SIZE,
            _ => engine.batch_size,
        })
    }
}

/// The connector type picks the code that talks to a system. A closed set: adding a
/// connector adds a variant and the compiler lists every place to handle it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorConfig {
    /// Batch export files in a directory (CSV or JSONL), and export files written out.
    File(crate::connector::file::FileSystemConfig),
    /// A JSON REST API: polled with an updated-since cursor, written with
    /// create/update/upsert/delete requests.
    Rest(crate::connector::rest::RestSystemConfig),
    /// A PostgreSQL database: changes captured through logical replication (`pgoutput`),
    /// merged records written back.
    Postgres(crate::connector::postgres::PostgresSystemConfig),
}

impl ConnectorConfig {
    /// The type name as written in the configuration.
    pub fn type_name(&self) -> &'static str {
        match self {
            ConnectorConfig::File(_) => "file",
            ConnectorConfig::Rest(_) => "rest",
            ConnectorConfig::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// concord captures changes from the system only.
    Read,
    /// concord writes to the system only.
    Write,
    /// Both.
    #[default]
    Both,
}

impl Direction {
    pub fn reads(self) -> bool {
        matches!(self, Direction::Read | Direction::Both)
    }
    pub fn writes(self) -> bool {
        matches!(self, Direction::Write | Direction::Both)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests that may be sent at once after an idle period.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

/// How concord authenticates to a system. The secret itself is a reference.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// A static key sent in a header or query parameter.
    ApiKey {
        key: SecretRef,
        #[serde(default)]
        header: Option<String>,
        #[serde(default)]
        query: Option<String>,
    },
    /// A static bearer token.
    Bearer { token: SecretRef },
    /// HTTP basic authentication.
    Basic { username: String, password: SecretRef },
}

impl AuthConfig {
    pub fn method_name(&self) -> &'static str {
        match self {
            AuthConfig::ApiKey { .. } => "api_key",
            AuthConfig::Bearer { .. } => "bearer",
            AuthConfig::Basic { .. } => "basic",
        }
    }
}

/// One canonical record type.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// JSON Schema (2020-12) every mapped change is validated against; relative to the
    /// configuration file.
    pub schema: PathBuf,
    /// Canonical fields that recognise the same record across systems, tried in order.
    #[serde(default)]
    pub match_keys: Vec<String>,
    /// Policy for fields that have no owner.
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    /// Field authority, by canonical field name.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldAuthorityConfig>,
    /// Who may delete records and how much at once.
    #[serde(default)]
    pub delete: DeleteConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultPolicy {
    /// The change with the later source time wins.
    #[default]
    LastWriterWins,
    /// The first value set stays until an owner changes it.
    FirstWriterWins,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldAuthorityConfig {
    /// Systems that own the field, highest precedence first.
    #[serde(default)]
    pub owners: Vec<String>,
    /// When true, all owners rank equally and the later source time wins among them.
    #[serde(default)]
    pub owners_equal: bool,
    /// What happens to a change from a system that does not own the field.
    #[serde(default)]
    pub non_owner: NonOwnerPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NonOwnerPolicy {
    /// Write the agreed value back to the system that changed it.
    #[default]
    Revert,
    /// Leave the system's own value in place, do not spread it.
    Ignore,
    /// Like ignore, and park the change for review.
    Flag,
}

impl NonOwnerPolicy {
    /// The name as written in the configuration; also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            NonOwnerPolicy::Revert => "revert",
            NonOwnerPolicy::Ignore => "ignore",
            NonOwnerPolicy::Flag => "flag",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteConfig {
    /// Systems whose deletes end a record; empty means every linked system.
    #[serde(default)]
    pub allowed_from: Vec<String>,
    /// Largest share (0..=1) of one system's records one batch may delete; above it the
    /// batch's deletes are dead-lettered for review.
    #[serde(default = "default_max_delete_share")]
    pub max_share: f64,
    /// The guard applies only when the system holds at least this many records.
    #[serde(default = "default_guard_min_records")]
    pub guard_min_records: u64,
}

impl Default for DeleteConfig {
    fn default() -> Self {
        Self {
            allowed_from: Vec::new(),
            max_share: default_max_delete_share(),
            guard_min_records: default_guard_min_records(),
        }
    }
}

/// How one system holds one entity.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub system: String,
    pub entity: String,
    /// Object, table or file pattern, as the connector understands it.
    pub object: String,
    /// The system field that holds the system's own id for a record.
    pub id_field: String,
    /// The system field that holds the record's version or modification time, if any.
    #[serde(default)]
    pub version_field: Option<String>,
    /// Field mapping rules, each both ways unless restricted.
    #[serde(default)]
    pub map: Vec<FieldMapConfig>,
    /// Capture schedule; absent means this link does not capture. Capture also needs
    /// a system whose direction reads.
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    /// Which writes concord may make; `upsert` when left out on a system concord
    /// writes to.
    #[serde(default)]
    pub write: Option<WriteMode>,
    /// Record what would be written, write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Only records selected here are synced through this link.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
    /// What a delete of the record (decided elsewhere) does in this system.
    #[serde(default)]
    pub on_delete: OnDelete,
    /// Country calling code assumed for phone numbers written without one ("+44").
    #[serde(default)]
    pub default_country_code: Option<String>,
}

impl LinkConfig {
    /// The write mode in force: as configured, `upsert` by default.
    pub fn write_mode(&self) -> WriteMode {
        self.write.unwrap_or_default()
    }

    /// Stable name of the link, used as the checkpoint stream and in status.
    pub fn name(&self) -> String {
        format!("{}.{}", self.system, self.entity)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Seconds between polls of the source.
    #[serde(default = "default_capture_interval")]
    pub interval_secs: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Only create records the system does not hold yet.
    Create,
    /// Only update records the system already holds.
    Update,
    /// Create or update.
    #[default]
    Upsert,
    /// Never write.
    ReadOnly,
}

impl WriteMode {
    pub fn may_create(self) -> bool {
        matches!(self, WriteMode::Create | WriteMode::Upsert)
    }
    pub fn may_update(self) -> bool {
        matches!(self, WriteMode::Update | WriteMode::Upsert)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Share of records, 0..=100, chosen by a stable hash of the first match key.
    #[serde(default)]
    pub percent: Option<f64>,
    /// Explicit match-key values (normalised as the key is) that are in the rollout.
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OnDelete {
    /// Delete the record in this system too.
    #[default]
    Propagate,
    /// Leave this system's record alone.
    Ignore,
    /// Set a field instead of deleting.
    SoftDelete {
        /// System field to set.
        field: String,
        /// Value to set it to.
        value: serde_json::Value,
    },
}

/// One mapping rule between canonical fields and system fields.
///
/// `canonical` and `system` are each one field or a list; at most one of them is a list:
/// one to one (rename with transforms), many system fields joined into one canonical
/// field (and split on the way out), or one system field split into many canonical
/// fields (and joined on the way out). A rule with `constant` and no `canonical` sets a
/// system field on every write.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldMapConfig {
    #[serde(default)]
    pub canonical: Option<OneOrMany>,
    pub system: OneOrMany,
    /// Transforms applied in order on the way in, undone in reverse order on the way out.
    #[serde(default)]
    pub transforms: Vec<Transform>,
    /// Separator for join and split rules.
    #[serde(default = "default_separator")]
    pub separator: String,
    /// A constant value: written to the system field (no `canonical`), or taken as the
    /// canonical value (with `canonical`).
    #[serde(default)]
    pub constant: Option<serde_json::Value>,
    /// Which way the rule applies.
    #[serde(default)]
    pub direction: MapDirection,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MapDirection {
    #[default]
    Both,
    /// System to canonical only.
    In,
    /// Canonical to system only.
    Out,
}

/// A value transform. Inbound it normalises a system value into the canonical form;
/// outbound it is undone where that has meaning (dates, value maps) and is the
/// identity otherwise (trim, case, phone).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Trim,
    Lower,
    Upper,
    /// Normalise a phone number to E.164 (`+` and 8 to 15 digits).
    E164,
    /// Reformat a date or time: `system` and `canonical` are strftime formats.
    Date {
        system: String,
        canonical: String,
    },
    /// Replace values by a table; the inverse table is used on the way out.
    Map(BTreeMap<String, serde_json::Value>),
    /// Parse text into a boolean, integer or number on the way in.
    Parse(ParseType),
    /// An empty string becomes null on the way in.
    EmptyAsNull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParseType {
    Bool,
    Integer,
    Number,
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_backoff_min_ms() -> u64 {
    DEFAULT_BACKOFF_MIN_MS
}
fn default_backoff_max_ms() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}
fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_string()
}
fn default_cache_mb() -> u64 {
    DEFAULT_STATE_CACHE_MB
}
fn default_durable_interval_ms() -> u64 {
    DEFAULT_DURABLE_INTERVAL_MS
}
fn default_decision_retention() -> u64 {
    DEFAULT_DECISION_RETENTION
}
fn default_txlog_retention() -> u64 {
    DEFAULT_TXLOG_RETENTION
}
fn default_retention_days() -> u64 {
    DEFAULT_RETENTION_DAYS
}
fn default_capture_interval() -> u64 {
    DEFAULT_CAPTURE_INTERVAL_SECS
}
/// One burst slot per request per second, at least one.
fn default_burst() -> u32 {
    1
}
/// A batch that would delete a tenth of a system's records is more likely a broken
/// export than a real clean-up.
fn default_max_delete_share() -> f64 {
    0.1
}
/// Below this many records the share is too noisy to judge.
fn default_guard_min_records() -> u64 {
    20
}
fn default_separator() -> String {
    " ".to_string()
}
