//! The PostgreSQL sink against a real cluster started by the test harness: batched
//! upserts and deletes, exact round trips of every common type, quoted identifiers,
//! optimistic concurrency with a version column, per-row failures, error classes.

mod support;

use support::pg::PgCluster;

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
