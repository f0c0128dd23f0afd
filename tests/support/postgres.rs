//! A fresh PostgreSQL database for one test, dropped when the guard goes out of scope —
//! also when the test panics. Shared by the test binaries through `#[path]`.
//!
//! The server is `SWITCHBOARD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, trust auth).

use sqlx::Connection;

/// The admin URL the test databases are created through.
pub fn admin_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A uniquely named database; `url` connects to it.
pub struct TestDatabase {
    admin: String,
    name: String,
    /// Connection URL of the database.
    pub url: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<ulid>`. Panics with a clear message when PostgreSQL is not running.
    pub async fn create(prefix: &str) -> Self {
        let admin = admin_url();
        let name = format!("{prefix}_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let mut conn = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL must be running for these tests ({admin}): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin).expect("admin URL");
        url.set_path(&name);
        TestDatabase {
            admin,
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::postgres::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}
