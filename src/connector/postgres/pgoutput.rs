//! Decoder of the `pgoutput` logical decoding plugin's messages (protocol version 1) and
//! of the replication stream's CopyData frames that carry them.
//!
//! Specifications:
//! - message formats: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>
//! - the streaming replication protocol (XLogData, keepalive, standby status update):
//!   <https://www.postgresql.org/docs/current/protocol-replication.html>
//!
//! Every read is checked: any byte sequence decodes to a message or a [`DecodeError`],
//! never a panic, and no length read from the input allocates more than the input holds
//! (a property test feeds random and mutated messages).
//!
//! Traps, each handled by the source:
//! - **Unchanged TOAST values** (`'u'` in tuple data): an UPDATE that did not touch a
//!   large (TOASTed) column sends the marker instead of the value. It is not a null and
//!   not a change: the field is left out of the change so the shadow keeps its value.
//! - **Old tuple `K` vs `O`**: an UPDATE or DELETE carries the old row's replica-identity
//!   key columns (`K`, other columns null) under REPLICA IDENTITY DEFAULT or USING INDEX,
//!   the whole old row (`O`) under FULL, and nothing for an UPDATE that did not change the
//!   key. A DELETE under REPLICA IDENTITY NOTHING is not published at all, and its
//!   UPDATEs carry no old tuple. The record id of a DELETE is read from whichever old
//!   tuple came; of an UPDATE, from the new tuple.
//! - **Relation messages precede use and can change**: a `Relation` message describes a
//!   table's columns before the first change of it in a session and again after its
//!   definition changed; tuples are positional against the latest one. Column names and
//!   type OIDs must therefore be taken from the current Relation, and a new one compared
//!   with the last (a dropped or retyped column the link maps is a schema break).
//! - **Type messages** name non-built-in types (enums, domains) by OID; values of types
//!   the decoder does not know arrive as text and stay text.
//! - **LSNs in feedback**: the standby status update reports write, flush and apply
//!   positions. The server treats *flush* as the client's durable point and advances the
//!   slot's `confirmed_flush_lsn` to it; WAL before it may be recycled, and the next
//!   START_REPLICATION resumes there. A transaction is confirmed with its Commit's
//!   `end_lsn` (the position after the commit record), never with a change's position.
//! - **Keepalive reply flag**: a primary keepalive with `reply = 1` must be answered with
//!   a status update promptly, or the server ends the connection after
//!   `wal_sender_timeout`. A keepalive's `wal_end` is the server's sent position; when no
//!   transaction is open and everything received is committed, confirming it lets the
//!   slot advance over WAL that holds nothing for this publication.
//! - **Empty transactions and origins**: a `Begin`/`Commit` pair may carry no change of
//!   the captured table (other tables of the publication), and an `Origin` message names
//!   the node a replicated transaction came from.
//! - **Message** (`pg_logical_emit_message`): transactional ones arrive inside
//!   Begin/Commit, non-transactional ones on their own.

use bytes::{Buf, Bytes};

/// A position in the WAL.
pub type Lsn = u64;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Renders an LSN the way PostgreSQL does: `16/B374D848`.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Why a message could not be decoded; names the part, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message ends early reading {0}")]
    Truncated(&'static str),
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("unknown tuple value kind {0:#04x}")]
    UnknownValueKind(u8),
    #[error("unexpected tuple marker {0:#04x}")]
    UnexpectedMarker(u8),
    #[error("negative {0}")]
    Negative(&'static str),
    #[error("string without terminator in {0}")]
    Unterminated(&'static str),
    #[error("{0} is not utf-8")]
    NotUtf8(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// One frame of the CopyBoth stream from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// `w`: WAL data, here one pgoutput message.
    XLogData {
        /// Where the data starts in the WAL.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01.
        sent_at: i64,
        data: Bytes,
    },
    /// `k`: primary keepalive.
    Keepalive {
        wal_end: Lsn,
        sent_at: i64,
        /// The server asks for a status update now.
        reply_requested: bool,
    },
}

impl StreamMessage {
    pub fn decode(mut buf: Bytes) -> Result<StreamMessage, DecodeError> {
        let tag = get_u8(&mut buf, "stream tag")?;
        match tag {
            b'w' => {
                let wal_start = get_u64(&mut buf, "xlogdata start")?;
                let wal_end = get_u64(&mut buf, "xlogdata end")?;
                let sent_at = get_i64(&mut buf, "xlogdata time")?;
                Ok(StreamMessage::XLogData {
                    wal_start,
                    wal_end,
                    sent_at,
                    data: buf,
                })
            }
            b'k' => {
                let wal_end = get_u64(&mut buf, "keepalive end")?;
                let sent_at = get_i64(&mut buf, "keepalive time")?;
                let reply = get_u8(&mut buf, "keepalive reply")?;
                Ok(StreamMessage::Keepalive {
                    wal_end,
                    sent_at,
                    reply_requested: reply == 1,
                })
            }
            other => Err(DecodeError::UnknownTag(other)),
        }
    }
}

/// The standby status update (`r`): the three positions, the client clock and whether
/// the server should answer with a keepalive at once.
pub fn encode_status_update(write: Lsn, flush: Lsn, apply: Lsn, now_pg_micros: i64, reply: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.push(b'r');
    out.extend_from_slice(&write.to_be_bytes());
    out.extend_from_slice(&flush.to_be_bytes());
    out.extend_from_slice(&apply.to_be_bytes());
    out.extend_from_slice(&now_pg_micros.to_be_bytes());
    out.push(u8::from(reply));
    out
}

/// Replica identity of a table as the Relation message gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: none; updates and deletes carry no old values.
    Nothing,
    /// `f`: the whole row.
    Full,
    /// `i`: the columns of one unique index.
    Index,
    /// A letter this decoder does not know.
    Other(u8),
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A Relation message: a table's current shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`.
    Null,
    /// `u`: an unchanged TOASTed value that was not sent; not a null.
    Unchanged,
    /// `t`: the value in text format (UTF-8 not yet checked).
    Text(Bytes),
    /// `b`: the value in binary format (only with the `binary` option).
    Binary(Bytes),
}

/// Which old tuple an UPDATE or DELETE carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity key columns only.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// The LSN of the commit record of this transaction.
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        /// The position after the commit record: what a client confirms.
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<TupleValue>,
    },
    Update {
        relation: u32,
        old: Option<(OldKind, Vec<TupleValue>)>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: u32,
        old: (OldKind, Vec<TupleValue>),
    },
    Truncate {
        /// 1 = CASCADE, 2 = RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

impl Message {
    /// Decodes one pgoutput message (the payload of one XLogData frame). Trailing bytes
    /// are an error: they mean the message was not understood.
    pub fn decode(mut buf: Bytes) -> Result<Message, DecodeError> {
        let tag = get_u8(&mut buf, "message tag")?;
        let message = match tag {
            b'B' => Message::Begin {
                final_lsn: get_u64(&mut buf, "begin lsn")?,
                commit_time: get_i64(&mut buf, "begin time")?,
                xid: get_u32(&mut buf, "begin xid")?,
            },
            b'C' => Message::Commit {
                flags: get_u8(&mut buf, "commit flags")?,
                commit_lsn: get_u64(&mut buf, "commit lsn")?,
                end_lsn: get_u64(&mut buf, "commit end lsn")?,
                commit_time: get_i64(&mut buf, "commit time")?,
            },
            b'O' => Message::Origin {
                lsn: get_u64(&mut buf, "origin lsn")?,
                name: get_cstr(&mut buf, "origin name")?,
            },
            b'R' => {
                let id = get_u32(&mut buf, "relation id")?;
                let namespace = get_cstr(&mut buf, "relation namespace")?;
                let name = get_cstr(&mut buf, "relation name")?;
                let replica_identity = match get_u8(&mut buf, "replica identity")? {
                    b'd' => ReplicaIdentity::Default,
                    b'n' => ReplicaIdentity::Nothing,
                    b'f' => ReplicaIdentity::Full,
                    b'i' => ReplicaIdentity::Index,
                    other => ReplicaIdentity::Other(other),
                };
                let count = get_count(&mut buf, "column count")?;
                // Each column takes at least 10 bytes; never reserve more than the input holds.
                let mut columns = Vec::with_capacity(count.min(buf.remaining() / 10));
                for _ in 0..count {
                    let flags = get_u8(&mut buf, "column flags")?;
                    let name = get_cstr(&mut buf, "column name")?;
                    let type_oid = get_u32(&mut buf, "column type")?;
                    let type_modifier = get_i32(&mut buf, "column type modifier")?;
                    columns.push(Column {
                        key: flags & 1 == 1,
                        name,
                        type_oid,
                        type_modifier,
                    });
                }
                Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => Message::Type {
                oid: get_u32(&mut buf, "type oid")?,
                namespace: get_cstr(&mut buf, "type namespace")?,
                name: get_cstr(&mut buf, "type name")?,
            },
            b'I' => {
                let relation = get_u32(&mut buf, "insert relation")?;
                match get_u8(&mut buf, "insert marker")? {
                    b'N' => Message::Insert {
                        relation,
                        new: get_tuple(&mut buf)?,
                    },
                    other => return Err(DecodeError::UnexpectedMarker(other)),
                }
            }
            b'U' => {
                let relation = get_u32(&mut buf, "update relation")?;
                let mut marker = get_u8(&mut buf, "update marker")?;
                let mut old = None;
                if marker == b'K' || marker == b'O' {
                    let kind = if marker == b'K' { OldKind::Key } else { OldKind::Full };
                    old = Some((kind, get_tuple(&mut buf)?));
                    marker = get_u8(&mut buf, "update new marker")?;
                }
                if marker != b'N' {
                    return Err(DecodeError::UnexpectedMarker(marker));
                }
                Message::Update {
                    relation,
                    old,
                    new: get_tuple(&mut buf)?,
                }
            }
            b'D' => {
                let relation = get_u32(&mut buf, "delete relation")?;
                let kind = match get_u8(&mut buf, "delete marker")? {
                    b'K' => OldKind::Key,
                    b'O' => OldKind::Full,
                    other => return Err(DecodeError::UnexpectedMarker(other)),
                };
                Message::Delete {
                    relation,
                    old: (kind, get_tuple(&mut buf)?),
                }
            }
            b'T' => {
                let count = get_count32(&mut buf, "truncate relation count")?;
                let options = get_u8(&mut buf, "truncate options")?;
                let mut relations = Vec::with_capacity(count.min(buf.remaining() / 4));
                for _ in 0..count {
                    relations.push(get_u32(&mut buf, "truncate relation")?);
                }
                Message::Truncate { options, relations }
            }
            b'M' => {
                let flags = get_u8(&mut buf, "message flags")?;
                let lsn = get_u64(&mut buf, "message lsn")?;
                let prefix = get_cstr(&mut buf, "message prefix")?;
                let len = get_count32(&mut buf, "message length")?;
                let content = get_bytes(&mut buf, len, "message content")?;
                Message::Message {
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content,
                }
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        if buf.has_remaining() {
            return Err(DecodeError::Trailing(buf.remaining()));
        }
        Ok(message)
    }
}

fn get_tuple(buf: &mut Bytes) -> Result<Vec<TupleValue>, DecodeError> {
    let count = get_count(buf, "tuple column count")?;
    let mut values = Vec::with_capacity(count.min(buf.remaining()));
    for _ in 0..count {
        let value = match get_u8(buf, "tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::Unchanged,
            b't' => {
                let len = get_count32(buf, "text value length")?;
                TupleValue::Text(get_bytes(buf, len, "text value")?)
            }
            b'b' => {
                let len = get_count32(buf, "binary value length")?;
                TupleValue::Binary(get_bytes(buf, len, "binary value")?)
            }
            other => return Err(DecodeError::UnknownValueKind(other)),
        };
        values.push(value);
    }
    Ok(values)
}

fn get_u8(buf: &mut Bytes, what: &'static str) -> Result<u8, DecodeError> {
    buf.try_get_u8().map_err(|_| DecodeError::Truncated(what))
}
fn get_u32(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    buf.try_get_u32().map_err(|_| DecodeError::Truncated(what))
}
fn get_i32(buf: &mut Bytes, what: &'static str) -> Result<i32, DecodeError> {
    buf.try_get_i32().map_err(|_| DecodeError::Truncated(what))
}
fn get_u64(buf: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    buf.try_get_u64().map_err(|_| DecodeError::Truncated(what))
}
fn get_i64(buf: &mut Bytes, what: &'static str) -> Result<i64, DecodeError> {
    buf.try_get_i64().map_err(|_| DecodeError::Truncated(what))
}
/// An Int16 count that must not be negative.
fn get_count(buf: &mut Bytes, what: &'static str) -> Result<usize, DecodeError> {
    let n = buf.try_get_i16().map_err(|_| DecodeError::Truncated(what))?;
    usize::try_from(n).map_err(|_| DecodeError::Negative(what))
}
/// An Int32 length or count that must not be negative.
fn get_count32(buf: &mut Bytes, what: &'static str) -> Result<usize, DecodeError> {
    let n = get_i32(buf, what)?;
    usize::try_from(n).map_err(|_| DecodeError::Negative(what))
}
fn get_bytes(buf: &mut Bytes, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
    if buf.remaining() < len {
        return Err(DecodeError::Truncated(what));
    }
    Ok(buf.split_to(len))
}
fn get_cstr(buf: &mut Bytes, what: &'static str) -> Result<String, DecodeError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::Unterminated(what))?;
    let raw = buf.split_to(end);
    buf.advance(1);
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::NotUtf8(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("\u{0}u") => out.push(b'u'),
                Some(text) => {
                    out.push(b't');
                    out.extend_from_slice(&(text.len() as i32).to_be_bytes());
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }

    /// A sample of every message kind, as the server encodes them.
    fn samples() -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        let mut m = vec![b'B'];
        m.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        m.extend_from_slice(&123i64.to_be_bytes());
        m.extend_from_slice(&7u32.to_be_bytes());
        all.push(m);
        let mut m = vec![b'C', 0];
        m.extend_from_slice(&0x10u64.to_be_bytes());
        m.extend_from_slice(&0x20u64.to_be_bytes());
        m.extend_from_slice(&5i64.to_be_bytes());
        all.push(m);
        let mut m = vec![b'O'];
        m.extend_from_slice(&9u64.to_be_bytes());
        cstr(&mut m, "node_a");
        all.push(m);
        let mut m = vec![b'R'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut m, "public");
        cstr(&mut m, "people");
        m.push(b'd');
        m.extend_from_slice(&2i16.to_be_bytes());
        m.push(1);
        cstr(&mut m, "id");
        m.extend_from_slice(&23u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        m.push(0);
        cstr(&mut m, "bio");
        m.extend_from_slice(&25u32.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
        all.push(m);
        let mut m = vec![b'Y'];
        m.extend_from_slice(&70000u32.to_be_bytes());
        cstr(&mut m, "public");
        cstr(&mut m, "mood");
        all.push(m);
        let mut m = vec![b'I'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(b'N');
        tuple(&mut m, &[Some("1"), None]);
        all.push(m);
        let mut m = vec![b'U'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(b'K');
        tuple(&mut m, &[Some("1"), None]);
        m.push(b'N');
        tuple(&mut m, &[Some("2"), Some("\u{0}u")]);
        all.push(m);
        let mut m = vec![b'D'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(b'O');
        tuple(&mut m, &[Some("2"), Some("text")]);
        all.push(m);
        let mut m = vec![b'T'];
        m.extend_from_slice(&2i32.to_be_bytes());
        m.push(1);
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.extend_from_slice(&16390u32.to_be_bytes());
        all.push(m);
        let mut m = vec![b'M', 1];
        m.extend_from_slice(&0x30u64.to_be_bytes());
        cstr(&mut m, "concord");
        m.extend_from_slice(&3i32.to_be_bytes());
        m.extend_from_slice(b"abc");
        all.push(m);
        all
    }

    #[test]
    fn every_sample_decodes() {
        let decoded: Vec<Message> = samples()
            .into_iter()
            .map(|m| Message::decode(Bytes::from(m)).expect("sample decodes"))
            .collect();
        assert!(matches!(
            decoded[0],
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                xid: 7,
                ..
            }
        ));
        assert!(matches!(decoded[1], Message::Commit { end_lsn: 0x20, .. }));
        let Message::Relation(rel) = &decoded[3] else {
            panic!("relation")
        };
        assert_eq!(rel.name, "people");
        assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_oid, 25);
        let Message::Update { old, new, .. } = &decoded[6] else {
            panic!("update")
        };
        assert_eq!(old.as_ref().map(|(k, v)| (*k, v.len())), Some((OldKind::Key, 2)));
        assert_eq!(new[1], TupleValue::Unchanged, "the 'u' marker is not a null");
        let Message::Delete { old, .. } = &decoded[7] else {
            panic!("delete")
        };
        assert_eq!(old.0, OldKind::Full);
        assert_eq!(old.1[1], TupleValue::Text(Bytes::from_static(b"text")));
        assert_eq!(
            decoded[8],
            Message::Truncate {
                options: 1,
                relations: vec![16384, 16390]
            }
        );
        assert!(matches!(&decoded[9], Message::Message { transactional: true, prefix, .. } if prefix == "concord"));
    }

    #[test]
    fn stream_frames_and_status_update() {
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x55u64.to_be_bytes());
        k.extend_from_slice(&1i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            StreamMessage::decode(Bytes::from(k)),
            Ok(StreamMessage::Keepalive {
                wal_end: 0x55,
                sent_at: 1,
                reply_requested: true
            })
        );
        let update = encode_status_update(1, 2, 3, 4, false);
        assert_eq!(update.len(), 34);
        assert_eq!(update[0], b'r');
        assert_eq!(&update[9..17], &2u64.to_be_bytes());
        assert_eq!(
            StreamMessage::decode(Bytes::from_static(b"w")),
            Err(DecodeError::Truncated("xlogdata start"))
        );
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/FFFFFFFFF"), None);
    }

    #[test]
    fn negative_and_huge_counts_are_errors_not_allocations() {
        let mut m = vec![b'I'];
        m.extend_from_slice(&1u32.to_be_bytes());
        m.push(b'N');
        m.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(
            Message::decode(Bytes::from(m)),
            Err(DecodeError::Negative("tuple column count"))
        );
        let mut m = vec![b'T'];
        m.extend_from_slice(&i32::MAX.to_be_bytes());
        m.push(0);
        assert!(Message::decode(Bytes::from(m)).is_err());
        let mut m = vec![b'M', 0];
        m.extend_from_slice(&0u64.to_be_bytes());
        cstr(&mut m, "p");
        m.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(
            Message::decode(Bytes::from(m)),
            Err(DecodeError::Truncated("message content"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(Bytes::from(data.clone()));
            let _ = StreamMessage::decode(Bytes::from(data));
        }

        #[test]
        fn random_bytes_after_a_valid_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTMwk".to_vec()),
            data in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut m = vec![tag];
            m.extend_from_slice(&data);
            let _ = Message::decode(Bytes::from(m.clone()));
            let _ = StreamMessage::decode(Bytes::from(m));
        }

        #[test]
        fn mutated_messages_never_panic(
            which in 0usize..10,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let mut m = samples()[which].clone();
            for (pos, byte, op) in edits {
                match op {
                    0 if !m.is_empty() => { let i = pos % m.len(); m[i] = byte; }
                    1 => { let i = pos % (m.len() + 1); m.insert(i, byte); }
                    _ if !m.is_empty() => { let i = pos % m.len(); m.truncate(i); }
                    _ => {}
                }
            }
            let _ = Message::decode(Bytes::from(m));
        }

        #[test]
        fn truncations_of_valid_messages_are_errors(which in 0usize..10, cut in any::<usize>()) {
            let m = samples()[which].clone();
            let cut = cut % m.len();
            prop_assert!(Message::decode(Bytes::from(m[..cut].to_vec())).is_err());
        }
    }
}
