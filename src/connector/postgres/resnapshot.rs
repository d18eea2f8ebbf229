//! An operator's request to read one link's table again: `concord resnapshot --config F
//! --link NAME`.
//!
//! The request is a logical message, `pg_logical_emit_message(true,
//! 'concord.resnapshot', 'schema.table')`, written into the database's WAL. It needs no
//! channel to the daemon and no state of its own: a running link sees it in its stream,
//! in order with the changes around it, and reads the table again (see
//! [`super::source`]); a stopped daemon finds it in its slot, which retains the WAL
//! after the confirmed position, at its next start. Transactional (in a transaction of
//! its own, committed at once): logical decoding drops a non-transactional message it
//! meets before its snapshot builder is consistent again, which after a restart of the
//! stream can be a while, whereas a committed transaction after the slot's position is
//! always sent. PostgreSQL 14 and later pass such messages to pgoutput clients.

use std::path::Path;

use super::config::TableName;
use super::source::RESNAPSHOT_PREFIX;
use super::{ConnectError, connect};
use crate::config::{Config, ConnectorConfig};

/// Server version from which pgoutput passes logical messages on (`server_version_num`).
const MIN_SERVER_VERSION: i32 = 140_000;

/// A request written to the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// `schema.table` of the link.
    pub table: String,
    /// WAL position of the request; the link reads the table again once its stream
    /// reaches it.
    pub lsn: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ResnapshotError {
    #[error("no link named {link:?}; links are named \"<system>.<entity>\": {known}")]
    NoLink { link: String, known: String },
    #[error("link {link:?} is not on a postgres system")]
    NotPostgres { link: String },
    #[error("link {link:?} does not capture (its system does not read, or it has no capture settings)")]
    NotCapturing { link: String },
    #[error("link {link:?}: object {object:?} is not \"schema.table\" or \"table\"")]
    BadObject { link: String, object: String },
    #[error("system {system:?}: {source}")]
    Connect {
        system: String,
        #[source]
        source: ConnectError,
    },
    #[error(
        "system {system:?} runs PostgreSQL {version}; a re-snapshot request needs 14 or later: \
         drop the link's slot instead (the link then creates a new one and reads the table in its snapshot)"
    )]
    TooOld { system: String, version: i32 },
    #[error("system {system:?}: cannot write the request: {reason}")]
    Emit { system: String, reason: String },
}

/// Asks link `link` of `config` to read its table again; see the module doc.
pub async fn request(config: &Config, link: &str) -> Result<Requested, ResnapshotError> {
    let Some(found) = config.links.iter().find(|l| l.name() == link) else {
        let known: Vec<String> = config.links.iter().map(|l| l.name()).collect();
        return Err(ResnapshotError::NoLink {
            link: link.to_string(),
            known: known.join(", "),
        });
    };
    let system = config.systems.get(&found.system);
    let Some(ConnectorConfig::Postgres(pg)) = system.map(|s| &s.connector) else {
        return Err(ResnapshotError::NotPostgres { link: link.to_string() });
    };
    if !system.is_some_and(|s| s.direction.reads()) || found.capture.is_none() {
        return Err(ResnapshotError::NotCapturing { link: link.to_string() });
    }
    let table = TableName::parse(&found.object).ok_or_else(|| ResnapshotError::BadObject {
        link: link.to_string(),
        object: found.object.clone(),
    })?;
    let base_dir: &Path = &config.base_dir;
    let client = connect(pg, base_dir).await.map_err(|source| ResnapshotError::Connect {
        system: found.system.clone(),
        source,
    })?;
    let emit = |e: tokio_postgres::Error| ResnapshotError::Emit {
        system: found.system.clone(),
        reason: super::error::classify("emit the request", &e).reason,
    };
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(emit)?
        .get(0);
    if version < MIN_SERVER_VERSION {
        return Err(ResnapshotError::TooOld {
            system: found.system.clone(),
            version,
        });
    }
    let table = table.to_string();
    let lsn: String = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&RESNAPSHOT_PREFIX, &table],
        )
        .await
        .map_err(emit)?
        .get(0);
    Ok(Requested { table, lsn })
}
