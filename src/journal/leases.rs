//! Leases (`leases` table): single-flight emission (invariant 7 of this module's face: one owner until expiry).

use super::JournalError;
use crate::clock::fmt_time;
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, params};

/// Takes (or renews) the lease `name` for `owner` until `now + ttl`. `Err(holder)` when someone else holds it.
pub fn acquire_lease(
    conn: &Connection,
    name: &str,
    owner: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Result<Result<(), String>, JournalError> {
    let changed = conn
        .prepare_cached(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
             WHERE leases.owner = excluded.owner OR leases.expires_at <= ?4",
        )?
        .execute(params![name, owner, (now + ttl).timestamp(), now.timestamp()])?;
    if changed == 1 {
        return Ok(Ok(()));
    }
    let holder: (String, i64) = conn
        .prepare_cached("SELECT owner, expires_at FROM leases WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Err(format!("{} (until {})", holder.0, fmt_time(holder.1))))
}

/// Gives the lease back if `owner` holds it.
pub fn release_lease(conn: &Connection, name: &str, owner: &str) -> Result<(), JournalError> {
    conn.prepare_cached("DELETE FROM leases WHERE name = ?1 AND owner = ?2")?
        .execute(params![name, owner])?;
    Ok(())
}

/// Drops every lease. Only for a process that holds the journal's exclusive lock: no other process can be
/// running, so any lease left is a crashed process's.
pub fn clear_leases(conn: &Connection) -> Result<usize, JournalError> {
    Ok(conn.execute("DELETE FROM leases", [])?)
}
