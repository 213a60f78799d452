//! The fleet journal: one PostgreSQL database shared by every replica (`[fleet]`, see docs/fleet.md).
//!
//! Each replica still acknowledges into its own SQLite journal (the local outbox, invariant 1 needs no network);
//! a forwarder ships committed records here. This module holds all of the fleet's SQL, as `journal/` holds all
//! of SQLite's: the pool, the schema ([`schema`]) and one typed method per operation, each one transaction.
//!
//! Fleet invariants (on top of the journal's, see `journal/mod.rs`):
//!
//! - F1. A record is counted once fleet-wide: `records.idem_key` is the primary key and a forward is
//!   `INSERT ... ON CONFLICT DO NOTHING`; only a record actually inserted adds to `hourly_totals`.
//! - F2. A key is frozen, billed and given its body in one transaction, once, whichever replica does it
//!   (`outbound_events` is unique per key; the freeze takes its totals `FOR UPDATE`).
//! - F3. Hour H is frozen only when every replica with a live heartbeat has forwarded past `H + 1h`, or when
//!   `fleet.max_wait` has passed since `H + 1h + emit.grace`; and never by a replica clock that is ahead of the
//!   database clock (a freeze judges hours at the earlier of the two, [`freeze::judged_at`]).
//! - F4. One sender per event: a claim sets `lease_owner`, `lease_until` (database clock) and increments
//!   `fence`; a settle applies only while owner and fence still match (a stale owner's settle changes nothing).
//!   No session advisory locks anywhere.
//! - F5. Retention ([`retention`]) deletes only settled hours past `journal.retention` (their sums kept in
//!   `usage_months` and `retired_overage`), and a raw record only once no replica can still forward a duplicate
//!   of it from inside `ingest.dedupe_window`.

pub mod alerts;
pub mod billing;
pub mod conn;
pub mod dashboard;
pub mod freeze;
mod ops;
pub mod outbound;
pub mod reads;
pub mod records;
pub mod replicas;
pub mod retention;
pub mod schema;

pub use ops::{FencedAnswers, FleetPassStart};

use crate::secret::Secret;

/// What can go wrong with the fleet journal. Messages never include the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL could not be parsed.
    #[error(
        "the fleet PostgreSQL URL is not valid ({0}); set [fleet] url_file or METERD_FLEET__URL to a postgres:// URL"
    )]
    BadUrl(String),
    /// PostgreSQL could not be reached or refused the session.
    #[error("the fleet PostgreSQL journal is unavailable: {0}")]
    Unavailable(String),
    /// A statement failed.
    #[error("the fleet PostgreSQL journal failed: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// A rule of the data was broken (an overflow, a missing row).
    #[error("{0}")]
    Invalid(String),
}

impl PgError {
    /// True for a transaction PostgreSQL aborted to resolve a conflict (deadlock, serialization failure): running
    /// it again is safe (it was rolled back) and usually succeeds.
    pub fn is_conflict(&self) -> bool {
        match self {
            PgError::Db(e) => e.code().is_some_and(|c| {
                *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                    || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            }),
            _ => false,
        }
    }
}

/// A tokio-postgres error with what the server said (its own `Display` says only "db error") and the cause
/// chain (a TLS or I/O failure). Never the URL: neither the server nor tokio-postgres echoes it.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => PgError::Unavailable(describe(&e)),
            other => PgError::Unavailable(other.to_string()),
        }
    }
}

/// The shared journal: a connection pool to the fleet's PostgreSQL database.
#[derive(Clone)]
pub struct PgJournal {
    pool: deadpool_postgres::Pool,
    /// What the forward path remembers between batches (`records.rs`), shared by the clones of this pool.
    forward_cache: std::sync::Arc<records::ForwardCache>,
}

impl std::fmt::Debug for PgJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgJournal").finish_non_exhaustive()
    }
}

impl PgJournal {
    /// A pool to `url` (at most `max_size` connections), over TLS as its `sslmode` says (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`; rustls with ring, see [`conn`]). Connects lazily;
    /// [`PgJournal::migrate`] is the first round trip. Waiting for a connection is bounded (15 s), so an
    /// unreachable server answers with an error instead of hanging the caller.
    pub fn connect(url: &Secret, max_size: usize) -> Result<PgJournal, PgError> {
        let target = conn::parse(url.expose())?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(conn::tls_config(&target)?);
        let manager = deadpool_postgres::Manager::from_config(
            target.config,
            tls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let bound = Some(std::time::Duration::from_secs(15));
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(bound)
            .create_timeout(bound)
            .recycle_timeout(bound)
            .build()
            .map_err(|e| PgError::Unavailable(e.to_string()))?;
        Ok(PgJournal {
            pool,
            forward_cache: Default::default(),
        })
    }

    /// Applies the schema migrations (safe when several replicas start at once); returns the version.
    pub async fn migrate(&self) -> Result<i64, PgError> {
        let mut client = self.pool.get().await?;
        Ok(schema::migrate(&mut client).await?)
    }

    /// A connection from the pool (for the operations in this module's files).
    pub async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        Ok(self.pool.get().await?)
    }
}

/// Test support: a fresh database per test on the server named by `METERD_TEST_POSTGRES_URL`, dropped at the
/// end. Used by the fleet tests in `tests/` and by unit tests here; not part of meterd's behaviour.
pub mod testing {
    use super::*;

    /// The environment variable naming the test server (set by `.ci/run`).
    pub const URL_VAR: &str = "METERD_TEST_POSTGRES_URL";

    /// A database created for one test; dropped (with `FORCE`) when this is dropped.
    pub struct TestDb {
        admin_url: String,
        name: String,
        /// The URL of the new database.
        pub url: Secret,
    }

    impl TestDb {
        /// A new empty database, or `None` (after printing why) when `METERD_TEST_POSTGRES_URL` is unset.
        pub fn create(test: &str) -> Option<TestDb> {
            let Ok(admin_url) = std::env::var(URL_VAR) else {
                // Written to the process's stderr itself, not with `eprintln!`, which the test harness captures
                // and shows only for a failing test: a plain `cargo test` shows which tests were skipped, and why.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped {test}: {URL_VAR} is not set (CI sets it; see docs/development.md)"
                );
                return None;
            };
            let name = format!(
                "meterd_test_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            <tokio_postgres::Config as std::str::FromStr>::from_str(&admin_url)
                .unwrap_or_else(|e| panic!("{URL_VAR} is not a valid URL: {e}"));
            run_admin(&admin_url, &format!("CREATE DATABASE {name}"));
            let url = with_dbname(&admin_url, &name);
            Some(TestDb {
                admin_url,
                name,
                url: Secret::new(url),
            })
        }

        /// The database's name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// The server's TCP address (`host:port`) and user from `METERD_TEST_POSTGRES_URL`, for a test that puts
        /// a proxy in front of it (a Unix-socket host is not a TCP address: the local default is used then).
        pub fn server(&self) -> (String, String) {
            let cfg = <tokio_postgres::Config as std::str::FromStr>::from_str(&self.admin_url)
                .unwrap_or_else(|e| panic!("{URL_VAR} is not a valid URL: {e}"));
            let host = cfg
                .get_hosts()
                .iter()
                .find_map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "127.0.0.1".into());
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            let user = cfg.get_user().unwrap_or("postgres").to_string();
            (format!("{host}:{port}"), user)
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            run_admin(
                &self.admin_url,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            );
        }
    }

    /// `url` with its database replaced by `name` (URL form `postgres://.../db?params` or key=value form).
    pub fn with_dbname(url: &str, name: &str) -> String {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (base, query) = match url.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (url, None),
            };
            let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
            let base = match base[scheme_end..].find('/') {
                Some(i) => &base[..scheme_end + i],
                None => base,
            };
            match query {
                Some(q) => format!("{base}/{name}?{q}"),
                None => format!("{base}/{name}"),
            }
        } else {
            format!("{url} dbname={name}")
        }
    }

    fn run_admin(url: &str, sql: &str) {
        let url = url.to_string();
        let sql = sql.to_string();
        // Its own thread and runtime: callable from sync tests, async tests and `Drop`.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach {URL_VAR}: {e}"));
                tokio::spawn(conn);
                client
                    .batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            })
        })
        .join()
        .expect("admin thread");
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn dbname_is_replaced_in_both_url_forms() {
            assert_eq!(
                with_dbname("postgres://u@127.0.0.1:5432/test?sslmode=disable", "x"),
                "postgres://u@127.0.0.1:5432/x?sslmode=disable"
            );
            assert_eq!(
                with_dbname("postgres://127.0.0.1", "x"),
                "postgres://127.0.0.1/x"
            );
            assert_eq!(with_dbname("host=h user=u", "x"), "host=h user=u dbname=x");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TestDb;
    use super::*;

    /// Without `METERD_TEST_POSTGRES_URL` a PostgreSQL test passes and says, in a plain `cargo test` (whose
    /// harness captures `println!` and `eprintln!` of passing tests), that it was skipped and why. Runs this
    /// test binary again for one such test, with the variable removed, and reads what it wrote.
    #[test]
    fn a_skipped_postgres_test_says_so_in_a_plain_cargo_test() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "journal::pg::tests::migrations_racing_apply_each_step_once",
            ])
            .env_remove(testing::URL_VAR)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(
                "skipped migrations_racing_apply_each_step_once: METERD_TEST_POSTGRES_URL is not set"
            ),
            "stderr: {said}\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{out:?}"
        );
    }

    /// Eight replicas migrating one empty database at once each end at the current version, and every step ran
    /// once (a second run would fail on `CREATE TABLE`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn migrations_racing_apply_each_step_once() {
        let Some(db) = TestDb::create("migrations_racing_apply_each_step_once") else {
            return;
        };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let url = db.url.clone();
            tasks.push(tokio::spawn(async move {
                let j = PgJournal::connect(&url, 2).unwrap();
                j.migrate().await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), schema::current_version());
        }
        let j = PgJournal::connect(&db.url, 1).unwrap();
        let c = j.client().await.unwrap();
        let v: i64 = c
            .query_one("SELECT version FROM meterd_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, schema::current_version());
    }
}
