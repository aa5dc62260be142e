//! Child runs ([`docket_store::children`]) against SQLite (in memory and on
//! a file) and PostgreSQL (with `DOCKET_TEST_POSTGRES_URL`; each test in a
//! fresh schema `t_<uuid>`, swept by the main PostgreSQL suite; with
//! `CI=true` a missing URL fails instead of skipping).

mod memory {
    docket_store::children_conformance_tests!(std::sync::Arc::new(
        docket_store::sqlite::SqliteStore::open_in_memory().unwrap()
    ));
    // One writer thread: the racing calls are serialised by it.
    docket_store::children_conformance_tests!(race: {
        let store: docket_store::DynStore =
            std::sync::Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
        Some((store.clone(), store))
    });
}

mod file {
    fn fresh() -> docket_store::DynStore {
        let dir = std::env::temp_dir().join(format!("docket-children-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        std::sync::Arc::new(
            docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
        )
    }
    docket_store::children_conformance_tests!(fresh());
    // Two stores on one file: two writer threads, serialised by SQLite's
    // database lock (`BEGIN IMMEDIATE`), which has no lock order to get wrong.
    docket_store::children_conformance_tests!(race: {
        let dir = std::env::temp_dir().join(format!("docket-children-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        let open = || -> docket_store::DynStore {
            std::sync::Arc::new(
                docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
            )
        };
        let a = open();
        Some((a, open()))
    });
}

#[cfg(feature = "postgres")]
mod postgres {
    async fn fresh() -> Option<docket_store::DynStore> {
        let (url, schema) = fresh_schema().await?;
        let store = docket_store::postgres::PgStore::connect_with(&url, &schema)
            .await
            .expect("connect to the test database");
        Some(std::sync::Arc::new(store))
    }

    /// The test database's URL and a fresh schema name, or `None` to skip.
    async fn fresh_schema() -> Option<(String, String)> {
        let url = match std::env::var("DOCKET_TEST_POSTGRES_URL") {
            Ok(u) if !u.trim().is_empty() => u,
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true: DOCKET_TEST_POSTGRES_URL must be set"
                );
                eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
                return None;
            }
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        Some((url, schema))
    }
    docket_store::children_conformance_tests!(optional: fresh().await);
    // Two stores (two pools) on one schema.
    docket_store::children_conformance_tests!(race: {
        match fresh_schema().await {
            Some((url, schema)) => {
                let a = docket_store::postgres::PgStore::connect_with(&url, &schema).await.unwrap();
                let b = docket_store::postgres::PgStore::connect_with(&url, &schema).await.unwrap();
                let (a, b): (docket_store::DynStore, docket_store::DynStore) =
                    (std::sync::Arc::new(a), std::sync::Arc::new(b));
                Some((a, b))
            }
            None => None,
        }
    });
}
