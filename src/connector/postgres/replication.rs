//! Our own replication connection, on the `postgres-protocol` codec: tokio-postgres
//! cannot open a connection with `replication=database` nor drive CopyBoth.
//!
//! Protocol: <https://www.postgresql.org/docs/current/protocol-flow.html> (startup,
//! authentication, simple query) and
//! <https://www.postgresql.org/docs/current/protocol-replication.html> (IDENTIFY_SYSTEM,
//! CREATE_REPLICATION_SLOT, START_REPLICATION, the CopyBoth sub-protocol).
//!
//! - Startup sends `replication=database` (a logical walsender bound to the database)
//!   and the session settings of [`super::SESSION_SETTINGS`]; pgoutput formats values
//!   with the walsender's settings, so these fix the text the decoder sees.
//! - Authentication: SCRAM-SHA-256 (without channel binding), md5 and cleartext; the
//!   password is read from its secret reference only for the handshake.
//! - TLS is negotiated with SSLRequest before the startup message, through rustls.
//! - Framing is done here (tag, length, body) because the codec's backend parser does
//!   not know CopyBothResponse; frontend messages and SCRAM come from the codec. A frame
//!   longer than 1 GiB (PostgreSQL's own limit on a message) is a protocol error rather
//!   than an allocation.
//! - Reads are cancel-safe (the buffer keeps partial frames), so a read can be raced
//!   against a timer without losing data.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::config::{quote_ident, quote_literal};
use super::pgoutput::{Lsn, StreamMessage, encode_status_update, format_lsn, parse_lsn};
use super::{PostgresSystemConfig, SESSION_SETTINGS, TlsMode};
use crate::connector::{ConnectorError, ErrorClass};

/// Largest frame accepted from the server.
const MAX_FRAME: usize = 1 << 30;
/// Time allowed for the TCP connection, TLS handshake and authentication.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// What went wrong on the replication connection. Server errors carry the SQLSTATE and
/// the server's message (which names objects, not row values).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection i/o")]
    Io(#[from] io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot read the database password")]
    Secret(#[source] crate::config::secret::SecretError),
    #[error("the server asks for a password and none is configured")]
    PasswordMissing,
    #[error("authentication method {0} is not supported (use scram-sha-256, md5 or password)")]
    AuthUnsupported(String),
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ReplicationError::Io(_) | ReplicationError::Timeout(_) | ReplicationError::Protocol(_) => {
                ErrorClass::Transient
            }
            ReplicationError::Tls(_)
            | ReplicationError::Secret(_)
            | ReplicationError::PasswordMissing
            | ReplicationError::AuthUnsupported(_) => ErrorClass::Fatal,
            ReplicationError::Server { code, .. } => sqlstate_class(code),
        }
    }
}

/// Classifies a SQLSTATE for the capture path: connection problems, resource shortage,
/// operator intervention and serialisation failures are transient; authentication,
/// privileges and undefined objects (a missing slot or publication) are fatal: the link
/// cannot go on until an operator acts.
pub fn sqlstate_class(code: &str) -> ErrorClass {
    match code.get(..2) {
        Some("28") => ErrorClass::Fatal,
        Some("42") => ErrorClass::Fatal,
        Some("55") if code == "55000" => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

impl From<ReplicationError> for ConnectorError {
    fn from(error: ReplicationError) -> Self {
        let kind = match &error {
            ReplicationError::Io(_) => "io",
            ReplicationError::Timeout(_) => "timeout",
            ReplicationError::Tls(_) => "tls",
            ReplicationError::Secret(_) | ReplicationError::PasswordMissing | ReplicationError::AuthUnsupported(_) => {
                "auth"
            }
            ReplicationError::Server { code, .. } if code.starts_with("28") => "auth",
            ReplicationError::Server { .. } => "server",
            ReplicationError::Protocol(_) => "protocol",
        };
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        ConnectorError {
            class: error.class(),
            kind,
            reason,
            retry_after: None,
        }
    }
}

/// One backend frame: its tag and body.
struct Frame {
    tag: u8,
    body: Bytes,
}

/// The result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    /// The server's current WAL flush position.
    pub xlog_pos: Lsn,
}

/// A slot created by CREATE_REPLICATION_SLOT.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The position from which the slot's changes start: everything committed before
    /// it is in the exported snapshot, everything after it comes through the slot.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, valid while this connection stays open and runs
    /// no other command.
    pub snapshot_name: Option<String>,
}

/// A replication connection (`replication=database`).
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    streaming: bool,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS as configured and authenticates.
    pub async fn connect(cfg: &PostgresSystemConfig, base_dir: &Path) -> Result<Self, ReplicationError> {
        let password = match &cfg.password {
            Some(secret) => Some(secret.resolve(base_dir).map_err(ReplicationError::Secret)?),
            None => None,
        };
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(cfg, base_dir, password.as_ref()))
            .await
            .map_err(|_| ReplicationError::Timeout("connecting"))?
    }

    async fn connect_inner(
        cfg: &PostgresSystemConfig,
        base_dir: &Path,
        password: Option<&SecretString>,
    ) -> Result<Self, ReplicationError> {
        let io: Box<dyn Io> = if cfg.host.starts_with('/') {
            if cfg.tls != TlsMode::Disable {
                return Err(ReplicationError::Tls(
                    "tls is not used over a unix socket; set tls = \"disable\"".into(),
                ));
            }
            let path = Path::new(&cfg.host).join(format!(".s.PGSQL.{}", cfg.port));
            Box::new(tokio::net::UnixStream::connect(path).await?)
        } else {
            let mut tcp = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
            tcp.set_nodelay(true)?;
            if cfg.tls == TlsMode::Disable {
                Box::new(tcp)
            } else {
                let mut buf = BytesMut::new();
                frontend::ssl_request(&mut buf);
                tcp.write_all(&buf).await?;
                let answer = tcp.read_u8().await?;
                if answer != b'S' {
                    return Err(ReplicationError::Tls("the server does not accept tls".into()));
                }
                let config = super::tls::client_config(cfg.tls, cfg.tls_ca_file.as_deref(), base_dir)
                    .map_err(ReplicationError::Tls)?;
                let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
                    .map_err(|_| ReplicationError::Tls("host is not a valid server name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ReplicationError::Tls(e.to_string()))?;
                Box::new(tls)
            }
        };
        let mut conn = ReplicationConnection {
            io,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::new(),
            streaming: false,
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.database.as_str()),
            ("replication", "database"),
            ("application_name", "concord"),
        ];
        params.extend(SESSION_SETTINGS.iter().copied());
        frontend::startup_message(params, &mut conn.write)?;
        conn.flush().await?;
        conn.authenticate(&cfg.user, password).await?;
        loop {
            let frame = conn.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(conn),
                b'S' | b'K' | b'N' => {}
                b'E' => return Err(server_error(frame.body)),
                other => return Err(unexpected(other, "after authentication")),
            }
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&SecretString>) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'E' => return Err(server_error(frame.body)),
                b'N' => continue,
                b'R' => {}
                other => return Err(unexpected(other, "during authentication")),
            }
            let mut body = frame.body;
            let code = body
                .try_get_i32()
                .map_err(|_| ReplicationError::Protocol("short authentication message".into()))?;
            match code {
                0 => return Ok(()),
                3 => {
                    let password = password.ok_or(ReplicationError::PasswordMissing)?;
                    frontend::password_message(password.expose_secret().as_bytes(), &mut self.write)?;
                }
                5 => {
                    let password = password.ok_or(ReplicationError::PasswordMissing)?;
                    let mut salt = [0u8; 4];
                    if body.remaining() < 4 {
                        return Err(ReplicationError::Protocol("short md5 salt".into()));
                    }
                    body.copy_to_slice(&mut salt);
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.expose_secret().as_bytes(),
                        salt,
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                }
                10 => {
                    let password = password.ok_or(ReplicationError::PasswordMissing)?;
                    let mechanisms: Vec<&[u8]> = body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                    if !mechanisms.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                        return Err(ReplicationError::AuthUnsupported("sasl without scram-sha-256".into()));
                    }
                    let state = ScramSha256::new(password.expose_secret().as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, state.message(), &mut self.write)?;
                    scram = Some(state);
                }
                11 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ReplicationError::Protocol("sasl continue before sasl start".into()))?;
                    state
                        .update(&body)
                        .map_err(|e| ReplicationError::Protocol(format!("scram: {e}")))?;
                    frontend::sasl_response(state.message(), &mut self.write)?;
                }
                12 => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ReplicationError::Protocol("sasl final before sasl start".into()))?;
                    state
                        .finish(&body)
                        .map_err(|e| ReplicationError::Protocol(format!("scram: {e}")))?;
                    continue;
                }
                2 => return Err(ReplicationError::AuthUnsupported("kerberos".into())),
                7 | 8 => return Err(ReplicationError::AuthUnsupported("gssapi".into())),
                9 => return Err(ReplicationError::AuthUnsupported("sspi".into())),
                other => return Err(ReplicationError::AuthUnsupported(format!("code {other}"))),
            }
            self.flush().await?;
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.write).await?;
        self.io.flush().await?;
        self.write.clear();
        Ok(())
    }

    /// Reads one frame. Cancel-safe: a partial frame stays in the buffer.
    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if self.read.len() >= 5 {
                let tag = self.read[0];
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if !(4..=MAX_FRAME).contains(&len) {
                    return Err(ReplicationError::Protocol(format!("frame length {len}")));
                }
                if self.read.len() > len {
                    let mut frame = self.read.split_to(len + 1);
                    frame.advance(5);
                    return Ok(Frame {
                        tag,
                        body: frame.freeze(),
                    });
                }
                self.read.reserve(len + 1 - self.read.len());
            }
            let n = self.io.read_buf(&mut self.read).await?;
            if n == 0 {
                return Err(ReplicationError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// Runs a replication command or query with the simple query protocol and returns
    /// the rows of its (last) result in text format.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        if self.streaming {
            return Err(ReplicationError::Protocol("query on a streaming connection".into()));
        }
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'T' => rows.clear(),
                b'D' => rows.push(data_row(frame.body)?),
                b'C' | b'N' | b'S' | b'I' => {}
                b'E' => error = Some(server_error(frame.body)),
                b'Z' => {
                    return match error {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    };
                }
                other => return Err(unexpected(other, "in a query response")),
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or(0),
            xlog_pos: parse_lsn(&field(2))
                .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM position".into()))?,
        })
    }

    /// `CREATE_REPLICATION_SLOT "slot" LOGICAL pgoutput EXPORT_SNAPSHOT`.
    pub async fn create_slot(&mut self, slot: &str) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let consistent_point = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|t| parse_lsn(&t))
            .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT consistent point".into()))?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name: row.get(2).cloned().flatten(),
        })
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL <lsn> (proto_version '1', publication_names
    /// '"pub"'[, messages 'true'])`. The server resumes at the slot's confirmed position
    /// when `start` is before it. `messages` (PostgreSQL 14 and later) asks for the
    /// messages of `pg_logical_emit_message`. After this the connection only streams.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        messages: bool,
    ) -> Result<(), ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}{})",
            quote_ident(slot),
            format_lsn(start),
            quote_literal(&quote_ident(publication)),
            if messages { ", messages 'true'" } else { "" },
        );
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => {
                    self.streaming = true;
                    return Ok(());
                }
                b'N' => {}
                b'E' => {
                    let error = server_error(frame.body);
                    // The server ends the failed command with ReadyForQuery; the connection
                    // is dropped after an error anyway, so only wait for it briefly.
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.read_frame()).await;
                    return Err(error);
                }
                other => return Err(unexpected(other, "starting replication")),
            }
        }
    }

    /// Waits up to `wait` for the next stream message; `Ok(None)` when none came.
    pub async fn recv(&mut self, wait: Duration) -> Result<Option<StreamMessage>, ReplicationError> {
        let frame = match tokio::time::timeout(wait, self.read_frame()).await {
            Err(_) => return Ok(None),
            Ok(frame) => frame?,
        };
        match frame.tag {
            b'd' => StreamMessage::decode(frame.body)
                .map(Some)
                .map_err(|e| ReplicationError::Protocol(e.to_string())),
            b'E' => Err(server_error(frame.body)),
            b'c' => Err(ReplicationError::Protocol("the server ended the stream".into())),
            b'N' => Ok(None),
            other => Err(unexpected(other, "while streaming")),
        }
    }

    /// Sends a standby status update: `flush` is what the server may consider durable
    /// (the slot's confirmed_flush_lsn moves to it); write and apply are reported equal.
    pub async fn send_status(&mut self, flush: Lsn, reply: bool) -> Result<(), ReplicationError> {
        let now = chrono::Utc::now().timestamp_micros() - super::pgoutput::PG_EPOCH_OFFSET_MICROS;
        let update = encode_status_update(flush, flush, flush, now, reply);
        frontend::CopyData::new(&update[..])?.write(&mut self.write);
        self.flush().await
    }
}

fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>, ReplicationError> {
    let short = || ReplicationError::Protocol("short data row".into());
    let count = body.try_get_i16().map_err(|_| short())?;
    let mut row = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(body.remaining()));
    for _ in 0..count {
        let len = body.try_get_i32().map_err(|_| short())?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(short());
        }
        let value = body.split_to(len);
        row.push(Some(String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(row)
}

/// An ErrorResponse: its SQLSTATE (`C`) and message (`M`).
fn server_error(body: Bytes) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = &body[..];
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let text = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    ReplicationError::Server { code, message }
}

fn unexpected(tag: u8, when: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected message {:?} {when}", char::from(tag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_fields_are_read() {
        let body = Bytes::from_static(b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0");
        let error = server_error(body);
        assert_eq!(error.code(), Some("42704"));
        assert_eq!(
            error.to_string(),
            "server error 42704: replication slot \"x\" does not exist"
        );
        assert_eq!(error.class(), ErrorClass::Fatal);
        assert!(matches!(
            server_error(Bytes::from_static(b"C5")),
            ReplicationError::Server { .. }
        ));
    }

    #[test]
    fn sqlstates_classify() {
        assert_eq!(sqlstate_class("28P01"), ErrorClass::Fatal);
        assert_eq!(sqlstate_class("42501"), ErrorClass::Fatal);
        assert_eq!(sqlstate_class("57P01"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("08006"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("53300"), ErrorClass::Transient);
        assert_eq!(sqlstate_class("55000"), ErrorClass::Fatal);
        assert_eq!(sqlstate_class(""), ErrorClass::Transient);
    }

    #[test]
    fn data_rows_with_nulls() {
        let mut body = Vec::new();
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ok");
        assert_eq!(
            data_row(Bytes::from(body)).expect("row"),
            vec![None, Some("ok".to_string())]
        );
        assert!(data_row(Bytes::from_static(&[0, 1, 0, 0, 0, 9])).is_err());
    }
}
