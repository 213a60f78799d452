//! The pool face of the journal (one job each): `[[pools]]` journaled at start and every pass, creation and
//! voiding through the API, listings and a customer's balance. Storage is `journal::pools`, balances
//! `journal::billing`.

use super::{Journal, JournalError, billing, pools, usage};
use crate::clock::HOUR;
use crate::config::Settings;
use chrono::{DateTime, Utc};
use rusqlite::Connection;

/// The term of a resource at a time, as billing sees it (`billing::term_for`).
pub(crate) fn term_of<'a>(
    conn: &'a Connection,
    settings: &'a Settings,
) -> impl Fn(&str, i64) -> (i64, i64) + 'a {
    move |resource, t| billing::term_for(conn, settings, resource, t).unwrap_or((t, t + HOUR))
}

/// The pool face: one job each.
impl Journal {
    /// One write job: journals the `[[pools]]` of `settings` (who = `config`) and raises the `pool_expiring`
    /// alerts due at `now`. Run when meterd starts and at every emission pass.
    pub async fn pools_pass(
        &self,
        settings: std::sync::Arc<Settings>,
        now: DateTime<Utc>,
    ) -> Result<(), JournalError> {
        self.write(move |c| {
            pools::sync_config(c, &settings, now)?;
            pools::raise_expiry_alerts(c, &settings, &term_of(c, &settings), now)?;
            Ok(())
        })
        .await
    }

    /// One write job: creates a pool (idempotent by id), journaling `who`.
    pub async fn create_pool(
        &self,
        def: crate::pool_def::PoolDef,
        who: String,
        now: DateTime<Utc>,
    ) -> Result<pools::Created, JournalError> {
        self.write(move |c| pools::create(c, &def, "api", &who, now))
            .await
    }

    /// One write job: voids pool `id`, journaling `who`; `None`: no such pool.
    pub async fn void_pool(
        &self,
        id: String,
        who: String,
        now: DateTime<Utc>,
    ) -> Result<Option<pools::StoredPool>, JournalError> {
        self.write(move |c| pools::void(c, &id, &who, now)).await
    }

    /// One read: the pools of `GET /v1/pools` (see [`list`]).
    pub async fn list_pools(
        &self,
        settings: std::sync::Arc<Settings>,
        resource: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Vec<serde_json::Value>, JournalError> {
        self.read(move |c| {
            let journaled = match resource.as_deref() {
                Some(r) => Some(usage::known_spelling(c, r)?.unwrap_or_else(|| r.to_string())),
                None => None,
            };
            pools::list(
                c,
                &settings,
                &term_of(c, &settings),
                journaled.as_deref(),
                now,
            )
        })
        .await
    }

    /// One read: pool `id` in the form of `GET /v1/pools`.
    pub async fn pool(
        &self,
        settings: std::sync::Arc<Settings>,
        id: String,
        now: DateTime<Utc>,
    ) -> Result<Option<serde_json::Value>, JournalError> {
        self.read(move |c| match pools::get(c, &id)? {
            Some(p) => Ok(Some(pools::pool_json(
                c,
                &term_of(c, &settings),
                &p,
                None,
                now.timestamp(),
            )?)),
            None => Ok(None),
        })
        .await
    }

    /// One read: a customer's (tenant's) pooled balance, see [`billing::customer_balance`].
    pub async fn customer_balance(
        &self,
        settings: std::sync::Arc<Settings>,
        tenant: String,
        now: DateTime<Utc>,
    ) -> Result<serde_json::Value, JournalError> {
        self.read(move |c| billing::customer_balance(c, &settings, &tenant, now))
            .await
    }
}

impl Journal {
    /// One read: consumption grouped by dimension, hour, day, month or pool
    /// ([`billing::consumption_grouped`]).
    pub async fn consumption_grouped(
        &self,
        resource: String,
        dimension: Option<String>,
        from: i64,
        to: i64,
        by: billing::GroupBy,
    ) -> Result<Vec<serde_json::Value>, JournalError> {
        self.read(move |c| {
            billing::consumption_grouped(c, &resource, dimension.as_deref(), from, to, by)
        })
        .await
    }
}
