//! The `postgres` connector: captures a table's changes through logical replication and
//! writes merged records back.
//!
//! - [`config`]: the system's settings and the link's table name.
//! - [`replication`]: our own replication connection on the `postgres-protocol` codec
//!   (tokio-postgres cannot open one): startup with `replication=database`, SCRAM-SHA-256,
//!   md5 and cleartext authentication, TLS through rustls, the replication commands and
//!   the CopyBoth stream with its keepalives and standby status updates.
//! - [`pgoutput`]: the decoder of the `pgoutput` plugin's messages; never panics.
//! - [`values`]: column values in PostgreSQL's text format → canonical JSON, and back.
//! - [`source`]: slot and publication setup, the initial snapshot inside the slot's
//!   exported snapshot, then streaming, with the flush position confirmed only once
//!   redb has committed it.
//! - [`sink`]: batched upserts, updates and deletes in one transaction per batch.
//! - [`preflight`]: the setup checks `concord check` runs against the server.
//! - [`resnapshot`]: `concord resnapshot`, an operator's request to read a table again.
//! - [`error`]: SQLSTATE classification and operator hints.
//! - [`tls`]: the rustls client configuration both connection kinds use.
//!
//! Everything that is not the replication stream (setup, snapshot, slot metrics) uses
//! tokio-postgres over the same TLS configuration, through [`connect`].

pub mod config;
pub mod error;
pub mod pgoutput;
pub mod preflight;
pub mod replication;
pub mod resnapshot;
pub mod sink;
pub mod source;
pub mod tls;
pub mod values;

use std::path::Path;

use secrecy::ExposeSecret;

pub use config::{PostgresSystemConfig, TableName, TlsMode};
pub use source::PostgresSource;

/// Session settings every concord connection runs with, so that every value arrives in
/// the one text form [`values`] parses: ISO dates, UTC offsets, ISO 8601 intervals,
/// shortest exact floats, hex bytea.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
];

/// Why a connection could not be set up before any byte reached the server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the database password")]
    Secret(#[source] crate::config::secret::SecretError),
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("cannot connect to postgresql")]
    Postgres(#[source] tokio_postgres::Error),
}

/// The tokio-postgres configuration of a system, with the password resolved now and the
/// session settings of [`SESSION_SETTINGS`].
pub fn client_config(cfg: &PostgresSystemConfig, base_dir: &Path) -> Result<tokio_postgres::Config, ConnectError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.database)
        .user(&cfg.user)
        .application_name("concord");
    if let Some(password) = &cfg.password {
        let secret = password.resolve(base_dir).map_err(ConnectError::Secret)?;
        pg.password(secret.expose_secret().as_bytes());
    }
    let options: Vec<String> = SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect();
    pg.options(options.join(" "));
    pg.ssl_mode(match cfg.tls {
        TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
        TlsMode::Require | TlsMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    Ok(pg)
}

/// Opens a tokio-postgres connection to the system and drives it on a task; the task
/// ends when the client is dropped.
pub async fn connect(cfg: &PostgresSystemConfig, base_dir: &Path) -> Result<tokio_postgres::Client, ConnectError> {
    let pg = client_config(cfg, base_dir)?;
    let client = match cfg.tls {
        TlsMode::Disable => {
            let (client, connection) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(ConnectError::Postgres)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %error, "postgresql connection ended");
                }
            });
            client
        }
        TlsMode::Require | TlsMode::VerifyFull => {
            let tls = tls::client_config(cfg.tls, cfg.tls_ca_file.as_deref(), base_dir).map_err(ConnectError::Tls)?;
            let make = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = pg.connect(make).await.map_err(ConnectError::Postgres)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %error, "postgresql connection ended");
                }
            });
            client
        }
    };
    Ok(client)
}
