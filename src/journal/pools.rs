//! Pool storage: the pools (`pools`), their audit trail (`pool_changes`), what each drew per outbound event
//! (`pool_draws`) and the pool thresholds fired (`pool_thresholds_fired`). The rules are [`crate::pools`].
//!
//! Drawing happens in [`super::billing::bill`], in the writer job that freezes an event's body, so every event's
//! draws commit with its body and a retry never draws again. Events of one pass are billed oldest hour first, then
//! by resource id (`Journal::dispose`), so two subscriptions of one team racing for a shared pool draw in a
//! deterministic order. The plan allowance pool (`plan:<plan>`) is not stored here: its draw per event is
//! `outbound_events.included` minus the rows of `pool_draws`, and its balance is `term_usage`.

use super::JournalError;
use crate::alert_kind::{AlertKey, AlertKind};
use crate::clock::{HOUR, fmt_time};
use crate::config::Settings;
use crate::pool_def::{Amount, PoolDef, PoolSpec, Scope};
use crate::pools::{Available, Draw, PoolCrossing};
use crate::quantity::Micros;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;

/// The term `[start, end)` of a resource holding a time (`billing::term_for`, given by the caller so this
/// module does not depend on billing).
pub type TermOf<'a> = &'a dyn Fn(&str, i64) -> (i64, i64);

/// A pool as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPool {
    /// The definition.
    pub def: PoolDef,
    /// `config` or `api`.
    pub source: String,
    /// When it was created, unix seconds.
    pub created_at: i64,
    /// When it was voided (no further draws), unix seconds.
    pub voided_at: Option<i64>,
}

/// One entry of a pool's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolChange {
    /// When (RFC 3339).
    pub at: String,
    /// `config` or `api`.
    pub who: String,
    /// `created`, `updated`, `voided`, `restored`.
    pub action: String,
}

/// What `POST /v1/pools` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A new pool.
    Created(StoredPool),
    /// The same id with the same content existed already: nothing changed.
    Unchanged(StoredPool),
    /// The same id exists with other content: the message says what differs and what to do.
    Conflict(String),
}

/// Whether the journal has the pool tables (a read-only command may read a journal an older daemon wrote).
pub fn has_schema(conn: &Connection) -> Result<bool, JournalError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'pools'",
        )?
        .query_row([], |r| r.get::<_, i64>(0))?
        == 1)
}

fn parse_spec(id: &str, spec: &str) -> Result<PoolDef, JournalError> {
    serde_json::from_str::<PoolSpec>(spec)
        .map_err(|e| e.to_string())
        .and_then(|s| s.validate())
        .map_err(|m| JournalError::Invalid(format!("journaled pool `{id}` does not parse: {m}")))
}

fn spec_text(def: &PoolDef) -> String {
    def.to_json().to_string()
}

/// Every pool, by id (voided ones too).
pub fn all(conn: &Connection) -> Result<Vec<StoredPool>, JournalError> {
    if !has_schema(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare_cached("SELECT id, spec, source, created_at, voided_at FROM pools ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, Option<i64>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, spec, source, created_at, voided_at) = row?;
        out.push(StoredPool {
            def: parse_spec(&id, &spec)?,
            source,
            created_at,
            voided_at,
        });
    }
    Ok(out)
}

/// The pool `id`, if journaled.
pub fn get(conn: &Connection, id: &str) -> Result<Option<StoredPool>, JournalError> {
    Ok(all(conn)?.into_iter().find(|p| p.def.id == id))
}

fn change(
    conn: &Connection,
    id: &str,
    who: &str,
    action: &str,
    spec: &str,
    now: i64,
) -> Result<(), JournalError> {
    conn.prepare_cached(
        "INSERT INTO pool_changes (pool_id, at, who, action, spec) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, now, who, action, spec])?;
    Ok(())
}

/// The audit trail of pool `id`, oldest first.
pub fn changes(conn: &Connection, id: &str) -> Result<Vec<PoolChange>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT at, who, action FROM pool_changes WHERE pool_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(PoolChange {
            at: fmt_time(r.get(0)?),
            who: r.get(1)?,
            action: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Creates pool `def` (idempotent by id: the same content again changes nothing; other content is a conflict),
/// journaling who created it.
pub fn create(
    conn: &Connection,
    def: &PoolDef,
    source: &str,
    who: &str,
    now: DateTime<Utc>,
) -> Result<Created, JournalError> {
    if let Some(existing) = get(conn, &def.id)? {
        if existing.def == *def {
            return Ok(Created::Unchanged(existing));
        }
        return Ok(Created::Conflict(format!(
            "pool `{}` exists with other content ({}); pools are not edited in place: void it (POST /v1/pools/{}/void) and create one with another id",
            def.id,
            spec_text(&existing.def),
            def.id
        )));
    }
    let spec = spec_text(def);
    conn.prepare_cached(
        "INSERT INTO pools (id, dimension, spec, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        def.id,
        def.dimension,
        spec,
        source,
        now.timestamp()
    ])?;
    change(conn, &def.id, who, "created", &spec, now.timestamp())?;
    tracing::info!(message = "Pool created.", pool = %def.id, dimension = %def.dimension, who = %who);
    Ok(Created::Created(StoredPool {
        def: def.clone(),
        source: source.into(),
        created_at: now.timestamp(),
        voided_at: None,
    }))
}

/// Voids pool `id` (no further draws; what it drew stays drawn), journaling who. `None`: no such pool.
pub fn void(
    conn: &Connection,
    id: &str,
    who: &str,
    now: DateTime<Utc>,
) -> Result<Option<StoredPool>, JournalError> {
    let Some(p) = get(conn, id)? else {
        return Ok(None);
    };
    let n = conn
        .prepare_cached("UPDATE pools SET voided_at = ?2 WHERE id = ?1 AND voided_at IS NULL")?
        .execute(params![id, now.timestamp()])?;
    if n == 1 {
        change(conn, id, who, "voided", &spec_text(&p.def), now.timestamp())?;
        tracing::info!(message = "Pool voided.", pool = %id, who = %who);
    }
    get(conn, id)
}

/// Journals the `[[pools]]` of `settings` (who = `config`): new ones are created, changed ones updated, ones no
/// longer configured voided (and restored when configured again). A pool id the API created is left alone.
pub fn sync_config(
    conn: &Connection,
    settings: &Settings,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    let now_s = now.timestamp();
    let existing: BTreeMap<String, StoredPool> = all(conn)?
        .into_iter()
        .map(|p| (p.def.id.clone(), p))
        .collect();
    for def in &settings.pools {
        match existing.get(&def.id) {
            None => {
                create(conn, def, "config", "config", now)?;
            }
            Some(p) if p.source != "config" => {
                tracing::warn!(message = "A [[pools]] id is already used by a pool created through the API; the configured pool is ignored. Give it another id.", pool = %def.id);
            }
            Some(p) => {
                let spec = spec_text(def);
                if p.def != *def {
                    conn.prepare_cached(
                        "UPDATE pools SET spec = ?2, dimension = ?3 WHERE id = ?1",
                    )?
                    .execute(params![def.id, spec, def.dimension])?;
                    change(conn, &def.id, "config", "updated", &spec, now_s)?;
                }
                if p.voided_at.is_some() {
                    conn.prepare_cached("UPDATE pools SET voided_at = NULL WHERE id = ?1")?
                        .execute([&def.id])?;
                    change(conn, &def.id, "config", "restored", &spec, now_s)?;
                }
            }
        }
    }
    for (id, p) in &existing {
        if p.source == "config"
            && p.voided_at.is_none()
            && !settings.pools.iter().any(|d| &d.id == id)
        {
            void(conn, id, "config", now)?;
        }
    }
    Ok(())
}

/// The customer (tenant id, lower case) of `resource`, as the subscription list named it.
pub fn tenant_of(conn: &Connection, resource: &str) -> Result<Option<String>, JournalError> {
    if !has_schema(conn)? {
        return Ok(None);
    }
    Ok(conn
        .prepare_cached("SELECT tenant FROM subscriptions WHERE id = ?1")?
        .query_row([resource.to_ascii_lowercase()], |r| {
            r.get::<_, Option<String>>(0)
        })
        .optional()?
        .flatten())
}

/// The subscriptions (lower-case ids) the list names with customer `tenant`.
pub fn members_of(conn: &Connection, tenant: &str) -> Result<Vec<String>, JournalError> {
    if !has_schema(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt =
        conn.prepare_cached("SELECT id FROM subscriptions WHERE tenant = ?1 ORDER BY id")?;
    let rows = stmt.query_map([tenant.trim().to_ascii_lowercase()], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Whether `def`'s scope holds `resource` (with its customer `tenant` and `groups`).
pub fn scope_holds(def: &PoolDef, resource: &str, tenant: Option<&str>, groups: &[&str]) -> bool {
    match &def.scope {
        Scope::Resource(r) => r.eq_ignore_ascii_case(resource),
        Scope::Customer(c) => tenant.is_some_and(|t| t.eq_ignore_ascii_case(c)),
        Scope::Group(g) => groups.contains(&g.as_str()),
    }
}

/// The pools whose scope holds `resource` (voided ones too), optionally of one dimension, in draw order.
pub fn for_resource(
    conn: &Connection,
    settings: &Settings,
    resource: &str,
    dimension: Option<&str>,
) -> Result<Vec<StoredPool>, JournalError> {
    let tenant = tenant_of(conn, resource)?;
    let groups = settings.groups_of(resource);
    let mut out: Vec<StoredPool> = all(conn)?
        .into_iter()
        .filter(|p| dimension.is_none_or(|d| p.def.dimension == d))
        .filter(|p| scope_holds(&p.def, resource, tenant.as_deref(), &groups))
        .collect();
    out.sort_by(|a, b| {
        (
            a.def.priority,
            a.def.expires_at.unwrap_or(i64::MAX),
            &a.def.id,
        )
            .cmp(&(
                b.def.priority,
                b.def.expires_at.unwrap_or(i64::MAX),
                &b.def.id,
            ))
    });
    Ok(out)
}

fn drawn_by_period(conn: &Connection, id: &str) -> Result<BTreeMap<i64, i64>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT period_start, SUM(quantity) FROM pool_draws WHERE pool_id = ?1 GROUP BY period_start",
    )?;
    let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Pool `def` as it stands at `at` for `resource` (whose term a `term` refresh follows): its period, what the
/// period makes available and what is left.
pub fn available(
    conn: &Connection,
    term: TermOf<'_>,
    def: &PoolDef,
    resource: &str,
    at: i64,
) -> Result<Available, JournalError> {
    let term_of = |t: i64| term(resource, t);
    let (start, _) = def.period_at(at, &term_of);
    let drawn = drawn_by_period(conn, &def.id)?;
    let total = def.allotment(start, &drawn, &term_of);
    let used = drawn.get(&start).copied().unwrap_or(0);
    Ok(Available {
        id: def.id.clone(),
        priority: def.priority,
        effective_at: def.effective_at,
        expires_at: def.expires_at,
        period_start: start,
        total,
        left: match total {
            Amount::Infinite => Amount::Infinite,
            Amount::Quantity(q) => Amount::Quantity((q - used).max(0)),
        },
    })
}

/// The pools an event of `resource`, `dimension` and `hour` draws from (not voided, window overlapping the hour),
/// as they stand.
pub fn event_pools(
    conn: &Connection,
    settings: &Settings,
    term: TermOf<'_>,
    resource: &str,
    dimension: &str,
    hour: i64,
) -> Result<Vec<Available>, JournalError> {
    let any: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM pools WHERE dimension = ?1 AND voided_at IS NULL")?
        .query_row([dimension], |r| r.get(0))?;
    if any == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for p in for_resource(conn, settings, resource, Some(dimension))? {
        let d = &p.def;
        if p.voided_at.is_some()
            || d.effective_at >= hour + HOUR
            || d.expires_at.is_some_and(|e| e <= hour)
        {
            continue;
        }
        out.push(available(
            conn,
            term,
            d,
            resource,
            hour.max(d.effective_at),
        )?);
    }
    Ok(out)
}

/// An event's fresh usage by time, for drawing (`crate::pools`, rule 3): one chunk at the hour's start unless a
/// pool's window starts or ends inside the hour; then the records counted in the hour, at their times (clamped
/// into the hour), and what no record accounts for at the hour's start. (That look-up scans the retained raw
/// records of the hour; it happens only for the hours in which a pool starts or expires.)
pub fn event_usage(
    conn: &Connection,
    resource: &str,
    dimension: &str,
    hour: i64,
    fresh: i64,
    pools: &[Available],
) -> Result<Vec<(i64, i64)>, JournalError> {
    let inside = |t: i64| t > hour && t < hour + HOUR;
    if !pools
        .iter()
        .any(|p| inside(p.effective_at) || p.expires_at.is_some_and(inside))
    {
        return Ok(vec![(hour, fresh)]);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT event_time, quantity FROM usage_records WHERE resource = ?1 AND dimension = ?2 AND hour = ?3
         ORDER BY event_time, seq",
    )?;
    let rows = stmt.query_map(params![resource, dimension, hour], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut usage = Vec::new();
    let mut left = fresh;
    for row in rows {
        let (t, q) = row?;
        let q = q.min(left);
        if q <= 0 {
            continue;
        }
        usage.push((t.clamp(hour, hour + HOUR - 1), q));
        left -= q;
    }
    if left > 0 {
        usage.insert(0, (hour, left));
    }
    Ok(usage)
}

/// Records an event's draws (the plan pool's excluded: it is `included` minus these).
pub fn record_draws(
    conn: &Connection,
    ev: &super::outbound::PendingEvent,
    plan_pool: &str,
    draws: &[Draw],
) -> Result<(), JournalError> {
    for d in draws.iter().filter(|d| d.id != plan_pool) {
        conn.prepare_cached(
            "INSERT INTO pool_draws (outbound_id, pool_id, period_start, quantity, resource, dimension, hour)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (outbound_id, pool_id) DO UPDATE SET quantity = quantity + excluded.quantity",
        )?
        .execute(params![ev.id, d.id, d.period_start, d.quantity, ev.resource, ev.dimension, ev.hour])?;
    }
    Ok(())
}

/// Fires each crossing once per pool, period and threshold: a log event, a metric and a `pool_threshold` alert.
pub fn fire_crossings(
    conn: &Connection,
    crossings: &[PoolCrossing],
    resource: &str,
    dimension: &str,
    hour: i64,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    for c in crossings {
        let inserted = conn
            .prepare_cached(
                "INSERT INTO pool_thresholds_fired (pool_id, period_start, threshold, fired_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![c.id, c.period_start, c.text, now.timestamp()])?;
        if inserted == 1 {
            let body = serde_json::json!({
                "pool": c.id,
                "threshold": c.text,
                "used": Micros(c.used).to_decimal_string(),
                "total": Micros(c.total).to_decimal_string(),
                "available": Micros((c.total - c.used).max(0)).to_decimal_string(),
                "period_start": fmt_time(c.period_start),
                "resource": resource,
                "dimension": dimension,
                "hour": fmt_time(hour),
            });
            super::alerts::raise(
                conn,
                &AlertKey::pool(AlertKind::PoolThreshold, &c.id, c.period_start, &c.text),
                body,
                now,
            )?;
            tracing::warn!(message = "A pool crossed a threshold.", pool = %c.id, threshold = %c.text, used = %Micros(c.used), total = %Micros(c.total), alert = "pool_threshold");
            metrics::counter!("meterd_pool_thresholds_crossed_total", "dimension" => dimension.to_string()).increment(1);
        }
    }
    Ok(())
}

/// Raises a `pool_expiring` alert, once per pool and period, for each pool that expires within
/// `alerts.pool_expiry_warning` with at least `alerts.pool_expiry_unused` of its period unused. A pool of customer
/// or group scope is measured as it stands (its draws are shared); a `term` pool for its resource.
pub fn raise_expiry_alerts(
    conn: &Connection,
    settings: &Settings,
    term: TermOf<'_>,
    now: DateTime<Utc>,
) -> Result<usize, JournalError> {
    let now_s = now.timestamp();
    let window = settings.alerts.pool_expiry_warning.num_seconds();
    let mut raised = 0;
    for p in all(conn)? {
        let Some(expires) = p.def.expires_at else {
            continue;
        };
        if p.voided_at.is_some() || !p.def.covers(now_s) || expires - now_s > window {
            continue;
        }
        let resource = match &p.def.scope {
            Scope::Resource(r) => r.clone(),
            _ => String::new(),
        };
        let a = available(conn, term, &p.def, &resource, now_s)?;
        let (Amount::Quantity(total), Amount::Quantity(left)) = (a.total, a.left) else {
            continue;
        };
        if !crate::pools::expiry_warning_due(
            now_s,
            expires,
            total,
            left,
            window,
            settings.alerts.pool_expiry_unused,
        ) {
            continue;
        }
        let inserted = conn
            .prepare_cached(
                "INSERT INTO pool_thresholds_fired (pool_id, period_start, threshold, fired_at) VALUES (?1, ?2, 'expiring', ?3)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![p.def.id, a.period_start, now_s])?;
        if inserted == 1 {
            let body = serde_json::json!({
                "pool": p.def.id,
                "threshold": "expiring",
                "expires_at": fmt_time(expires),
                "available": Micros(left).to_decimal_string(),
                "total": Micros(total).to_decimal_string(),
                "dimension": p.def.dimension,
            });
            super::alerts::raise(
                conn,
                &AlertKey::pool(
                    AlertKind::PoolExpiring,
                    &p.def.id,
                    a.period_start,
                    "expiring",
                ),
                body,
                now,
            )?;
            tracing::warn!(message = "A pool expires soon with much of it unused.", pool = %p.def.id, expires_at = %fmt_time(expires), available = %Micros(left), alert = "pool_expiring");
            raised += 1;
        }
    }
    Ok(raised)
}

/// What each pool covered of outbound event `outbound_id` (the plan pool's part is `included` minus these).
pub fn event_draws(
    conn: &Connection,
    outbound_id: i64,
) -> Result<Vec<(String, i64)>, JournalError> {
    if !has_schema(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT pool_id, quantity FROM pool_draws WHERE outbound_id = ?1 ORDER BY pool_id",
    )?;
    let rows = stmt.query_map([outbound_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One pool in a balance (the contract of `GET /v1/subscriptions/{id}/balance`'s `pools`).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct PoolBalance {
    /// Pool id (`plan:<plan>` for the plan allowance).
    pub id: String,
    /// Draw priority.
    pub priority: i64,
    /// `{"resource"|"customer"|"group": "..."}`.
    pub scope: serde_json::Value,
    /// What the current period makes available (decimal string or `infinite`).
    pub total: String,
    /// What is left of it.
    pub available: String,
    /// What was drawn from it this period.
    pub used: String,
    /// Covers usage from (RFC 3339).
    pub effective_at: String,
    /// Covers usage until (RFC 3339), if it expires.
    pub expires_at: Option<String>,
    /// When the next period starts (RFC 3339), if it refreshes.
    pub refreshes_at: Option<String>,
    /// No further draws.
    pub voided: bool,
}

/// The plan allowance of `plan` for dimension `dimension` as a balance entry (`plan:<plan>`): `consumed` of it
/// used this term `[term_start, term_end)`. The same entry in both journals (SQLite and the fleet's).
pub fn plan_pool_balance(
    settings: &crate::config::Settings,
    plan: &str,
    dimension: &str,
    resource: &str,
    consumed: i64,
    (term_start, term_end): (i64, i64),
) -> PoolBalance {
    use crate::config::Included;
    use crate::quantity::Micros;
    let allowance = settings.included(plan, dimension);
    PoolBalance {
        id: crate::pools::plan_pool_id(plan),
        priority: settings.billing.plan_pool_priority,
        scope: serde_json::json!({ "resource": resource }),
        total: crate::pools::Amount::from(allowance).to_decimal_string(),
        available: match allowance {
            Included::Infinite => "infinite".into(),
            Included::Quantity(q) => Micros((q - consumed).max(0)).to_decimal_string(),
        },
        used: match allowance {
            Included::Infinite => Micros(consumed).to_decimal_string(),
            Included::Quantity(q) => Micros(consumed.min(q).max(0)).to_decimal_string(),
        },
        effective_at: crate::clock::fmt_time(term_start),
        expires_at: None,
        refreshes_at: Some(crate::clock::fmt_time(term_end)),
        voided: false,
    }
}

/// Pool `p` as a balance entry at `now` for `resource`.
pub fn pool_balance(
    conn: &Connection,
    term: TermOf<'_>,
    p: &StoredPool,
    resource: &str,
    now: i64,
) -> Result<PoolBalance, JournalError> {
    let at = now.max(p.def.effective_at);
    let a = available(conn, term, &p.def, resource, at)?;
    let term_of = |t: i64| term(resource, t);
    let (_, end) = p.def.period_at(at, &term_of);
    let refreshes_at = p
        .def
        .refresh
        .filter(|_| end < i64::MAX && p.def.expires_at.is_none_or(|e| end < e))
        .map(|_| fmt_time(end));
    let (available, used) = match (a.total, a.left) {
        (Amount::Quantity(t), Amount::Quantity(l)) => (
            Micros(l).to_decimal_string(),
            Micros(t - l).to_decimal_string(),
        ),
        _ => {
            let used = drawn_by_period(conn, &p.def.id)?
                .get(&a.period_start)
                .copied()
                .unwrap_or(0);
            ("infinite".into(), Micros(used).to_decimal_string())
        }
    };
    let expired = p.def.expires_at.is_some_and(|e| e <= now);
    Ok(PoolBalance {
        id: p.def.id.clone(),
        priority: p.def.priority,
        scope: serde_json::json!({ p.def.scope.kind(): p.def.scope.value() }),
        total: a.total.to_decimal_string(),
        available: if p.voided_at.is_some() || expired {
            "0".into()
        } else {
            available
        },
        used,
        effective_at: fmt_time(p.def.effective_at),
        expires_at: p.def.expires_at.map(fmt_time),
        refreshes_at,
        voided: p.voided_at.is_some(),
    })
}

/// Pool `p` in the form of `GET /v1/pools`: its definition (the fields of `POST /v1/pools`), where it came from,
/// its balance for `resource` (its own for customer and group scopes) and its audit trail.
pub fn pool_json(
    conn: &Connection,
    term: TermOf<'_>,
    p: &StoredPool,
    resource: Option<&str>,
    now: i64,
) -> Result<serde_json::Value, JournalError> {
    let mut v = p.def.to_json();
    let r = match (&p.def.scope, resource) {
        (Scope::Resource(r), _) => r.clone(),
        (_, Some(r)) => r.to_string(),
        _ => String::new(),
    };
    let b = pool_balance(conn, term, p, &r, now)?;
    v["source"] = p.source.clone().into();
    v["created_at"] = fmt_time(p.created_at).into();
    v["voided"] = b.voided.into();
    v["voided_at"] = p.voided_at.map(fmt_time).into();
    v["total"] = b.total.into();
    v["available"] = b.available.into();
    v["used"] = b.used.into();
    v["refreshes_at"] = b.refreshes_at.into();
    v["changes"] = serde_json::to_value(changes(conn, &p.def.id)?).unwrap_or_default();
    Ok(v)
}

/// The pools of `GET /v1/pools`: those whose scope holds `resource` (in draw order), or every pool (by id).
pub fn list(
    conn: &Connection,
    settings: &Settings,
    term: TermOf<'_>,
    resource: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<serde_json::Value>, JournalError> {
    let pools = match resource {
        Some(r) => for_resource(conn, settings, r, None)?,
        None => all(conn)?,
    };
    pools
        .iter()
        .map(|p| pool_json(conn, term, p, resource, now.timestamp()))
        .collect()
}
