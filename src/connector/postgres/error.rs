//! PostgreSQL failures, classified by SQLSTATE for the engine.
//!
//! The class is the first two characters of the SQLSTATE
//! (<https://www.postgresql.org/docs/current/errcodes-appendix.html>):
//!
//! | SQLSTATE | class | why |
//! |---|---|---|
//! | `08` connection exception | transient | the server or network went away; reconnect |
//! | `40` transaction rollback (serialization, deadlock) | transient | the same transaction succeeds when run again |
//! | `53` insufficient resources (disk full, out of memory, too many connections) | transient | clears when the operator or the load does |
//! | `57P01`..`57P03` admin shutdown, crash shutdown, cannot connect now; `57014` query canceled | transient | a restart or a cancel, not the request |
//! | `55P03` lock not available, `25P02` in failed transaction | transient | contention, or a statement that ran after another failed |
//! | `28` invalid authorization | fatal | wrong password or no `pg_hba.conf` entry: every call fails until fixed |
//! | `42501` insufficient privilege | fatal | a missing grant: every call fails until fixed |
//! | `3D000` unknown database, `3F000` unknown schema, `42P01` unknown table, `42P10` no unique index on the id column | fatal | the configuration names something that is not there |
//! | `22` data exception, `23` integrity violation, `42703` unknown column, `42804` datatype mismatch | permanent | this row will fail the same way again: dead-letter it |
//! | anything else, and errors without a SQLSTATE (I/O, closed connection) | transient | unknown errors are retried |
//!
//! Reasons never hold a record value: a server message can quote one (`invalid input
//! syntax for type integer: "…"`, `Key (email)=(…) already exists`), so a reason is
//! built only from the SQLSTATE, the names of the constraint, column and table the
//! server reports, and the operator hint from [`HINTS`].

use tokio_postgres::error::DbError;

use crate::connector::{ConnectorError, ErrorClass};

/// Operator hints for permanent failures, most specific SQLSTATE first; a two-character
/// entry matches a whole class.
pub const HINTS: &[(&str, &str)] = &[
    (
        "23505",
        "another row already holds this unique value: check the link's match keys, or whether the row was created outside concord",
    ),
    (
        "23503",
        "the referenced row does not exist: write the parent record first, or make the foreign key DEFERRABLE",
    ),
    (
        "23502",
        "a NOT NULL column gets no value: map a field to it or give the column a default",
    ),
    (
        "23514",
        "a CHECK constraint refuses the value: fix the mapping's transform or the constraint",
    ),
    (
        "23P01",
        "an exclusion constraint refuses the row: it overlaps an existing row",
    ),
    ("23", "an integrity constraint refuses the row"),
    (
        "22001",
        "a value is longer than the column allows: widen the column or shorten the value in the mapping",
    ),
    ("22003", "a number is out of the column's range: widen the column type"),
    (
        "22P02",
        "a value does not parse as the column's type: check the field mapping and its transform",
    ),
    (
        "22007",
        "a date or time value has the wrong format: check the mapping's date format",
    ),
    ("22008", "a date or time value is out of range for the column"),
    (
        "22P05",
        "a text value holds a character the database encoding cannot store",
    ),
    ("22", "a value is not valid for its column: check the field mapping"),
    (
        "42703",
        "a mapped field names a column the table does not have: fix the link's field names or add the column",
    ),
    (
        "42804",
        "a value's type does not match the column: check the field mapping",
    ),
];

/// Class and bounded metric label of a SQLSTATE.
pub fn classify_sqlstate(code: &str) -> (ErrorClass, &'static str) {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        ("08", _) => (ErrorClass::Transient, "connection"),
        ("40", _) => (ErrorClass::Transient, "serialization"),
        ("53", _) => (ErrorClass::Transient, "resources"),
        (_, "57P01" | "57P02" | "57P03") => (ErrorClass::Transient, "shutdown"),
        (_, "57014" | "55P03" | "25P02") => (ErrorClass::Transient, "interrupted"),
        ("28", _) => (ErrorClass::Fatal, "auth"),
        (_, "42501") => (ErrorClass::Fatal, "privilege"),
        (_, "3D000" | "3F000" | "42P01" | "42P10") => (ErrorClass::Fatal, "undefined_object"),
        ("22", _) => (ErrorClass::Permanent, "data"),
        ("23", _) => (ErrorClass::Permanent, "integrity"),
        (_, "42703" | "42804") => (ErrorClass::Permanent, "schema"),
        _ => (ErrorClass::Transient, "postgres"),
    }
}

/// The operator hint for a SQLSTATE, if [`HINTS`] has one.
pub fn hint(code: &str) -> Option<&'static str> {
    HINTS
        .iter()
        .find(|(key, _)| code == *key || (key.len() == 2 && code.starts_with(key)))
        .map(|(_, hint)| *hint)
}

/// Classifies a tokio-postgres error met while `doing` something (`"upsert into
/// public.people"`); see the module doc.
pub fn classify(doing: &str, error: &tokio_postgres::Error) -> ConnectorError {
    match error.as_db_error() {
        Some(db) => classify_db(doing, db),
        None if error.is_closed() => ConnectorError::transient("connection", format!("{doing}: connection closed")),
        None => ConnectorError::transient("connection", format!("{doing}: connection to postgresql failed")),
    }
}

/// Classifies a server error; the reason names the SQLSTATE and the objects involved,
/// never the server's message.
pub fn classify_db(doing: &str, db: &DbError) -> ConnectorError {
    let code = db.code().code();
    let (class, kind) = classify_sqlstate(code);
    let mut reason = format!("{doing}: {kind} error (sqlstate {code})");
    for (what, name) in [
        ("constraint", db.constraint()),
        ("column", db.column()),
        ("table", db.table()),
        ("type", db.datatype()),
    ] {
        if let Some(name) = name {
            reason.push_str(&format!(", {what} {name:?}"));
        }
    }
    let hint = match (class, code) {
        (ErrorClass::Permanent, _) => hint(code),
        (_, "42501") => Some(
            "grant the role the table rights listed in the README (GRANT SELECT, INSERT, UPDATE, DELETE ON … TO …)",
        ),
        (ErrorClass::Fatal, "42P01" | "3F000") => Some("the link's object names a table that does not exist"),
        (ErrorClass::Fatal, "3D000") => Some("the system's database does not exist"),
        (ErrorClass::Fatal, "42P10") => {
            Some("the link's id_field needs a primary key or unique constraint on that column alone")
        }
        (ErrorClass::Fatal, _) => Some("check the system's user and password and the server's pg_hba.conf"),
        _ => None,
    };
    if let Some(hint) = hint {
        reason.push_str(": ");
        reason.push_str(hint);
    }
    ConnectorError {
        class,
        kind,
        reason,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_classify_by_class() {
        let cases: &[(&str, ErrorClass, &str)] = &[
            ("08006", ErrorClass::Transient, "connection"),
            ("08001", ErrorClass::Transient, "connection"),
            ("40001", ErrorClass::Transient, "serialization"),
            ("40P01", ErrorClass::Transient, "serialization"),
            ("53100", ErrorClass::Transient, "resources"),
            ("53300", ErrorClass::Transient, "resources"),
            ("57P01", ErrorClass::Transient, "shutdown"),
            ("57014", ErrorClass::Transient, "interrupted"),
            ("28P01", ErrorClass::Fatal, "auth"),
            ("28000", ErrorClass::Fatal, "auth"),
            ("42501", ErrorClass::Fatal, "privilege"),
            ("42P01", ErrorClass::Fatal, "undefined_object"),
            ("22001", ErrorClass::Permanent, "data"),
            ("22P02", ErrorClass::Permanent, "data"),
            ("23505", ErrorClass::Permanent, "integrity"),
            ("23502", ErrorClass::Permanent, "integrity"),
            ("42703", ErrorClass::Permanent, "schema"),
            ("XX000", ErrorClass::Transient, "postgres"),
            ("", ErrorClass::Transient, "postgres"),
        ];
        for (code, class, kind) in cases {
            assert_eq!(classify_sqlstate(code), (*class, *kind), "sqlstate {code}");
        }
    }

    #[test]
    fn every_permanent_class_has_a_hint() {
        for code in ["23505", "23503", "23502", "23514", "23000", "22001", "22012", "42703"] {
            assert!(hint(code).is_some(), "no hint for {code}");
        }
        assert_eq!(hint("23999"), hint("23"));
        assert_ne!(hint("23505"), hint("23"));
        assert_eq!(hint("40001"), None);
        for (code, _) in HINTS {
            assert_eq!(
                classify_sqlstate(code).0,
                ErrorClass::Permanent,
                "hint for non-permanent {code}"
            );
        }
    }
}
