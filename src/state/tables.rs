//! Every redb table, in one place, with its key encoding.
//!
//! Keys are redb tuples, compared element by element, so a range over a prefix
//! (`(entity, ..)`, `(system, ..)`) lists one entity's or one system's rows in order.
//! Values that are structs are JSON bytes (record states, outbox entries and decisions:
//! the binary layouts of `encoding`), sealed in an encrypted store for the tables
//! in [`SEALED_TABLES`] (see `crypto`); counters and ids are native
//! integers. Global ids are stored as `u128` (the UUID's big-endian value), so
//! UUIDv7 ids sort by creation time.

use redb::TableDefinition;

/// Version of the layout below. Bump it when a table's key or value changes meaning;
/// `StateStore::open` refuses a file with another version rather than misreading it.
/// Version 2 stores record states in the binary layout of `encoding`; version 3 also
/// outbox entries; version 4 also merge decisions; version 5 also the write log.
pub const SCHEMA_VERSION: u64 = 5;

/// Older versions this build still reads. Opening such a file marks it with
/// [`SCHEMA_VERSION`], so a build that only knows the older layout refuses it
/// afterwards instead of misreading new rows. Version 1 stored record states, outbox
/// entries, decisions and the write log as JSON, version 2 outbox entries, decisions and
/// the write log, version 3 decisions and the write log, version 4 the write log;
/// `encoding` tells them apart by the first byte.
pub const UPGRADABLE_SCHEMA_VERSIONS: [u64; 4] = [1, 2, 3, 4];

/// `name → value`: `schema_version`; for an encrypted store also `encrypted` (1),
/// `current_key_id` (the data key new values are sealed with) and `rotating` (1 while
/// `concord state rotate-key` has values left to re-seal).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Monotonic id sequences: `name → next id` (`outbox`, `decision`, `dead_letter`,
/// `write_log`, `audit`).
pub const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");

/// `(entity, global id) → RecordState` (binary, see `encoding`): the base with provenance, every system's
/// shadow, and the match-key values indexed for the record. One row per record because
/// every merge reads and writes all of it together.
pub const RECORDS: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("records");

/// `(entity, system, local id) → global id`: the identity map. The reverse direction
/// (global id → each system's local id) is the `local_id` of each shadow in `RECORDS`.
pub const IDENTITY: TableDefinition<(&str, &str, &str), u128> = TableDefinition::new("identity");

/// `(entity, match-key field, normalised value) → global id`.
pub const MATCH_INDEX: TableDefinition<(&str, &str, &str), u128> = TableDefinition::new("match_index");

/// `(system, stream) → checkpoint JSON`: the source position committed with the effects
/// of the batch that reached it. A stream is a link name (`hr.employee`).
pub const CHECKPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("checkpoints");

/// `(target system, seq) → OutboxEntry`: pending writes, drained in seq order by the
/// system's applier.
pub const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");

/// `id → DeadLetter`.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// `id → Decision`, pruned by count and age.
pub const DECISIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("decisions");

/// `id → WriteLogEntry`: every write attempt, without values; pruned by count and age.
pub const WRITE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("write_log");

/// `id → AuditEntry`: reads of record data and mutations through the admin API.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// `(entity, system) → live records the system holds`: the denominator of the
/// mass-delete guard, kept as a counter so the guard does not scan the identity map.
pub const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counts");

/// `key id → wrapped data key` (see `crypto`): the data keys of an encrypted store,
/// each sealed under the key-encryption key. Empty for an unencrypted store.
pub const KEYS: TableDefinition<u32, &[u8]> = TableDefinition::new("keys");

/// The tables whose values hold record data and are sealed in an encrypted store.
pub const SEALED_TABLES: [&str; 4] = ["records", "decisions", "dead_letters", "outbox"];
