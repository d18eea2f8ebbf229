//! Every redb table, in one place, with its key encoding.
//!
//! Keys are redb tuples, compared element by element, so a range over a prefix
//! (`(system, ..)`) lists one system's rows in order, except for the three largest key
//! sets, which every captured change searches. Records have a table per entity keyed by
//! the global id alone ([`records_table`]). The identity map and the match index are
//! keyed by flat byte strings ([`path_key`]), compared with one `memcmp` instead of a
//! tuple comparison that decodes each element's length on every step down the tree;
//! their rows are grouped by entity, then by system (or key field), like the tuples', but
//! the groups sort by name length first; nothing reads them in name order.
//! Values that are structs are JSON bytes (record states, outbox entries and decisions:
//! the binary layouts of `encoding`), sealed in an encrypted store for the tables
//! in [`SEALED_TABLES`] (see `crypto`); counters and ids are native
//! integers. Global ids are stored as `u128` (the UUID's big-endian value), so
//! UUIDv7 ids sort by creation time.

use redb::TableDefinition;

/// Version of the layout below. Bump it when a table's key or value changes meaning;
/// `StateStore::open` refuses a file with another version rather than misreading it.
/// Version 2 stores record states in the binary layout of `encoding`; version 3 also
/// outbox entries; version 4 also merge decisions; version 5 also the write log;
/// version 6 keys the identity map and the match index by [`path_key`]; version 7 stores
/// the decisions of one transaction in one row and the records of each entity in a table
/// of their own; version 8 writes records in the compact layout of `encoding` (a shadow
/// value that is the agreed value refers to it), which older builds cannot read.
pub const SCHEMA_VERSION: u64 = 8;

/// Older versions this build still reads. Opening such a file marks it with
/// [`SCHEMA_VERSION`], so a build that only knows the older layout refuses it
/// afterwards instead of misreading new rows. Version 1 stored record states, outbox
/// entries, decisions and the write log as JSON, version 2 outbox entries, decisions and
/// the write log, version 3 decisions and the write log, version 4 the write log;
/// `encoding` tells them apart by the first byte. Versions 1 to 5 kept the identity map
/// and the match index in [`IDENTITY_V5`] and [`MATCH_INDEX_V5`]; opening such a file
/// moves their rows to the tables of version 6 in the same transaction. Versions 1 to 6
/// stored one decision per row, which is read as a group of one, and every record in
/// [`RECORDS_V6`], whose rows opening moves to the entities' tables (values unchanged:
/// a sealed record is bound to its entity and id, not to the table's key encoding).
/// Versions 2 to 7 wrote records without references (`encoding::RECORD_BINARY`).
pub const UPGRADABLE_SCHEMA_VERSIONS: [u64; 7] = [1, 2, 3, 4, 5, 6, 7];

/// `name → value`: `schema_version`; for an encrypted store also `encrypted` (1),
/// `current_key_id` (the data key new values are sealed with) and `rotating` (1 while
/// `concord state rotate-key` has values left to re-seal).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Monotonic id sequences: `name → next id` (`outbox`, `decision`, `dead_letter`,
/// `write_log`, `audit`).
pub const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");

/// One records table per entity, named by [`records_table_name`]: `global id →
/// RecordState` (binary, see `encoding`): the base with provenance, every system's
/// shadow, and the match-key values indexed for the record. One row per record because
/// every merge reads and writes all of it together. The key is the global id alone, a
/// fixed-width integer: the B-tree's searches compare 16 bytes instead of decoding a
/// tuple. A table is created by the first record of its entity.
pub fn records_table(name: &str) -> TableDefinition<'_, u128, &'static [u8]> {
    TableDefinition::new(name)
}

/// Every records table's name starts with this, followed by the entity's name.
pub const RECORDS_PREFIX: &str = "records.";

pub fn records_table_name(entity: &str) -> String {
    format!("{RECORDS_PREFIX}{entity}")
}

/// The records of schema versions 1 to 6, all entities in one table, `(entity, global
/// id) → RecordState`; only the upgrade reads it, and deletes it.
pub const RECORDS_V6: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("records");

/// `path_key(entity, system, local id) → global id`: the identity map. The reverse
/// direction (global id → each system's local id) is the `local_id` of each shadow in
/// `RECORDS`.
pub const IDENTITY: TableDefinition<&[u8], u128> = TableDefinition::new("identity_map");

/// `path_key(entity, match-key field, normalised value) → global id`.
pub const MATCH_INDEX: TableDefinition<&[u8], u128> = TableDefinition::new("match_keys");

/// The identity map of schema versions 1 to 5, `(entity, system, local id) → global id`;
/// only the upgrade reads it, and deletes it.
pub const IDENTITY_V5: TableDefinition<(&str, &str, &str), u128> = TableDefinition::new("identity");

/// The match index of schema versions 1 to 5; only the upgrade reads it, and deletes it.
pub const MATCH_INDEX_V5: TableDefinition<(&str, &str, &str), u128> = TableDefinition::new("match_index");

/// `(system, stream) → checkpoint JSON`: the source position committed with the effects
/// of the batch that reached it. A stream is a link name (`hr.employee`).
pub const CHECKPOINTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("checkpoints");

/// `(target system, seq) → OutboxEntry`: pending writes, drained in seq order by the
/// system's applier.
pub const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");

/// `id → DeadLetter`.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// `first decision id → the decisions of one write transaction` (a group, see
/// `encoding`; one decision per row before schema version 7), pruned a row at a time by
/// count and age.
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
/// (`records` stands for every entity's records table.)
pub const SEALED_TABLES: [&str; 4] = ["records", "decisions", "dead_letters", "outbox"];

// The identity map's and the match index's key layout is written and read with the
// varints of the value layouts.
pub use super::encoding::{path_key, path_prefix, split_path_key};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn part() -> impl Strategy<Value = String> {
        // Short and long parts (a length of 128 or more takes two varint bytes), with
        // bytes that look like lengths and multi-byte characters.
        prop_oneof!["[a-z\u{0}\u{7f}\u{80}é_.-]{0,12}", "[a-z]{120,300}",]
    }

    proptest! {
        #[test]
        fn a_path_key_splits_into_its_parts(a in part(), b in part(), c in part()) {
            let key = path_key(&a, &b, &c);
            prop_assert_eq!(split_path_key(&key), Some((a.as_str(), b.as_str(), c.as_str())));
        }

        #[test]
        fn a_key_starts_with_the_prefix_of_its_first_part_and_no_other(
            a in part(), b in part(), c in part(), other in part(),
        ) {
            let key = path_key(&a, &b, &c);
            prop_assert!(key.starts_with(&path_prefix(&a)));
            prop_assert_eq!(key.starts_with(&path_prefix(&other)), a == other);
        }

        #[test]
        fn keys_with_the_same_first_parts_sort_by_the_last(a in part(), b in part(), c in part(), d in part()) {
            prop_assert_eq!(path_key(&a, &b, &c).cmp(&path_key(&a, &b, &d)), c.cmp(&d));
        }

        #[test]
        fn splitting_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some((a, b, c)) = split_path_key(&bytes) {
                let again = path_key(a, b, c);
                prop_assert_eq!(again.as_slice(), bytes.as_slice());
            }
        }
    }

    #[test]
    fn a_cut_key_does_not_split() {
        let key = path_key("contact", "hr", "E1");
        // Cut inside the second part, inside its length, and inside a long length.
        assert_eq!(split_path_key(&key[..9]), None);
        assert_eq!(split_path_key(&key[..8]), None);
        let long = "x".repeat(200);
        let key = path_key(&long, "hr", "E1");
        assert_eq!(split_path_key(&key[..1]), None);
        assert_eq!(&key[..2], &[0xc8, 0x01]);
        // One length written two ways: only the shortest is a key.
        assert_eq!(split_path_key(&[0x80, 0x00, 0x00, b'x']), None);
        assert_eq!(split_path_key(&[0x00, 0x00, b'x']), Some(("", "", "x")));
    }
}
