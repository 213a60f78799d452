//! Subscriptions seen (`subscriptions` table): the last SaaS subscription list, its terms, and when a
//! cancellation was first seen.

use super::JournalError;
use crate::clock::fmt_time;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;

/// What meterd knows of a SaaS subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSubscription {
    /// Subscription id (lower case).
    pub id: String,
    /// `Subscribed`, `Suspended`, ...
    pub status: String,
    /// Current plan (`None`: the list named none; stored as `''`).
    pub plan: Option<String>,
    /// When meterd first saw it `Unsubscribed`, unix seconds.
    pub unsubscribed_seen_at: Option<i64>,
    /// Term start, unix seconds.
    pub term_start: Option<i64>,
    /// Term end, unix seconds.
    pub term_end: Option<i64>,
}

/// A subscription as listed by the marketplace.
#[derive(Debug, Clone)]
pub struct ListedSubscription {
    /// Id.
    pub id: String,
    /// Status, trimmed.
    pub status: String,
    /// Plan id (`None`: the list named none; stored as `''`).
    pub plan: Option<String>,
    /// Offer id.
    pub offer: String,
    /// Term start.
    pub term_start: Option<i64>,
    /// Term end.
    pub term_end: Option<i64>,
    /// Term unit.
    pub term_unit: Option<String>,
    /// The customer (`beneficiary.tenantId`), if listed.
    pub tenant: Option<String>,
}

/// A subscription's term as stored: start, end (unix seconds) and unit.
type StoredTerm = (Option<i64>, Option<i64>, Option<String>);

/// The term to store for a listed subscription, so that the allowance never resets mid-term:
///
/// - listed without a term (or without its start or a known unit), it keeps the term meterd knew, instead of
///   falling back to `billing.fallback_term` (another term);
/// - listed with a term that starts later (a renewal into another term unit, announced before it begins), it
///   keeps the running term until then: rolling the new term back from its future start would put the running
///   hours into another term.
fn term_to_store(
    conn: &Connection,
    id: &str,
    listed: &ListedSubscription,
    now: DateTime<Utc>,
) -> Result<StoredTerm, JournalError> {
    let as_listed = (listed.term_start, listed.term_end, listed.term_unit.clone());
    let unit_known = listed
        .term_unit
        .as_deref()
        .is_some_and(|u| crate::bill::months_of(u).is_some());
    let starts_later = listed.term_start.is_some_and(|s| s > now.timestamp());
    if listed.term_start.is_some() && unit_known && !starts_later {
        return Ok(as_listed);
    }
    let known: Option<StoredTerm> = conn
        .prepare_cached("SELECT term_start, term_end, term_unit FROM subscriptions WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match known {
        Some(k @ (Some(start), _, Some(_))) if start <= now.timestamp() => {
            if starts_later {
                tracing::info!(
                    message = "The subscription's next term starts later; the running term stays in force until then.",
                    subscription = %id, next_term_start = %fmt_time(listed.term_start.unwrap_or_default())
                );
            }
            k
        }
        _ => as_listed,
    })
}

/// Stores a full subscription list. Remembers when a cancellation was first seen; subscriptions missing from
/// the list become `Unknown`.
pub fn store_subscriptions(
    conn: &Connection,
    list: &[ListedSubscription],
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    let now_s = now.timestamp();
    let mut stmt = conn.prepare_cached(
        "INSERT INTO subscriptions (id, status, plan, offer, term_start, term_end, term_unit, unsubscribed_seen_at, updated_at, tenant)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?2 = 'Unsubscribed' THEN ?8 END, ?8, ?9)
         ON CONFLICT (id) DO UPDATE SET
             status = excluded.status, plan = excluded.plan, offer = excluded.offer,
             tenant = COALESCE(excluded.tenant, subscriptions.tenant),
             term_start = excluded.term_start, term_end = excluded.term_end, term_unit = excluded.term_unit,
             unsubscribed_seen_at = CASE WHEN excluded.status = 'Unsubscribed'
                                         THEN COALESCE(subscriptions.unsubscribed_seen_at, excluded.updated_at)
                                         ELSE NULL END,
             updated_at = excluded.updated_at",
    )?;
    for s in list {
        let id = s.id.to_ascii_lowercase();
        let (term_start, term_end, term_unit) = term_to_store(conn, &id, s, now)?;
        stmt.execute(params![
            id,
            s.status,
            s.plan.as_deref().unwrap_or(""),
            s.offer,
            term_start,
            term_end,
            term_unit,
            now_s,
            s.tenant
                .as_deref()
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
        ])?;
    }
    conn.prepare_cached("UPDATE subscriptions SET status = 'Unknown' WHERE updated_at < ?1 AND status != 'Unsubscribed'")?
        .execute([now_s])?;
    Ok(())
}

/// Every subscription meterd knows, by id.
pub fn known_subscriptions(
    conn: &Connection,
) -> Result<BTreeMap<String, KnownSubscription>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, status, plan, unsubscribed_seen_at, term_start, term_end FROM subscriptions",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(KnownSubscription {
            id: r.get(0)?,
            status: r.get(1)?,
            plan: Some(r.get::<_, String>(2)?).filter(|p| !p.is_empty()),
            unsubscribed_seen_at: r.get(3)?,
            term_start: r.get(4)?,
            term_end: r.get(5)?,
        })
    })?;
    let mut out = BTreeMap::new();
    for r in rows {
        let s = r?;
        out.insert(s.id.clone(), s);
    }
    Ok(out)
}
