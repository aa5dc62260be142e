//! The conformance suite against SQLite (in memory, and on a file).

mod memory {
    docket_store::conformance_tests!(std::sync::Arc::new(
        docket_store::sqlite::SqliteStore::open_in_memory().unwrap()
    ));
}

mod file {
    fn fresh() -> docket_store::DynStore {
        let dir = std::env::temp_dir().join(format!("docket-conf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        std::sync::Arc::new(
            docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
        )
    }
    docket_store::conformance_tests!(fresh());
}

/// A database written by a newer Docket is refused with a clear error and
/// left exactly as it was.
#[test]
fn newer_schema_is_refused_and_not_modified() {
    let dir = std::env::temp_dir().join(format!("docket-schema-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap();
    drop(docket_store::sqlite::SqliteStore::open(p).unwrap());
    {
        let c = rusqlite::Connection::open(p).unwrap();
        c.execute(
            "UPDATE docket_meta SET value = '999' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        c.execute("DROP INDEX runs_claim", []).unwrap();
    }
    let err = docket_store::sqlite::SqliteStore::open(p).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "database schema version 999 is newer than this Docket supports ({}); upgrade Docket, the database was not modified",
            docket_store::SCHEMA_VERSION
        )
    );
    let c = rusqlite::Connection::open(p).unwrap();
    let v: String = c
        .query_row(
            "SELECT value FROM docket_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, "999");
    let idx: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'runs_claim'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(idx, 0, "the refused open must not re-create anything");
}
