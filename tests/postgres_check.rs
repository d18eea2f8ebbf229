//! `concord check` against real PostgreSQL clusters: every setup problem of a postgres
//! system is reported with its path and the SQL that fixes it, and exits 2; a correct
//! setup exits 0; `--offline` connects to nothing. And the password such a system
//! connects with never shows in a running daemon's log, status or metrics.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::pg::{ClusterOptions, PgCluster, Role, TestDb, contact_link_toml};

/// Writes a configuration with one postgres system `app` (both directions) and one link
/// of entity `contact` on `public.contacts`, with `extra` lines added to the system.
fn write_config(dir: &Path, db: &TestDb<'_>, role: &Role, extra: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
[state]
dir = "state"

[systems.app]
type = "postgres"
{system}slot = "{slot}"
{extra}

[entities.contact]
schema = "{schema}"
match_keys = ["email"]

{link}"#,
        system = db.system_toml(role, dir),
        // Slots are cluster-wide: one name per database.
        slot = db.name,
        schema = root.join("schemas/contact.schema.json").display(),
        link = contact_link_toml(
            "app",
            "contacts",
            Some(1),
            r#"map = [
  { canonical = "email", system = "email" },
  { canonical = "first_name", system = "first_name" },
]"#,
        ),
    );
    let path = dir.join("concord.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &Path, offline: bool) -> Output {
    let mut cmd = support::concord(&["check", "--config"]);
    cmd.arg(config);
    if offline {
        cmd.arg("--offline");
    }
    cmd.output().expect("concord check runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TABLE: &str = "CREATE TABLE contacts (id int PRIMARY KEY, email text NOT NULL, first_name text);";

/// Creates the contacts table and the `concord` publication of it.
async fn publish_table(db: &TestDb<'_>) {
    db.execute(&format!("{TABLE} CREATE PUBLICATION concord FOR TABLE contacts;"))
        .await;
}

/// Writes the configuration of [`write_config`] for `role` into a new directory and
/// checks it online; returns the directory, the configuration's path and the outcome.
fn write_and_check(db: &TestDb<'_>, role: &Role, extra: &str) -> (tempfile::TempDir, PathBuf, Output) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), db, role, extra);
    let out = check(&config, false);
    (dir, config, out)
}

/// A role with REPLICATION and exactly the grants a capturing and writing link needs.
async fn good_role(db: &TestDb<'_>) -> Role {
    let role = db.create_role("concord", "REPLICATION").await;
    db.execute(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON contacts TO {}",
        role.name
    ))
    .await;
    role
}

#[tokio::test]
async fn a_correct_setup_passes() {
    let db = PgCluster::shared().fresh_db().await;
    publish_table(&db).await;
    let role = good_role(&db).await;
    let (_dir, _config, out) = write_and_check(&db, &role, "");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no findings, not even warnings");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_the_fix() {
    let cluster = PgCluster::start(ClusterOptions {
        wal_level: "replica",
        ..ClusterOptions::default()
    });
    let db = cluster.fresh_db().await;
    publish_table(&db).await;
    let role = good_role(&db).await;
    let (_dir, config, out) = write_and_check(&db, &role, "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.lines().any(|l| l
            == "systems.app: wal_level is \"replica\", logical replication needs \"logical\": ALTER SYSTEM SET \
                wal_level = logical; and restart the server"),
        "{err}"
    );
    // Offline, the same configuration is valid.
    let out = check(&config, true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn missing_rights_are_listed_with_their_grants() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(TABLE).await;
    let role = db.create_role("weak", "").await;
    db.execute(&format!("GRANT SELECT, TRUNCATE ON contacts TO {}", role.name))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &db,
        &role,
        "create_publication = false\ncreate_slot = false",
    );
    let out = check(&config, false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let r = &role.name;
    let slot = &db.name;
    for expected in [
        format!(
            "systems.app: role \"{r}\" lacks REPLICATION, which capture needs: ALTER ROLE \"{r}\" WITH REPLICATION;"
        ),
        format!(
            "links[0].object: role \"{r}\" lacks INSERT, UPDATE, DELETE on public.contacts: GRANT INSERT, UPDATE, \
             DELETE ON \"public\".\"contacts\" TO \"{r}\";"
        ),
        format!(
            "warning: links[0].object: role \"{r}\" holds TRUNCATE on public.contacts, which concord does not need: \
             REVOKE TRUNCATE ON \"public\".\"contacts\" FROM \"{r}\";"
        ),
        "systems.app.publication: publication \"concord\" does not exist and create_publication is false: CREATE \
         PUBLICATION \"concord\" FOR TABLE \"public\".\"contacts\" WITH (publish_via_partition_root = true);"
            .to_string(),
        format!(
            "systems.app.slot: replication slot \"{slot}_contact\" does not exist and create_slot is false: set \
             create_slot = true (concord creates it with the snapshot it copies), or SELECT \
             pg_create_logical_replication_slot('{slot}_contact', 'pgoutput');"
        ),
    ] {
        assert!(
            err.lines().any(|l| l == expected),
            "missing line:\n{expected}\nin:\n{err}"
        );
    }

    // With the default create_publication, a role that owns nothing cannot create it.
    let config_path = config_with_defaults(dir.path(), &db, &role);
    let err = stderr(&check(&config_path, false));
    assert!(
        err.contains("systems.app.publication: publication \"concord\" does not exist and role")
            && err.contains("may not create it"),
        "{err}"
    );
}

fn config_with_defaults(dir: &Path, db: &TestDb<'_>, role: &Role) -> PathBuf {
    write_config(dir, db, role, "")
}

#[tokio::test]
async fn unsuitable_replica_identities_are_refused() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(&format!(
        "{TABLE} ALTER TABLE contacts REPLICA IDENTITY NOTHING; CREATE PUBLICATION concord FOR TABLE contacts;"
    ))
    .await;
    let role = good_role(&db).await;
    let (_dir, config, out) = write_and_check(&db, &role, "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let expected = "links[0].object: table public.contacts: replica identity is NOTHING, so updates and deletes are \
                    not captured: ALTER TABLE \"public\".\"contacts\" REPLICA IDENTITY FULL; (or add a primary key, \
                    or REPLICA IDENTITY USING INDEX <a unique index on NOT NULL columns>)";
    assert!(stderr(&out).lines().any(|l| l == expected), "{}", stderr(&out));

    // The fix it names works.
    db.execute("ALTER TABLE contacts REPLICA IDENTITY FULL").await;
    let out = check(&config, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A partitioned table is checked partition by partition.
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE contacts (id int, email text NOT NULL, first_name text) PARTITION BY RANGE (id);
         CREATE TABLE contacts_low PARTITION OF contacts FOR VALUES FROM (0) TO (100);
         CREATE TABLE contacts_high PARTITION OF contacts FOR VALUES FROM (100) TO (200);
         CREATE UNIQUE INDEX ON contacts_low (id);
         CREATE UNIQUE INDEX ON contacts_high (id);
         CREATE PUBLICATION concord FOR TABLE contacts;",
    )
    .await;
    let role = db.create_role("concord", "REPLICATION").await;
    db.execute(&format!("GRANT SELECT ON contacts TO {}", role.name)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &role, "direction = \"read\"");
    let err = stderr(&check(&config, false));
    assert!(
        err.lines().any(|l| l
            == "links[0].object: table public.contacts is partitioned and publication \"concord\" publishes its \
                changes under the partitions' names: ALTER PUBLICATION \"concord\" SET (publish_via_partition_root \
                = true);"),
        "{err}"
    );
    for partition in ["contacts_low", "contacts_high"] {
        assert!(
            err.contains(&format!(
                "links[0].object: partition {partition} of public.contacts: replica identity is DEFAULT but the \
                 table has no primary key"
            )),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_written_table_needs_a_unique_key_and_a_wrong_password_is_reported() {
    let db = PgCluster::shared().fresh_db().await;
    db.execute(
        "CREATE TABLE contacts (id int, email text NOT NULL, first_name text);
         ALTER TABLE contacts REPLICA IDENTITY FULL;
         CREATE PUBLICATION concord FOR TABLE contacts;",
    )
    .await;
    let role = good_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &role, "");
    let err = stderr(&check(&config, false));
    assert!(
        err.lines().any(|l| l
            == "links[0].object: id_field \"id\" of public.contacts has no primary key or unique index of its own, \
                which the upsert needs: ALTER TABLE \"public\".\"contacts\" ADD PRIMARY KEY (\"id\");"),
        "{err}"
    );

    std::fs::write(dir.path().join(format!("{}.password", role.name)), "wrong").unwrap();
    let out = check(&config, false);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "systems.app: cannot connect as \"{}\": connect: auth error (sqlstate 28P01)",
            role.name
        )),
        "{err}"
    );
    assert!(!err.contains("wrong"), "the password is not echoed: {err}");
}

#[tokio::test]
async fn a_superuser_works_with_a_warning() {
    let db = PgCluster::shared().fresh_db().await;
    publish_table(&db).await;
    let superuser = Role {
        name: support::pg::SUPERUSER.into(),
        password: support::pg::SUPERUSER_PASSWORD.into(),
    };
    let (_dir, _config, out) = write_and_check(&db, &superuser, "");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "warning: systems.app: role \"{}\" is a superuser; concord needs only REPLICATION",
            support::pg::SUPERUSER
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn an_existing_slot_must_be_a_pgoutput_slot_of_this_database() {
    let db = PgCluster::shared().fresh_db().await;
    publish_table(&db).await;
    let role = good_role(&db).await;
    let slot = format!("{}_contact", db.name);
    db.execute(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding')"
    ))
    .await;
    let (_dir, config, out) = write_and_check(&db, &role, "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let expected = format!(
        "systems.app.slot: replication slot \"{slot}\" is not a logical pgoutput slot (logical, test_decoding): drop \
         it (SELECT pg_drop_replication_slot('{slot}');) or choose another slot name"
    );
    assert!(stderr(&out).lines().any(|l| l == expected), "{}", stderr(&out));

    db.execute(&format!(
        "SELECT pg_drop_replication_slot('{slot}'); SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
    ))
    .await;
    let out = check(&config, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    db.execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).await;
}

/// A slot the server invalidated (`max_slot_wal_keep_size` exceeded while concord was
/// away) is an error whose fix is a re-snapshot; with `resnapshot_on_slot_loss` on, the
/// link will do that itself, and the finding is a warning.
#[tokio::test]
async fn an_invalidated_slot_is_reported_with_the_resnapshot_fix() {
    let cluster = PgCluster::start(ClusterOptions {
        extra_conf: vec!["max_slot_wal_keep_size = 1MB".into(), "wal_keep_size = 0".into()],
        ..ClusterOptions::default()
    });
    let db = cluster.fresh_db().await;
    db.execute(&format!(
        "{TABLE} CREATE PUBLICATION concord FOR TABLE contacts; CREATE TABLE filler (pad text);"
    ))
    .await;
    let role = good_role(&db).await;
    let slot = format!("{}_contact", db.name);
    let admin = db.admin().await;
    // A slot that reserves WAL from now on, as one concord created and then left.
    admin
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
        ))
        .await
        .expect("slot created");
    db.write_wal_until_slot_lost(&slot, |_| {
        "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 1000);
         SELECT pg_switch_wal(); CHECKPOINT;"
            .to_string()
    })
    .await;

    let (dir, _config, out) = write_and_check(&db, &role, "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let expected = format!(
        "systems.app.slot: replication slot \"{slot}\" was invalidated (the server removed WAL it needed, see \
         max_slot_wal_keep_size): the changes since concord's checkpoint are lost: re-snapshot the link: set \
         resnapshot_on_slot_loss = true on systems.app and start concord (it drops the slot, creates a new one and \
         reads the table again; rows deleted in the gap stay in concord), or, for a link that never ran, drop it \
         (SELECT pg_drop_replication_slot('{slot}');)"
    );
    assert!(stderr(&out).lines().any(|l| l == expected), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).lines().filter(|l| !l.starts_with("warning")).count(),
        2,
        "one problem and the count: {}",
        stderr(&out)
    );

    let config = write_config(dir.path(), &db, &role, "resnapshot_on_slot_loss = true");
    let out = check(&config, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let warning = format!(
        "warning: systems.app.slot: replication slot \"{slot}\" was invalidated (the server removed WAL it needed, \
         see max_slot_wal_keep_size): the changes since concord's checkpoint are lost; resnapshot_on_slot_loss is \
         on, so the link drops it, creates a new slot and reads the table again at its start"
    );
    assert_eq!(stderr(&out).trim_end(), warning);
}

/// A daemon syncing from PostgreSQL never shows the role's password: not when the
/// password is wrong (the error is retried and reported), not when it is right, in a
/// debug log, the status or the metrics.
#[tokio::test]
async fn a_running_daemon_never_shows_the_postgres_password() {
    const PASSWORD: &str = "canary-pg-password-7d3f90";
    const WRONG: &str = "canary-pg-wrong-c41a2e";
    let db = PgCluster::shared().fresh_db().await;
    publish_table(&db).await;
    let role = good_role(&db).await;
    db.execute(&format!("ALTER ROLE {} PASSWORD '{PASSWORD}'", role.name))
        .await;
    let role = Role {
        name: role.name.clone(),
        password: PASSWORD.to_string(),
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &role, "");
    let port = support::free_port();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(&config, text).unwrap();
    let password_file = dir.path().join(format!("{}.password", role.name));

    // Runs the daemon with debug logging until `done` accepts the status; returns the
    // log, the last status and the metrics.
    let run = |log_name: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let mut child = support::start_debug_logged(&config, &dir.path().join(log_name));
        let status = support::wait_for("the daemon's status", 60, || {
            let r = support::request(port, "GET", "/api/v1/status")?;
            (r.status == 200 && done(&r.json())).then_some(r.body)
        });
        let metrics = support::get(port, "/metrics").body;
        support::signal(&child, libc::SIGTERM);
        let code = support::wait_for("exit", 30, || child.try_wait().unwrap());
        assert!(code.success(), "exit status {code}");
        let log = std::fs::read_to_string(dir.path().join(log_name)).unwrap();
        (log, status, metrics)
    };

    std::fs::write(&password_file, WRONG).unwrap();
    let refused = run("refused.log", &|s| s.to_string().contains("28P01"));
    assert!(refused.0.contains("28P01"), "the refusal is logged");
    std::fs::write(&password_file, PASSWORD).unwrap();
    db.execute("INSERT INTO contacts VALUES (1, 'ada@example.com', 'Ada')")
        .await;
    let synced = run("synced.log", &|s| s["records"] == 1);
    assert!(synced.0.contains("DEBUG"), "the daemon logged at debug level");

    for (what, (log, status, metrics)) in [("refused", &refused), ("synced", &synced)] {
        for canary in [PASSWORD, WRONG] {
            assert!(!log.contains(canary), "the {what} run's log shows {canary:?}");
            assert!(!status.contains(canary), "the {what} run's status shows {canary:?}");
            assert!(!metrics.contains(canary), "the {what} run's metrics show {canary:?}");
        }
    }
}
