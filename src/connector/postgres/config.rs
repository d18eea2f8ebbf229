//! Settings of a `postgres` system.
//!
//! ```toml
//! [systems.app]
//! type = "postgres"
//! host = "db.internal"
//! port = 5432
//! database = "app"
//! user = "concord"
//! password = { credential = "app-db-password" }
//! tls = "verify_full"                   # disable | require | verify_full
//! tls_ca_file = "/etc/concord/db-ca.pem" # optional: trust this CA instead of the web PKI roots
//! slot = "concord"                      # each capturing link gets slot "<slot>_<entity>"
//! publication = "concord"
//! create_slot = true
//! create_publication = true
//! resnapshot_on_slot_loss = false       # true: a lost slot is replaced and the table read again
//! snapshot_chunk_rows = 10000
//! status_interval_secs = 10
//! heartbeat_interval_secs = 60
//!
//! [[links]]
//! system = "app"
//! entity = "contact"
//! object = "crm.contacts"  # "schema.table", or "table" in schema public
//! id_field = "id"          # the primary-key column (a single column)
//! capture = { interval_secs = 1 }
//! ```
//!
//! The password is this connector's own `password` key, a secret reference like every
//! secret; the generic `auth` table of a system is for HTTP connectors and is refused on a
//! `postgres` system, so there is exactly one place to look for the database password.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::SecretRef;

/// PostgreSQL's own default port.
pub const DEFAULT_PORT: u16 = 5432;
/// Slot base name when none is set; a link's slot is `<slot>_<entity>`.
pub const DEFAULT_SLOT: &str = "concord";
/// Publication name when none is set.
pub const DEFAULT_PUBLICATION: &str = "concord";
/// Rows read per snapshot query: large enough that per-query overhead vanishes, small
/// enough that one chunk is a fraction of a second of work and of memory.
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: u32 = 10_000;
/// Seconds between standby status updates, the same as PostgreSQL's own
/// `wal_receiver_status_interval`; well inside the server's `wal_sender_timeout` (60 s).
pub const DEFAULT_STATUS_INTERVAL_SECS: u64 = 10;
/// Seconds without any change of the captured table after which the confirmed position
/// is moved to the server's current WAL position, so an idle table does not make the
/// server retain WAL that other tables and databases write.
pub const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 60;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSystemConfig {
    /// Host name or IP address of the server; a path starting with `/` is a Unix socket
    /// directory.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name.
    pub database: String,
    /// Role concord logs in as. It needs `REPLICATION` (or superuser) to capture, and
    /// the table grants listed in the README.
    pub user: String,
    /// The role's password; absent for trust or peer authentication.
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// Transport security toward the server.
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM file of the certificate authorities to trust for `verify_full` (and to check
    /// against when `require` is given one); the web PKI roots when absent. Relative to
    /// the configuration file.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Base name of the logical replication slots; each capturing link uses its own slot
    /// `<slot>_<entity>` because one slot serves one reader at a time.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication the slots stream (`pgoutput`'s `publication_names`).
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create a missing slot (with an initial snapshot). When false, a missing slot
    /// stops the link with an error saying how to create it.
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Create a missing publication for the linked tables; needs ownership of the tables
    /// (or superuser). When false, a missing publication stops the link.
    #[serde(default = "default_true")]
    pub create_publication: bool,
    /// When a link's slot cannot resume (dropped, invalidated by the server, or ahead of
    /// concord's checkpoint), create a new slot and read the table again inside its
    /// snapshot instead of stopping the link. Off by default: the changes in the gap are
    /// lost (rows deleted in it stay in concord), which an operator should decide on.
    #[serde(default)]
    pub resnapshot_on_slot_loss: bool,
    /// Rows per query of the initial snapshot.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u32,
    /// Seconds between standby status updates sent to the server.
    #[serde(default = "default_status_interval_secs")]
    pub status_interval_secs: u64,
    /// Seconds an idle stream waits before moving the confirmed position to the
    /// server's position (0 disables it: the slot then advances only with changes).
    #[serde(default = "default_heartbeat_interval_secs")]
    pub heartbeat_interval_secs: u64,
}

/// How the connection to the server is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP; for loopback and Unix sockets.
    Disable,
    /// TLS without checking the certificate's chain or name (libpq's `require`).
    Require,
    /// TLS; the certificate chains to a trusted CA and names the host (libpq's
    /// `verify-full`). The default: database traffic carries personal data.
    #[default]
    VerifyFull,
}

impl PostgresSystemConfig {
    /// The slot a capturing link of `entity` reads: `<slot>_<entity>`, with characters a
    /// slot name may not hold (anything but `a-z`, `0-9`, `_`) replaced by `_`, cut to
    /// PostgreSQL's 63-byte identifier limit.
    pub fn slot_name(&self, entity: &str) -> String {
        let mut name: String = format!("{}_{}", self.slot, entity)
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        name.truncate(63);
        name
    }
}

/// A link's `object`: `schema.table`, or `table` in schema `public`. Names are taken as
/// written (case-sensitive, as if double-quoted); a name holding a dot cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    /// Parses a link's `object`; `None` when it is empty or has more than one dot.
    pub fn parse(object: &str) -> Option<TableName> {
        let mut parts = object.split('.');
        let first = parts.next()?;
        let (schema, table) = match (parts.next(), parts.next()) {
            (None, _) => ("public", first),
            (Some(table), None) => (first, table),
            (Some(_), Some(_)) => return None,
        };
        if schema.is_empty() || table.is_empty() {
            return None;
        }
        Some(TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    /// `"schema"."table"`, each part quoted as an SQL identifier.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Quotes an SQL identifier: wrapped in double quotes, inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal: wrapped in single quotes, inner quotes doubled. Only for
/// replication commands, which take no parameters; the server runs with
/// `standard_conforming_strings` on (the default since 9.1), so backslashes are literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_slot() -> String {
    DEFAULT_SLOT.to_string()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.to_string()
}
fn default_true() -> bool {
    true
}
fn default_snapshot_chunk_rows() -> u32 {
    DEFAULT_SNAPSHOT_CHUNK_ROWS
}
fn default_status_interval_secs() -> u64 {
    DEFAULT_STATUS_INTERVAL_SECS
}
fn default_heartbeat_interval_secs() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_table_gets_the_defaults() {
        let cfg: PostgresSystemConfig =
            toml::from_str("host = \"localhost\"\ndatabase = \"app\"\nuser = \"concord\"").expect("parses");
        assert_eq!(cfg.port, DEFAULT_PORT);
        assert_eq!(cfg.tls, TlsMode::VerifyFull);
        assert_eq!(cfg.slot_name("contact"), "concord_contact");
        assert_eq!(cfg.publication, "concord");
        assert!(cfg.create_slot && cfg.create_publication);
        assert!(cfg.password.is_none());
    }

    #[test]
    fn unknown_keys_and_literal_passwords_are_refused() {
        let base = "host = \"h\"\ndatabase = \"d\"\nuser = \"u\"\n";
        assert!(toml::from_str::<PostgresSystemConfig>(&format!("{base}sslmode = \"require\"")).is_err());
        assert!(toml::from_str::<PostgresSystemConfig>(&format!("{base}password = \"x\"")).is_err());
        let cfg: PostgresSystemConfig =
            toml::from_str(&format!("{base}password = {{ env = \"PGPASS\" }}\ntls = \"disable\"")).expect("parses");
        assert_eq!(cfg.tls, TlsMode::Disable);
    }

    #[test]
    fn slot_names_are_valid_identifiers() {
        let mut cfg: PostgresSystemConfig =
            toml::from_str("host = \"h\"\ndatabase = \"d\"\nuser = \"u\"").expect("parses");
        cfg.slot = "Concord-App".into();
        assert_eq!(cfg.slot_name("hr-employee"), "concord_app_hr_employee");
        cfg.slot = "x".repeat(100);
        assert_eq!(cfg.slot_name("e").len(), 63);
    }

    #[test]
    fn table_names_parse() {
        assert_eq!(
            TableName::parse("contacts"),
            Some(TableName {
                schema: "public".into(),
                table: "contacts".into()
            })
        );
        let t = TableName::parse("crm.Contacts").expect("parses");
        assert_eq!(t.quoted(), "\"crm\".\"Contacts\"");
        assert_eq!(TableName::parse("a.b.c"), None);
        assert_eq!(TableName::parse(".b"), None);
        assert_eq!(TableName::parse(""), None);
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
