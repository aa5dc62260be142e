//! Signals ([`docket_store::signals`]) against SQLite (in memory and on a
//! file) and PostgreSQL (with `DOCKET_TEST_POSTGRES_URL`; each test in a
//! fresh schema `t_<uuid>`, swept by the main PostgreSQL suite; with
//! `CI` set and no URL the PostgreSQL tests fail instead of skipping).

mod memory {
    docket_store::signal_conformance_tests!(std::sync::Arc::new(
        docket_store::sqlite::SqliteStore::open_in_memory().unwrap()
    ));
}

mod file {
    fn fresh() -> docket_store::DynStore {
        let dir = std::env::temp_dir().join(format!("docket-signals-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        std::sync::Arc::new(
            docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
        )
    }
    docket_store::signal_conformance_tests!(fresh());
}

#[cfg(feature = "postgres")]
mod postgres {
    async fn fresh() -> Option<docket_store::DynStore> {
        let url = match std::env::var("DOCKET_TEST_POSTGRES_URL") {
            Ok(u) if !u.trim().is_empty() => u,
            _ => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI is set but DOCKET_TEST_POSTGRES_URL is not: the PostgreSQL signal tests must run"
                );
                eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
                return None;
            }
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let store = docket_store::postgres::PgStore::connect_with(&url, &schema)
            .await
            .expect("connect to the test database");
        Some(std::sync::Arc::new(store))
    }
    docket_store::signal_conformance_tests!(optional: fresh().await);
}
