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
