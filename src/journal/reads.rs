//! The shared reads' face: `report`, `status`, `balance`, `GET /v1/usage`, `/v1/consumption` and the `/metrics`
//! journal gauges read this, so the routes and commands do not branch on the mode.
//!
//! In single-replica mode ([`Reads::Local`]) every method is the SQLite journal's own read (the same job as
//! before); in fleet mode ([`Reads::Fleet`]) it reads the shared PostgreSQL journal (`journal/pg/reads.rs`), so
//! every replica answers the same, and `status` also lists the replicas.

use super::billing::DimensionBalance;
use super::dashboard::{AtRisk, Bucket, CardPage, Series};
use super::pg::PgJournal;
use super::pg::dashboard as pg_dashboard;
use super::pg::reads::{self as pg_reads, ReplicaLine};
use super::status::JournalStatus;
use super::usage::{CarryRow, HourlyRow, ReportFilter};
use super::{Journal, JournalError};
use crate::config::Settings;
use chrono::{DateTime, Duration, Utc};
use std::sync::Arc;

/// Where the shared reads come from.
#[derive(Clone)]
pub enum Reads {
    /// This replica's SQLite journal (single-replica mode).
    Local(Journal),
    /// The fleet's shared journal.
    Fleet {
        /// The shared journal.
        pg: PgJournal,
        /// `fleet.replica_timeout`: which replicas `status` shows as live.
        replica_timeout: Duration,
    },
}

impl Reads {
    /// The hourly report and the carries for `filter`.
    pub async fn report(
        &self,
        filter: ReportFilter,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Result<(Vec<HourlyRow>, Vec<CarryRow>), JournalError> {
        match self {
            Reads::Local(j) => j.report(filter, now, grace).await,
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok((
                    pg_reads::hourly_report(&**c, &filter, now, grace).await?,
                    pg_reads::carry_report(&**c, &filter).await?,
                ))
            }
        }
    }

    /// The journal's figures at `now`, and in fleet mode the replicas.
    pub async fn status(
        &self,
        now: DateTime<Utc>,
    ) -> Result<(JournalStatus, Option<Vec<ReplicaLine>>), JournalError> {
        match self {
            Reads::Local(j) => Ok((j.status(now).await?, None)),
            Reads::Fleet {
                pg,
                replica_timeout,
            } => {
                let c = pg.client().await?;
                Ok((
                    pg_reads::status(&**c, now).await?,
                    Some(pg_reads::replicas(&**c, now, *replica_timeout).await?),
                ))
            }
        }
    }

    /// Balances of one resource at `now`.
    pub async fn balance(
        &self,
        settings: Arc<Settings>,
        resource: String,
        now: DateTime<Utc>,
    ) -> Result<Vec<DimensionBalance>, JournalError> {
        match self {
            Reads::Local(j) => j.balance(settings, resource, now).await,
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_reads::balance(&**c, &settings, &resource, now).await?)
            }
        }
    }

    /// Consumption of one resource (one dimension, or all) in `[from, to)`: (dimension, micro-units, hours).
    pub async fn consumption(
        &self,
        resource: String,
        dimension: Option<String>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, i64)>, JournalError> {
        match self {
            Reads::Local(j) => j.consumption(resource, dimension, from, to).await,
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_reads::consumption(&**c, &resource, dimension.as_deref(), from, to).await?)
            }
        }
    }

    /// Consumption of one resource grouped by `by` (`GET /v1/consumption?group_by=`): the rows of
    /// `journal::billing::consumption_grouped`. In fleet mode `pool` is refused (no pools there).
    pub async fn consumption_grouped(
        &self,
        resource: String,
        dimension: Option<String>,
        from: i64,
        to: i64,
        by: super::billing::GroupBy,
    ) -> Result<Vec<serde_json::Value>, JournalError> {
        match self {
            Reads::Local(j) => {
                j.consumption_grouped(resource, dimension, from, to, by)
                    .await
            }
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_reads::consumption_grouped(
                    &**c,
                    &resource,
                    dimension.as_deref(),
                    from,
                    to,
                    by,
                )
                .await?)
            }
        }
    }

    /// One page of the dashboard's subscription cards.
    pub async fn dashboard_cards(
        &self,
        settings: Arc<Settings>,
        after: Option<String>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<CardPage, JournalError> {
        match self {
            Reads::Local(j) => j.dashboard_cards(settings, after, limit, now).await,
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_dashboard::cards(&**c, &settings, after.as_deref(), limit, now).await?)
            }
        }
    }

    /// The dashboard's usage series per bucket and outcome group.
    pub async fn dashboard_usage(
        &self,
        resource: String,
        dimension: Option<String>,
        bucket: Bucket,
        from: i64,
        to: i64,
    ) -> Result<Vec<Series>, JournalError> {
        match self {
            Reads::Local(j) => {
                j.dashboard_usage(resource, dimension, bucket, from, to)
                    .await
            }
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(
                    pg_dashboard::usage(&**c, &resource, dimension.as_deref(), bucket, from, to)
                        .await?,
                )
            }
        }
    }

    /// What is at risk (fleet-wide in fleet mode).
    pub async fn dashboard_at_risk(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<AtRisk, JournalError> {
        match self {
            Reads::Local(j) => j.dashboard_at_risk(now, limit).await,
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_dashboard::at_risk(&**c, now, limit).await?)
            }
        }
    }

    /// Accepted quantities per (resource folded, dimension) for hours in `[from, to)` (`meterd reconcile`).
    pub async fn accepted_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<std::collections::BTreeMap<(String, String), i64>, JournalError> {
        match self {
            Reads::Local(j) => {
                j.read(move |c| super::status::accepted_totals(c, from, to))
                    .await
            }
            Reads::Fleet { pg, .. } => {
                let c = pg.client().await?;
                Ok(pg_reads::accepted_totals(&**c, from.timestamp(), to.timestamp()).await?)
            }
        }
    }
}
