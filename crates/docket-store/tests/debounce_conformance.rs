//! Debounced triggers ([`docket_store::debounce_conformance`]) against
//! SQLite (in memory: one store used twice; on a file: two stores on one
//! file, as two processes would open it) and PostgreSQL (with
//! `DOCKET_TEST_POSTGRES_URL`: two stores on one fresh schema `t_<uuid>`,
//! swept by the main PostgreSQL suite; with `CI` set and no URL the
//! PostgreSQL tests fail instead of skipping).

mod memory {
    fn pair() -> docket_store::debounce_conformance::Pair {
        let s: docket_store::DynStore =
            std::sync::Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
        (s.clone(), s)
    }
    docket_store::debounce_conformance_tests!(pair());
}

mod file {
    fn pair() -> docket_store::debounce_conformance::Pair {
        let dir = std::env::temp_dir().join(format!("docket-debounce-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        let path = path.to_str().unwrap();
        let one = docket_store::sqlite::SqliteStore::open(path).unwrap();
        let two = docket_store::sqlite::SqliteStore::open(path).unwrap();
        (std::sync::Arc::new(one), std::sync::Arc::new(two))
    }
    docket_store::debounce_conformance_tests!(pair());
}

#[cfg(feature = "postgres")]
mod postgres {
    async fn pair() -> Option<docket_store::debounce_conformance::Pair> {
        let url = match std::env::var("DOCKET_TEST_POSTGRES_URL") {
            Ok(u) if !u.trim().is_empty() => u,
            _ => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI is set but DOCKET_TEST_POSTGRES_URL is not: the PostgreSQL debounce tests must run"
                );
                eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
                return None;
            }
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let one = docket_store::postgres::PgStore::connect_with(&url, &schema)
            .await
            .expect("connect to the test database");
        let two = docket_store::postgres::PgStore::connect_with(&url, &schema)
            .await
            .expect("connect a second store to the test schema");
        Some((std::sync::Arc::new(one), std::sync::Arc::new(two)))
    }
    docket_store::debounce_conformance_tests!(optional: pair().await);
}
