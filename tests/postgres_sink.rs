//! The PostgreSQL sink against a real cluster started by the test harness: batched
//! upserts and deletes, exact round trips of every common type, quoted identifiers,
//! optimistic concurrency with a version column, per-row failures, error classes.

mod support;

use concord::connector::postgres::sink::{PostgresSink, SinkTable};
use concord::connector::postgres::values;
use concord::connector::{ConnectorError, ErrorClass};
use concord::model::{GlobalId, Write, WriteAck, WriteOp};
use serde_json::{Value, json};
use support::pg::{PgCluster, Role, TestDb};

/// A sink writing `tables` as `role`, with its configuration directory.
struct Fixture {
    sink: PostgresSink,
    _dir: tempfile::TempDir,
}

async fn sink(db: &TestDb<'_>, role: &Role, tables: &[(&str, &str, Option<&str>)]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = db.system_config(role, dir.path());
    let tables = tables
        .iter()
        .map(|(object, id, version)| SinkTable {
            object: object.to_string(),
            id_field: id.to_string(),
            version_field: version.map(str::to_string),
        })
        .collect();
    let sink = PostgresSink::open("app", &config, dir.path(), tables).expect("sink opens");
    Fixture { sink, _dir: dir }
}

/// A role with exactly the rights a writing link needs on `tables`.
async fn writer(db: &TestDb<'_>, tables: &str) -> Role {
    let role = db.create_role("writer", "").await;
    db.execute(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {}",
        role.name
    ))
    .await;
    role
}

fn write(seq: u64, op: WriteOp, object: &str, local_id: Option<&str>, fields: Value) -> Write {
    Write {
        seq,
        entity: "person".into(),
        global_id: GlobalId::from_u128(0x1000 + u128::from(seq)),
        op,
        local_id: local_id.map(str::to_string),
        object: object.into(),
        fields: fields.as_object().cloned().unwrap_or_default(),
        expected_version: None,
    }
}

fn create(seq: u64, object: &str, fields: Value) -> Write {
    write(seq, WriteOp::Create, object, None, fields)
}

fn update(seq: u64, object: &str, id: &str, fields: Value) -> Write {
    write(seq, WriteOp::Update, object, Some(id), fields)
}

fn delete(seq: u64, object: &str, id: &str) -> Write {
    write(seq, WriteOp::Delete, object, Some(id), json!({}))
}

fn ok(result: &Result<WriteAck, ConnectorError>) -> &WriteAck {
    result
        .as_ref()
        .unwrap_or_else(|e| panic!("write failed: {e} ({:?}, {})", e.class, e.kind))
}

fn err(result: &Result<WriteAck, ConnectorError>) -> &ConnectorError {
    match result {
        Ok(ack) => panic!("write succeeded ({ack:?}), expected a failure"),
        Err(e) => e,
    }
}

/// Every row of a query, each column read as text (`NULL` as `None`).
async fn rows(db: &TestDb<'_>, sql: &str) -> Vec<Vec<Option<String>>> {
    let admin = db.admin().await;
    let rows = admin.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .map(|r| (0..r.len()).map(|i| r.get::<_, Option<String>>(i)).collect())
        .collect()
}

fn text(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

#[tokio::test]
async fn harness_gives_a_logical_cluster_and_fresh_databases() {
    let cluster = PgCluster::shared();
    let a = cluster.fresh_db().await;
    let b = cluster.fresh_db().await;
    assert_ne!(a.name, b.name);
    let admin = a.admin().await;
    let row = admin.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = admin.query_one("SELECT current_database()", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), a.name);

    a.execute("CREATE TABLE t (id int PRIMARY KEY)").await;
    let role = a.create_role("reader", "").await;
    let client = a.connect_as(&role).await;
    let denied = client.query("SELECT * FROM t", &[]).await.unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    a.execute(&format!("GRANT SELECT ON t TO {}", role.name)).await;
    assert!(client.query("SELECT * FROM t", &[]).await.unwrap().is_empty());

    let wrong = cluster
        .connect(&a.name, &role.name, "not-the-password")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));
}

#[tokio::test]
async fn upserts_and_deletes_in_one_batch_and_repeats_change_nothing() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, email text);
         INSERT INTO people VALUES (10, 'Old', 'old@example.com'), (11, 'Gone', NULL);",
    )
    .await;
    let role = writer(&db, "people").await;
    let mut f = sink(&db, &role, &[("people", "id", None)]).await;

    let batch = vec![
        create(1, "people", json!({"id": 1, "name": "Ada", "email": "ada@example.com"})),
        create(2, "people", json!({"id": "2", "name": "Grace"})),
        update(3, "people", "10", json!({"name": "New"})),
        delete(4, "people", "11"),
        delete(5, "people", "999"),
    ];
    let results = f.sink.apply(batch.clone()).await;
    assert_eq!(results.len(), 5);
    let ids: Vec<&str> = results.iter().map(|r| ok(r).local_id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "10", "11", "999"]);
    let expected = vec![
        vec![Some("1".into()), Some("Ada".into()), Some("ada@example.com".into())],
        vec![Some("2".into()), Some("Grace".into()), None],
        vec![Some("10".into()), Some("New".into()), Some("old@example.com".into())],
    ];
    let sql = "SELECT id::text, name, email FROM people ORDER BY people.id";
    assert_eq!(rows(&db, sql).await, expected);

    // The engine repeats a batch whose confirmation was lost: nothing changes.
    let again = f.sink.apply(batch).await;
    assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
    assert_eq!(rows(&db, sql).await, expected);

    // An update of a field to null; an update of a row deleted outside concord fails
    // permanently and does not recreate it.
    let results = f
        .sink
        .apply(vec![
            update(6, "people", "1", json!({"email": null})),
            update(7, "people", "3", json!({"name": "Late"})),
        ])
        .await;
    ok(&results[0]);
    let gone = err(&results[1]);
    assert_eq!((gone.class, gone.kind), (ErrorClass::Permanent, "not_found"), "{gone}");
    assert_eq!(
        rows(&db, "SELECT id::text, name, email FROM people WHERE id IN (1, 3)").await,
        vec![vec![Some("1".into()), Some("Ada".into()), None]]
    );
}

#[tokio::test]
async fn creates_without_a_key_return_the_generated_one() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text);
         CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), title text);",
    )
    .await;
    let role = writer(&db, "tickets, docs").await;
    let mut f = sink(&db, &role, &[("tickets", "id", None), ("docs", "id", None)]).await;
    let results = f
        .sink
        .apply(vec![
            create(1, "tickets", json!({"title": "a"})),
            create(2, "tickets", json!({"title": "b"})),
            create(3, "docs", json!({"title": "c"})),
        ])
        .await;
    let first: i64 = ok(&results[0]).local_id.parse().expect("numeric id");
    let second: i64 = ok(&results[1]).local_id.parse().expect("numeric id");
    assert_eq!(second, first + 1);
    let doc = &ok(&results[2]).local_id;
    assert_eq!(
        rows(&db, "SELECT id::text, title FROM docs").await,
        vec![text(&[doc, "c"])]
    );
    assert_eq!(
        rows(&db, "SELECT id::text, title FROM tickets ORDER BY tickets.id").await,
        vec![text(&[&first.to_string(), "a"]), text(&[&second.to_string(), "b"])]
    );
    // The returned id is the one later updates carry.
    let results = f.sink.apply(vec![update(4, "docs", doc, json!({"title": "c2"}))]).await;
    ok(&results[0]);
    assert_eq!(rows(&db, "SELECT title FROM docs").await, vec![text(&["c2"])]);
}

/// Canonical values (as capture produces them) → sink → table → read back as text with
/// concord's session settings → canonical values again: equal, for every common type.
#[tokio::test]
async fn every_common_type_round_trips_exactly() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN positive AS numeric CHECK (VALUE > 0);
         CREATE TABLE typed (
            id uuid PRIMARY KEY,
            b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
            n numeric, n2 numeric(12,2), money_like positive,
            ts timestamp, tstz timestamptz, d date, t time, ttz timetz, iv interval,
            by bytea, j json, jb jsonb, tx text, vc varchar(20), ch char(3), e mood,
            ip inet, cidr_ cidr, mac macaddr, bits bit(4), vbits varbit,
            ia int4[], ta text[], na numeric[], tsa timestamptz[], ja jsonb[], ea mood[],
            grid int8[], jl json[]
         );",
    )
    .await;
    let role = writer(&db, "typed").await;
    let mut f = sink(&db, &role, &[("typed", "id", None)]).await;

    let record = json!({
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "b": true,
        "i2": -32768,
        "i4": 2147483647,
        "i8": 9223372036854775807i64,
        "f4": 1.5,
        "f8": 0.1,
        "n": "123456789012345678901234567890.000000000000000000001",
        "n2": "12.50",
        "money_like": "0.0001",
        "ts": "2026-01-02T03:04:05.123456",
        "tstz": "2026-01-02T03:04:05.123456+00:00",
        "d": "2026-02-28",
        "t": "23:59:59.999999",
        "ttz": "12:00:00+05:30",
        "iv": "P1Y2M3DT4H5M6.5S",
        "by": "AP8QJw==",
        "j": {"b": [1, "x", null], "a": {"deep": true}},
        "jb": {"k": "v \"quoted\" \\ back", "n": 12.5, "list": []},
        "tx": "plain 'single' \"double\" \\ back\nnew line, comma {brace} ünïcödé 🎉",
        "vc": "short",
        "ch": "ab ",
        "e": "happy",
        "ip": "192.168.0.1",
        "cidr_": "10.0.0.0/8",
        "mac": "08:00:2b:01:02:03",
        "bits": "1010",
        "vbits": "101",
        "ia": [1, null, -3],
        "ta": ["a b", "c\"d", "e\\f", "NULL", null, "", "{x}", "comma,here"],
        "na": ["1.10", "NaN", "-0.000001"],
        "tsa": ["2026-01-02T03:04:05+00:00"],
        "ja": [{"a": 1}, "s", 7, null, [1, [2, "x,y"]], [], {"q": "\"{}\""}],
        "ea": ["sad", "ok"],
        "grid": [[1, 2], [3, 4]],
        "jl": [[1, 2], {"k": "v,w"}, "NULL"],
    });
    let results = f.sink.apply(vec![create(1, "typed", record.clone())]).await;
    assert_eq!(ok(&results[0]).local_id, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");

    // Read back through concord's own connection settings, as capture would.
    let dir = tempfile::tempdir().unwrap();
    let config = db.system_config(&role, dir.path());
    let client = concord::connector::postgres::connect(&config, dir.path())
        .await
        .expect("connect");
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid, t.typelem FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE attrelid = 'typed'::regclass AND attnum > 0 ORDER BY attnum",
            &[],
        )
        .await
        .unwrap();
    // The simple query protocol returns every value in its text output form, the form
    // pgoutput sends.
    let messages = client.simple_query("SELECT * FROM typed").await.unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("one row");
    let enum_oid: u32 = client
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await
        .unwrap()
        .get(0);
    let expected = record.as_object().unwrap();
    assert_eq!(columns.len(), expected.len());
    for (i, column) in columns.iter().enumerate() {
        let name: String = column.get(0);
        let oid: u32 = column.get(1);
        let elem: u32 = column.get(2);
        let kind = if elem == enum_oid {
            values::Kind::Array(Box::new(values::Kind::Text))
        } else {
            values::kind_of(oid)
        };
        let got = row.get(i).map(|t| values::to_json(&kind, t)).unwrap_or(Value::Null);
        assert_eq!(&got, &expected[&name], "column {name}");
    }

    // A timestamp written with another offset keeps its instant.
    let results = f
        .sink
        .apply(vec![update(
            2,
            "typed",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            json!({"tstz": "2026-01-02T08:34:05+05:30"}),
        )])
        .await;
    ok(&results[0]);
    let row = client
        .query_one("SELECT tstz = '2026-01-02 03:04:05+00' FROM typed", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test]
async fn odd_identifiers_are_quoted() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        r#"CREATE SCHEMA "Odd Schema";
           CREATE TABLE "Odd Schema"."we""ird Table" ("ID" text PRIMARY KEY, "select" int, "a b" text, "ünï" text, "x""); DROP TABLE y; --" text);"#,
    )
    .await;
    let role = writer(&db, r#""Odd Schema"."we""ird Table""#).await;
    db.execute(&format!(r#"GRANT USAGE ON SCHEMA "Odd Schema" TO {}"#, role.name))
        .await;
    let object = "Odd Schema.we\"ird Table";
    let mut f = sink(&db, &role, &[(object, "ID", None)]).await;
    let results = f
        .sink
        .apply(vec![
            create(
                1,
                object,
                json!({"ID": "K-1", "select": 7, "a b": "v", "ünï": "w", "x\"); DROP TABLE y; --": "z"}),
            ),
            create(2, object, json!({"ID": "K'2", "select": 8})),
            update(3, object, "K-1", json!({"select": 9})),
            delete(4, object, "K'2"),
        ])
        .await;
    for r in &results {
        ok(r);
    }
    assert_eq!(
        rows(
            &db,
            r#"SELECT "ID", "select"::text, "a b", "ünï", "x""); DROP TABLE y; --" FROM "Odd Schema"."we""ird Table""#
        )
        .await,
        vec![text(&["K-1", "9", "v", "w", "z"])]
    );
}

#[tokio::test]
async fn a_stale_version_is_a_conflict_and_overwrites_nothing() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE accounts (id text PRIMARY KEY, owner text, version int NOT NULL DEFAULT 1);
         CREATE TABLE notes (id text PRIMARY KEY, body text,
                             modified_at timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00');",
    )
    .await;
    let role = writer(&db, "accounts, notes").await;
    let mut f = sink(
        &db,
        &role,
        &[
            ("accounts", "id", Some("version")),
            ("notes", "id", Some("modified_at")),
        ],
    )
    .await;

    let results = f
        .sink
        .apply(vec![create(1, "accounts", json!({"id": "a", "owner": "ann"}))])
        .await;
    assert_eq!(ok(&results[0]).version.as_deref(), Some("1"));

    // Concord saw version 1: its update lands and bumps the integer version.
    let mut w = update(2, "accounts", "a", json!({"owner": "bob"}));
    w.expected_version = Some("1".into());
    let results = f.sink.apply(vec![w]).await;
    assert_eq!(ok(&results[0]).version.as_deref(), Some("2"));

    // Someone else updates the row; concord still believes version 2.
    db.execute("UPDATE accounts SET owner = 'carl', version = version + 1 WHERE id = 'a'")
        .await;
    let mut stale = update(3, "accounts", "a", json!({"owner": "dora"}));
    stale.expected_version = Some("2".into());
    let mut stale_delete = delete(4, "accounts", "a");
    stale_delete.expected_version = Some("2".into());
    let other = create(5, "accounts", json!({"id": "b", "owner": "eve"}));
    let results = f.sink.apply(vec![stale, stale_delete, other]).await;
    for conflict in [err(&results[0]), err(&results[1])] {
        assert_eq!(conflict.kind, "version_conflict");
        assert_eq!(conflict.class, ErrorClass::Transient);
    }
    ok(&results[2]);
    assert_eq!(
        rows(&db, "SELECT id, owner, version::text FROM accounts ORDER BY id").await,
        vec![text(&["a", "carl", "3"]), text(&["b", "eve", "1"])]
    );

    // With the current version the delete goes through.
    let mut current = delete(6, "accounts", "a");
    current.expected_version = Some("3".into());
    ok(&f.sink.apply(vec![current]).await[0]);
    assert_eq!(rows(&db, "SELECT id FROM accounts").await, vec![text(&["b"])]);

    // A timestamp version compares as a timestamp, whatever its text form.
    let results = f
        .sink
        .apply(vec![create(7, "notes", json!({"id": "n", "body": "x"}))])
        .await;
    assert_eq!(ok(&results[0]).version.as_deref(), Some("2026-01-01T00:00:00+00:00"));
    let mut w = update(8, "notes", "n", json!({"body": "y"}));
    w.expected_version = Some("2026-01-01 00:00:00+00".into());
    ok(&f.sink.apply(vec![w]).await[0]);
    let mut w = update(9, "notes", "n", json!({"body": "z"}));
    w.expected_version = Some("2025-12-31T23:59:59+00:00".into());
    assert_eq!(err(&f.sink.apply(vec![w]).await[0]).kind, "version_conflict");
    assert_eq!(rows(&db, "SELECT body FROM notes").await, vec![text(&["y"])]);
}

#[tokio::test]
async fn a_failing_row_does_not_lose_the_rest_of_the_batch() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int CHECK (qty >= 0),
                             code varchar(4) UNIQUE);",
    )
    .await;
    let role = writer(&db, "items").await;
    let mut f = sink(&db, &role, &[("items", "id", None)]).await;
    let batch = vec![
        create(1, "items", json!({"id": 1, "name": "one", "code": "A"})),
        create(2, "items", json!({"id": 2, "qty": 1})),
        create(
            3,
            "items",
            json!({"id": 3, "name": "three", "qty": "secret-not-a-number"}),
        ),
        create(4, "items", json!({"id": 4, "name": "four", "qty": -1})),
        create(5, "items", json!({"id": 5, "name": "five", "code": "A"})),
        create(6, "items", json!({"id": 6, "name": "six", "code": "toolong"})),
        create(7, "items", json!({"id": 7, "name": "seven", "nope": 1})),
        create(8, "items", json!({"id": 8, "name": "eight", "qty": 8})),
    ];
    let results = f.sink.apply(batch).await;
    assert_eq!(results.len(), 8);
    ok(&results[0]);
    ok(&results[7]);
    let expect = [
        (1, "integrity", "23502"),
        (2, "data", "22P02"),
        (3, "integrity", "23514"),
        (4, "integrity", "23505"),
        (5, "data", "22001"),
    ];
    for (index, kind, code) in expect {
        let e = err(&results[index]);
        assert_eq!((e.class, e.kind), (ErrorClass::Permanent, kind), "row {index}: {e}");
        assert!(e.reason.contains(code), "row {index}: {e}");
    }
    let unknown = err(&results[6]);
    assert_eq!((unknown.class, unknown.kind), (ErrorClass::Permanent, "schema"));
    assert!(unknown.reason.contains("\"nope\""), "{unknown}");
    // Reasons never carry record values.
    for r in &results {
        if let Err(e) = r {
            assert!(
                !e.reason.contains("secret-not-a-number") && !e.reason.contains("toolong"),
                "{e}"
            );
        }
    }
    assert_eq!(
        rows(&db, "SELECT id::text, name FROM items ORDER BY items.id").await,
        vec![text(&["1", "one"]), text(&["8", "eight"])]
    );
}

#[tokio::test]
async fn failures_are_classified_by_sqlstate() {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_db().await;
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE hidden (id int PRIMARY KEY);")
        .await;

    // A role without INSERT: fatal, the link cannot go on until it gets the grant.
    let reader = db.create_role("reader", "").await;
    db.execute(&format!("GRANT SELECT ON t TO {}", reader.name)).await;
    let mut f = sink(&db, &reader, &[("t", "id", None)]).await;
    let results = f.sink.apply(vec![create(1, "t", json!({"id": 1, "v": "x"}))]).await;
    let e = err(&results[0]);
    assert_eq!((e.class, e.kind), (ErrorClass::Fatal, "privilege"), "{e}");
    assert!(e.reason.contains("42501") && e.reason.contains("GRANT"), "{e}");

    // A table the role cannot see, and one that does not exist: fatal.
    let writer = writer(&db, "t").await;
    let mut f = sink(&db, &writer, &[("hidden", "id", None), ("missing", "id", None)]).await;
    let results = f
        .sink
        .apply(vec![
            create(1, "hidden", json!({"id": 1})),
            create(2, "missing", json!({"id": 1})),
        ])
        .await;
    for r in &results {
        assert_eq!(err(r).class, ErrorClass::Fatal, "{:?}", err(r));
    }

    // A wrong password: fatal (authentication).
    let dir = tempfile::tempdir().unwrap();
    let mut config = db.system_config(&writer, dir.path());
    std::fs::write(dir.path().join("wrong"), "not-the-password").unwrap();
    config.password = Some(concord::config::SecretRef::File("wrong".into()));
    let mut bad = PostgresSink::open("app", &config, dir.path(), vec![]).unwrap();
    let results = bad.apply(vec![create(1, "t", json!({"id": 1}))]).await;
    let e = err(&results[0]);
    assert_eq!((e.class, e.kind), (ErrorClass::Fatal, "auth"), "{e}");

    // Nothing listening: transient.
    let mut config = db.system_config(&writer, dir.path());
    config.port = support::free_port();
    let mut down = PostgresSink::open("app", &config, dir.path(), vec![]).unwrap();
    let e = err(&down.apply(vec![create(1, "t", json!({"id": 1}))]).await[0]).clone();
    assert_eq!((e.class, e.kind), (ErrorClass::Transient, "connection"), "{e}");

    // The server ends the sink's session (57P01 admin shutdown, or the closed
    // connection it leaves): transient, and the next batch reconnects.
    let mut f = sink(&db, &writer, &[("t", "id", None)]).await;
    ok(&f.sink.apply(vec![create(1, "t", json!({"id": 1}))]).await[0]);
    db.execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
        writer.name
    ))
    .await;
    let first = f.sink.apply(vec![create(2, "t", json!({"id": 2}))]).await;
    if let Err(e) = &first[0] {
        assert_eq!(e.class, ErrorClass::Transient, "{e}");
        ok(&f.sink.apply(vec![create(2, "t", json!({"id": 2}))]).await[0]);
    }
    assert_eq!(
        rows(&db, "SELECT id::text FROM t ORDER BY t.id").await,
        vec![text(&["1"]), text(&["2"])]
    );
}

/// The bundled example with its company directory moved into a PostgreSQL table: the
/// engine's applier writes the merged contacts through the sink, creates get the ids
/// the table generates, and a second run writes nothing twice.
#[tokio::test]
async fn the_engine_writes_merged_records_through_the_sink() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE contacts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, mail text UNIQUE,
                                display_name text, job_title text, telephone text, certified boolean,
                                source text);",
    )
    .await;
    let role = writer(&db, "contacts").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_copy(dir.path(), support::free_port());
    let original = std::fs::read_to_string(&config).unwrap();
    let start = original.find("[systems.directory]").expect("directory system");
    let end = start + original[start..].find("\n\n").expect("end of the directory system");
    let system = format!(
        "[systems.directory]\ntype = \"postgres\"\ndirection = \"write\"\n{}",
        db.system_toml(&role, dir.path())
    );
    std::fs::write(
        &config,
        format!("{}{}{}", &original[..start], system.trim_end(), &original[end..]),
    )
    .unwrap();

    let run = |config: &std::path::Path| {
        let out = support::concord(&["run", "--once", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&config);
    let sql = "SELECT mail, display_name, coalesce(job_title, ''), coalesce(telephone, ''), \
               coalesce(certified::text, ''), source FROM contacts ORDER BY mail";
    let written = rows(&db, sql).await;
    assert_eq!(written.len(), 6, "{written:?}");
    let ada = written
        .iter()
        .find(|r| r[0].as_deref() == Some("ada.lovelace@example.com"))
        .expect("ada");
    assert_eq!(
        ada[1..],
        text(&["Ada Lovelace", "Head of Engineering", "+12125550101", "true", "concord"])[..]
    );
    let alan = written
        .iter()
        .find(|r| r[0].as_deref() == Some("alan.turing@example.com"))
        .expect("alan");
    assert_eq!(alan[1].as_deref(), Some("Alan Turing"), "HR owns names");
    assert!(
        !written
            .iter()
            .any(|r| r[0].as_deref() == Some("edsger.dijkstra@example.com"))
    );

    run(&config);
    assert_eq!(rows(&db, sql).await, written, "a second run writes nothing twice");
}

/// A row already in the table (left by an earlier create whose answer a crash lost, or
/// written before concord knew the person) holds an older value of a field nobody owns.
/// The create runs into it, the row is read back and merged: it links the record, and
/// its older value does not beat the newer one from the HR export (last writer wins), so
/// the table ends holding the export's value.
#[tokio::test]
async fn a_row_a_create_ran_into_does_not_undo_newer_values() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE contacts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, mail text UNIQUE,
                                display_name text, job_title text, telephone text, certified boolean,
                                source text);
         INSERT INTO contacts (mail, display_name, job_title)
              VALUES ('ada.lovelace@example.com', 'Ada Lovelace', 'Analyst');",
    )
    .await;
    // The export is written after the row.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let role = writer(&db, "contacts").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_copy(dir.path(), support::free_port());
    let original = std::fs::read_to_string(&config).unwrap();
    let start = original.find("[systems.directory]").expect("directory system");
    let end = start + original[start..].find("\n\n").expect("end of the directory system");
    let system = format!(
        "[systems.directory]\ntype = \"postgres\"\ndirection = \"write\"\n{}",
        db.system_toml(&role, dir.path())
    );
    let owned_title = "[entities.contact.fields.title]\nowners = [\"hr\"]\n\n";
    let edited = format!("{}{}{}", &original[..start], system.trim_end(), &original[end..]);
    assert!(edited.contains(owned_title));
    std::fs::write(&config, edited.replace(owned_title, "")).unwrap();

    let run = |config: &std::path::Path| {
        let out = support::concord(&["run", "--once", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&config);
    let sql = "SELECT id::text, coalesce(job_title, ''), coalesce(telephone, ''), coalesce(source, '') \
               FROM contacts WHERE mail = 'ada.lovelace@example.com'";
    let ada = rows(&db, sql).await;
    assert_eq!(
        ada,
        vec![text(&["1", "Head of Engineering", "+12125550101", "concord"])],
        "the one row, updated to the export's values"
    );
    let every = "SELECT id::text, mail, display_name, job_title, telephone, certified::text, source \
                 FROM contacts ORDER BY id";
    let written = rows(&db, every).await;
    assert_eq!(written.len(), 6, "{written:?}");
    run(&config);
    assert_eq!(rows(&db, every).await, written, "a second run writes nothing");
}

/// A create without a key that runs into a row holding the same unique value (the
/// person is already there) fails alone, and the sink reads that row for the engine to
/// merge, instead of the create ending as a dead letter.
#[tokio::test]
async fn a_create_refused_by_a_unique_key_reads_the_row_it_ran_into() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE staff (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                             email text NOT NULL UNIQUE, title text, version int NOT NULL DEFAULT 3);
         INSERT INTO staff (id, email, title) VALUES (41, 'ada@example.com', 'Analyst');",
    )
    .await;
    let role = writer(&db, "staff").await;
    let mut f = sink(&db, &role, &[("staff", "id", Some("version"))]).await;
    assert!(f.sink.take_rereads().is_empty());
    let results = f
        .sink
        .apply(vec![
            create(7, "staff", json!({"email": "ada@example.com", "title": "Engineer"})),
            create(8, "staff", json!({"email": "bob@example.com", "title": "Clerk"})),
        ])
        .await;
    let refused = err(&results[0]);
    assert_eq!(
        (refused.class, refused.kind),
        (ErrorClass::Permanent, "integrity"),
        "{refused}"
    );
    ok(&results[1]);
    let rereads = f.sink.take_rereads();
    assert_eq!(rereads.len(), 1, "{rereads:?}");
    assert_eq!((rereads[0].seq, rereads[0].entity.as_str()), (7, "person"));
    let record = &rereads[0].record;
    assert_eq!(record.local_id, "41");
    assert_eq!(record.version.as_deref(), Some("3"));
    assert_eq!(
        Value::Object(record.fields.clone()),
        json!({"id": 41, "email": "ada@example.com", "title": "Analyst", "version": 3})
    );
    assert!(f.sink.take_rereads().is_empty(), "taken once");
    // A create carrying its key is an upsert on it; a conflict on another key is with a
    // different row, a real integrity error, and reads nothing.
    let results = f
        .sink
        .apply(vec![create(9, "staff", json!({"id": 50, "email": "ada@example.com"}))])
        .await;
    assert_eq!(err(&results[0]).kind, "integrity");
    assert!(f.sink.take_rereads().is_empty());
}

/// Consecutive writes of one shape go to the server as one statement over arrays (a
/// statement-level trigger counts them); every row still gets its own answer: the
/// generated key of its own row, `not_found` for an update of a missing row, success
/// for a delete of a missing row, its own error when it alone fails, and two writes of
/// one key in one batch land in order.
#[tokio::test]
async fn runs_of_one_shape_are_one_statement_and_every_row_keeps_its_own_answer() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, email text UNIQUE);
         CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL);
         CREATE TABLE statements (op text NOT NULL);
         CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS
           $$ BEGIN INSERT INTO statements VALUES (TG_TABLE_NAME || ' ' || TG_OP); RETURN NULL; END $$;
         CREATE TRIGGER people_statements AFTER INSERT OR UPDATE OR DELETE ON people
           FOR EACH STATEMENT EXECUTE FUNCTION count_statement();
         CREATE TRIGGER tickets_statements AFTER INSERT ON tickets
           FOR EACH STATEMENT EXECUTE FUNCTION count_statement();",
    )
    .await;
    let role = writer(&db, "people, tickets").await;
    let mut f = sink(&db, &role, &[("people", "id", None), ("tickets", "id", None)]).await;
    let counted = async |db: &TestDb<'_>| {
        rows(
            db,
            "SELECT op || ' ' || count(*) FROM statements GROUP BY op ORDER BY op",
        )
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap_or_default())
        .collect::<Vec<String>>()
    };
    let reset = async |db: &TestDb<'_>| db.execute("DELETE FROM statements").await;

    // 40 keyed creates, then 50 creates whose keys the table generates.
    let mut batch: Vec<Write> = (1..=40)
        .map(|i| {
            create(
                i,
                "people",
                json!({"id": i, "name": format!("n{i}"), "email": format!("p{i}@example.com")}),
            )
        })
        .collect();
    batch.extend((1..=50).map(|i| create(100 + i, "tickets", json!({"title": format!("t{i}")}))));
    let results = f.sink.apply(batch).await;
    let ids: Vec<String> = results[..40].iter().map(|r| ok(r).local_id.clone()).collect();
    assert_eq!(ids, (1..=40).map(|i| i.to_string()).collect::<Vec<_>>());
    for (i, result) in results[40..].iter().enumerate() {
        let id = &ok(result).local_id;
        let title = rows(&db, &format!("SELECT title FROM tickets WHERE id = {id}")).await;
        assert_eq!(title, vec![text(&[&format!("t{}", i + 1)])], "ticket {id}");
    }
    // An `INSERT … ON CONFLICT DO UPDATE` fires the statement triggers of both.
    assert_eq!(
        counted(&db).await,
        ["people INSERT 1", "people UPDATE 1", "tickets INSERT 1"]
    );
    reset(&db).await;

    // 30 updates, then two more of one key.
    let mut batch: Vec<Write> = (1..=30)
        .map(|i| update(200 + i, "people", &i.to_string(), json!({"name": format!("u{i}")})))
        .collect();
    batch.push(update(231, "people", "7", json!({"name": "first"})));
    batch.push(update(232, "people", "7", json!({"name": "second"})));
    let results = f.sink.apply(batch).await;
    results.iter().for_each(|r| _ = ok(r));
    assert_eq!(
        rows(&db, "SELECT name FROM people WHERE id IN (1, 7, 30, 31) ORDER BY id").await,
        vec![text(&["u1"]), text(&["second"]), text(&["u30"]), text(&["n31"])]
    );
    // The 30 in one statement; the two of key 7 each start a run of their own.
    assert_eq!(counted(&db).await, ["people UPDATE 3"]);
    reset(&db).await;

    // A run with an update of a row that is not there.
    let batch: Vec<Write> = (1..=6)
        .map(|i| {
            let id = if i == 5 { 999 } else { i };
            update(240 + i, "people", &id.to_string(), json!({"name": format!("v{i}")}))
        })
        .collect();
    let results = f.sink.apply(batch).await;
    for (i, result) in results.iter().enumerate() {
        if i == 4 {
            let gone = err(result);
            assert_eq!((gone.class, gone.kind), (ErrorClass::Permanent, "not_found"), "{gone}");
        } else {
            ok(result);
        }
    }
    assert_eq!(
        rows(&db, "SELECT name FROM people WHERE id IN (1, 6) ORDER BY id").await,
        vec![text(&["v1"]), text(&["v6"])]
    );
    assert!(rows(&db, "SELECT 1 FROM people WHERE id = 999").await.is_empty());

    // A run with two spellings of one key: `07` is key 7 to the server, not to the
    // run's split. Both land, in order, as row by row.
    let batch: Vec<Write> = (1..=12)
        .map(|i| {
            let id = if i == 9 { "07".to_string() } else { i.to_string() };
            update(250 + i, "people", &id, json!({"name": format!("w{i}")}))
        })
        .collect();
    let results = f.sink.apply(batch).await;
    results.iter().for_each(|r| _ = ok(r));
    assert_eq!(
        rows(&db, "SELECT name FROM people WHERE id IN (1, 7, 12) ORDER BY id").await,
        vec![text(&["w1"]), text(&["w9"]), text(&["w12"])]
    );
    reset(&db).await;

    // Two creates of one key in two spellings: the second upsert wins, as row by row.
    let results = f
        .sink
        .apply(vec![
            create(
                270,
                "people",
                json!({"id": "41", "name": "a41", "email": "a41@example.com"}),
            ),
            create(
                271,
                "people",
                json!({"id": "041", "name": "b41", "email": "b41@example.com"}),
            ),
        ])
        .await;
    results.iter().for_each(|r| _ = ok(r));
    assert_eq!(
        rows(&db, "SELECT name, email FROM people WHERE id = 41").await,
        vec![text(&["b41", "b41@example.com"])]
    );
    db.execute("DELETE FROM people WHERE id = 41").await;
    reset(&db).await;

    // A run with one row refused by a unique key: that row alone fails.
    let batch: Vec<Write> = (1..=10)
        .map(|i| {
            let email = if i == 4 {
                "p40@example.com".to_string()
            } else {
                format!("new{i}@example.com")
            };
            update(300 + i, "people", &i.to_string(), json!({"email": email}))
        })
        .collect();
    let results = f.sink.apply(batch).await;
    for (i, result) in results.iter().enumerate() {
        if i == 3 {
            let refused = err(result);
            assert_eq!(
                (refused.class, refused.kind),
                (ErrorClass::Permanent, "integrity"),
                "{refused}"
            );
        } else {
            ok(result);
        }
    }
    assert_eq!(
        rows(&db, "SELECT email FROM people WHERE id IN (3, 4, 5) ORDER BY id").await,
        vec![
            text(&["new3@example.com"]),
            text(&["p4@example.com"]),
            text(&["new5@example.com"])
        ]
    );
    reset(&db).await;

    // 20 deletes, one of a row already gone.
    let batch: Vec<Write> = (21..=40)
        .chain([777])
        .map(|i| delete(400 + i, "people", &i.to_string()))
        .collect();
    let results = f.sink.apply(batch).await;
    let ids: Vec<String> = results.iter().map(|r| ok(r).local_id.clone()).collect();
    assert_eq!(ids, (21..=40).chain([777]).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(
        rows(&db, "SELECT count(*)::text FROM people").await,
        vec![text(&["20"])]
    );
    assert_eq!(counted(&db).await, ["people DELETE 1"]);
}
