//! The forward path into the shared journal: a batch of one replica's outbox records inserted once each
//! (fleet invariant F1) and added to `hourly_totals` by the late-usage rule, in one transaction.
//!
//! The late rule is the SQLite journal's (`journal/usage.rs`, invariant 5), judged here, at forward time, against
//! the fleet's state: a record goes into its own hour while its key (resource, dimension, hour) has no outbound
//! event and the hour is still sendable (`H + 24h - emit.safety_margin - emit.min_send_time` ahead); otherwise it
//! is carried into the open hour (or `meta.frozen_through` if later) with a `carries` row (reason `late`). The
//! records were acknowledged already, so `late_usage = "reject"` cannot apply here: a record late at forward
//! time is always carried.
//!
//! Races with a freeze on another replica: the upsert of a total only adds while the total is unfrozen
//! (`ON CONFLICT ... DO UPDATE ... WHERE outbound_id IS NULL`; under READ COMMITTED it waits for the freeze's row
//! lock and re-checks); when the freeze won a total, the whole forward rolls back and is retried, and the retry
//! sees the event and carries. A total of a new plan for a key frozen in
//! the same instant is a new row the freeze could not see; the freeze treats an unfrozen total of a key that
//! already has its event as late (see docs/fleet.md, "Emission").
//!
//! Round trips per batch, in the common case (every resource's spelling known to this replica, every record of
//! an hour at or after the `frozen_through` it last read: [`ForwardCache`]), two: BEGIN; then one pipelined round
//! trip of five statements: a check that `meta.frozen_through` has not moved (else the batch is judged again with
//! the lookups), a plain `INSERT` of the records, the batch's sums (aggregated here, one row per total) added to
//! the hourly totals, failing unless every total took them (a freeze won one), its carries, and COMMIT. A failed
//! statement fails the ones after it and turns the COMMIT into a rollback, so the batch commits whole or not at
//! all. Otherwise: BEGIN; the spellings, `meta.frozen_through` and the keys that have their event (three
//! statements pipelined in one round trip); then the records, totals and carries (three statements pipelined in
//! one round trip); COMMIT; what was read is remembered for the next batches. A plain `INSERT` costs about half of
//! `ON CONFLICT DO NOTHING` (no speculative insertion and confirmation per row: docs/performance.md,
//! "fleet-forward"). A key already in `records` fails it with a unique violation; nothing commits and the batch
//! runs again with one statement (data-modifying CTEs) that inserts with `ON CONFLICT DO NOTHING`, adds the sums
//! of those inserted to the hourly totals and records their carries.
//!
//! Lock order: spellings by folded resource, records by key in byte order (`COLLATE "C"`), totals by (hour,
//! resource, dimension, plan) (the freeze's order), carries by their key, so forwards of overlapping batches (two
//! replicas, or the two batches one replica has in flight) wait for each other instead of deadlocking; a
//! deadlock with a freeze is an error the forwarder retries (nothing committed).

use super::{PgError, PgJournal};
use crate::journal::outbox::OutboxRecord;
use crate::journal::usage::IngestRules;
use std::collections::{HashMap, HashSet};

/// What one forwarded batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardSummary {
    /// Records inserted (new to the fleet).
    pub inserted: usize,
    /// Records already in the shared journal (forwarded before, or the same id through another replica).
    pub duplicates: usize,
    /// Inserted records carried into a later hour (their key was frozen, or their hour no longer sendable).
    pub carried: usize,
}

type TotalKey = (String, String, String, i64);

fn hour_of_secs(t: i64) -> i64 {
    t.div_euclid(crate::clock::HOUR) * crate::clock::HOUR
}

fn overflow(k: &TotalKey) -> PgError {
    PgError::Unavailable(format!(
        "the fleet's hourly total of {}/{} at {} would overflow",
        k.0,
        k.2,
        crate::clock::fmt_time(k.3)
    ))
}

/// How a forward inserts its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// A plain `INSERT` (no conflict handling): the common case, every key new to the fleet. A key already in
    /// `records` fails the statement with a unique violation on `records_pkey`, and the forward is run again as
    /// [`Insert::SkipExisting`].
    Plain,
    /// `INSERT ... ON CONFLICT DO NOTHING`: the totals and carries count only the records inserted.
    SkipExisting,
}

/// True for the unique violation a plain insert of a key already in `records` raises.
fn is_known_record(e: &PgError) -> bool {
    match e {
        PgError::Db(e) => e.as_db_error().is_some_and(|d| {
            *d.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                && d.constraint() == Some("records_pkey")
        }),
        _ => false,
    }
}

/// The plain insert of a batch's records (their keys in byte order, the order `ORDER BY k COLLATE "C"` gives,
/// so two forwards that meet on a key wait for each other in one order).
const INSERT_RECORDS: &str = "INSERT INTO records (idem_key, replica, resource, plan, dimension, event_time, origin_hour, hour,
                          quantity, received_at, forwarded_at)
     SELECT k, $2, r, p, d, e, o, h, q, ra, $11
     FROM unnest($1::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[],
                 $9::int8[], $10::int8[]) AS t(k, r, p, d, e, o, h, q, ra)";

/// The batch's sums (aggregated in Rust, one row per total) added to the hourly totals unless frozen, in the
/// freeze's lock order (hour, resource, dimension, plan). Its row count is how many totals were added to.
/// The text of [`ADD_TOTALS`], also the core of [`ADD_TOTALS_ALL`] (one statement written once).
macro_rules! add_totals_sql {
    () => {
        "INSERT INTO hourly_totals AS t (resource, plan, dimension, hour, quantity, records, carried_in)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
         AS s(resource, plan, dimension, hour, quantity, records, carried_in)
     ORDER BY hour, resource, dimension, plan
     ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
         quantity = t.quantity + excluded.quantity,
         records = t.records + excluded.records,
         carried_in = t.carried_in + excluded.carried_in
     WHERE t.outbound_id IS NULL"
    };
}
const ADD_TOTALS: &str = add_totals_sql!();

/// The batch's carries (aggregated in Rust, one row per carry key), in key order.
const ADD_CARRIES: &str = "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, created_at)
     SELECT r, p, d, f, t, q, 'late', $7
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[]) AS c(r, p, d, f, t, q)
     ORDER BY r, p, d, f, t
     ON CONFLICT (resource, plan, dimension, from_hour, to_hour, reason) WHERE outbound_id IS NULL
     DO UPDATE SET quantity = carries.quantity + excluded.quantity";

/// [`Insert::SkipExisting`]'s one statement: the records inserted (a key already there adds nothing), the sums of
/// those inserted added to the hourly totals unless frozen (in the freeze's lock order: hour, resource,
/// dimension, plan), and the carries of those carried. It returns how many were inserted, how many of them
/// carried, and how many totals were to be added against how many were.
const FORWARD_SKIPPING_EXISTING: &str = "WITH ins AS (
     INSERT INTO records (idem_key, replica, resource, plan, dimension, event_time, origin_hour, hour,
                          quantity, received_at, forwarded_at)
     SELECT k, $2, r, p, d, e, o, h, q, ra, $11
     FROM unnest($1::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[],
                 $9::int8[], $10::int8[]) AS t(k, r, p, d, e, o, h, q, ra)
     ORDER BY k COLLATE \"C\"
     ON CONFLICT (idem_key) DO NOTHING
     RETURNING resource, plan, dimension, origin_hour, hour, quantity),
 sums AS (
     SELECT resource, plan, dimension, hour, sum(quantity)::int8 AS quantity, count(*)::int8 AS records,
            sum(CASE WHEN hour <> origin_hour THEN quantity ELSE 0 END)::int8 AS carried_in
     FROM ins GROUP BY resource, plan, dimension, hour),
 up AS (
     INSERT INTO hourly_totals AS t (resource, plan, dimension, hour, quantity, records, carried_in)
     SELECT resource, plan, dimension, hour, quantity, records, carried_in FROM sums
     ORDER BY hour, resource, dimension, plan
     ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
         quantity = t.quantity + excluded.quantity,
         records = t.records + excluded.records,
         carried_in = t.carried_in + excluded.carried_in
     WHERE t.outbound_id IS NULL
     RETURNING 1),
 car AS (
     INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, created_at)
     SELECT resource, plan, dimension, origin_hour, hour, sum(quantity)::int8, 'late', $11
     FROM ins WHERE hour <> origin_hour
     GROUP BY resource, plan, dimension, origin_hour, hour
     ORDER BY resource, plan, dimension, origin_hour, hour
     ON CONFLICT (resource, plan, dimension, from_hour, to_hour, reason) WHERE outbound_id IS NULL
     DO UPDATE SET quantity = carries.quantity + excluded.quantity
     RETURNING 1)
 SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM ins WHERE hour <> origin_hour),
        (SELECT count(*) FROM sums), (SELECT count(*) FROM up), (SELECT count(*) FROM car)";

/// A batch's sums per hourly total: (quantity, records, carried in).
type Sums = HashMap<TotalKey, (i64, i64, i64)>;

/// A batch's carries per carry key (resource, plan, dimension, from hour, to hour): the quantity.
type Carries = HashMap<(String, String, String, i64, i64), i64>;

/// What the forward path remembers between batches, per pool ([`PgJournal`] and its clones):
///
/// - the fleet's spelling of each resource this replica has forwarded (folded -> first spelling). A spelling is
///   written once (`ON CONFLICT (folded) DO NOTHING`) and never changed or deleted, so a spelling read once is
///   the fleet's for good;
/// - the last `meta.frozen_through` read. It never moves backwards, and the freeze writes its events and moves it
///   in one transaction, so in every snapshot an outbound event exists only for an hour before it: a record of an
///   hour at or after it has no event to look up. A forward that relies on it checks it first, in its own
///   transaction ([`FROZEN_THROUGH_IS`]).
#[derive(Debug, Default)]
pub struct ForwardCache {
    spellings: std::sync::Mutex<HashMap<String, String>>,
    frozen_through: std::sync::Mutex<Option<i64>>,
}

/// Spellings kept at most (about 100 bytes each); past it the cache starts over.
const SPELLINGS_CACHED: usize = 200_000;

impl ForwardCache {
    fn remember(&self, spellings: &HashMap<String, String>, frozen_through: i64) {
        let mut known = self.spellings.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() + spellings.len() > SPELLINGS_CACHED {
            known.clear();
        }
        for (f, s) in spellings {
            known.entry(f.clone()).or_insert_with(|| s.clone());
        }
        drop(known);
        let mut f = self
            .frozen_through
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *f = Some(f.map_or(frozen_through, |old| old.max(frozen_through)));
    }

    fn frozen_through(&self) -> Option<i64> {
        *self
            .frozen_through
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The fleet's spelling of every resource of `recs`, or `None` when one is not known yet.
    fn spellings_of(&self, recs: &[&OutboxRecord]) -> Option<HashMap<String, String>> {
        let known = self.spellings.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = HashMap::new();
        for r in recs {
            let f = r.resource.to_ascii_lowercase();
            if let std::collections::hash_map::Entry::Vacant(v) = out.entry(f) {
                let s = known.get(v.key())?.clone();
                v.insert(s);
            }
        }
        Some(out)
    }
}

/// The fast path's first statement: fails with `division_by_zero` unless `meta.frozen_through` (no row: `$2`)
/// is still `$1`, the value the batch was judged by.
const FROZEN_THROUGH_IS: &str =
    "SELECT 1 / (CASE WHEN COALESCE((SELECT value FROM meta WHERE key = 'frozen_through'), $2) = $1
                      THEN 1 ELSE 0 END)";

/// [`ADD_TOTALS`] that fails with `division_by_zero` unless it added to all `$8` totals (a freeze on another
/// replica won one between the batch's judgement and this statement), so that the `COMMIT` pipelined after it
/// rolls the batch back.
const ADD_TOTALS_ALL: &str = concat!(
    "WITH up AS (",
    add_totals_sql!(),
    " RETURNING 1) SELECT 1 / (CASE WHEN count(*) = $8 THEN 1 ELSE 0 END) FROM up"
);

/// True for the `division_by_zero` a guard statement of the fast path raises.
fn is_refused(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
}

/// The error of a forward whose totals a freeze on another replica won (nothing committed; the retry carries).
fn frozen_meanwhile(n: i64) -> PgError {
    PgError::Unavailable(format!(
        "{n} hourly total(s) were frozen by another replica during this forward; it is retried"
    ))
}

/// A batch judged: each record's row for `records`, and the sums and carries they add.
struct Rows {
    k: Vec<String>,
    res: Vec<String>,
    plan: Vec<String>,
    dim: Vec<String>,
    et: Vec<i64>,
    oh: Vec<i64>,
    hr: Vec<i64>,
    q: Vec<i64>,
    ra: Vec<i64>,
    sums: Sums,
    carries: Carries,
    carried: usize,
}

impl Rows {
    /// Judges `recs` (one per key, in key order) by the late rule: a record is late when its hour is no longer
    /// sendable or `frozen` says its key (folded resource, dimension, hour) has its event; late ones go to
    /// `target` (or their own hour if later). Overflow is refused before anything is written.
    fn judge(
        recs: &[&OutboxRecord],
        spelling: &HashMap<String, String>,
        frozen: impl Fn(&str, &str, i64) -> bool,
        target: i64,
        rules: &IngestRules,
    ) -> Result<Rows, PgError> {
        let now = rules.now.timestamp();
        let n = recs.len();
        let mut rows = Rows {
            k: Vec::with_capacity(n),
            res: Vec::with_capacity(n),
            plan: Vec::with_capacity(n),
            dim: Vec::with_capacity(n),
            et: Vec::with_capacity(n),
            oh: Vec::with_capacity(n),
            hr: Vec::with_capacity(n),
            q: Vec::with_capacity(n),
            ra: Vec::with_capacity(n),
            sums: HashMap::new(),
            carries: HashMap::new(),
            carried: 0,
        };
        for r in recs {
            let folded = r.resource.to_ascii_lowercase();
            let resource = spelling
                .get(&folded)
                .cloned()
                .unwrap_or_else(|| r.resource.clone());
            let origin = hour_of_secs(r.event_time);
            let late = rules.sendable_until(origin) <= now || frozen(&folded, &r.dimension, origin);
            let hour = if late { target.max(origin) } else { origin };
            let key = (resource.clone(), r.plan.clone(), r.dimension.clone(), hour);
            let s = rows.sums.entry(key).or_default();
            s.0 = s.0.checked_add(r.quantity).ok_or_else(|| {
                overflow(&(resource.clone(), r.plan.clone(), r.dimension.clone(), hour))
            })?;
            s.1 += 1;
            if hour != origin {
                s.2 = s.2.checked_add(r.quantity).ok_or_else(|| {
                    overflow(&(resource.clone(), r.plan.clone(), r.dimension.clone(), hour))
                })?;
                let c = rows
                    .carries
                    .entry((
                        resource.clone(),
                        r.plan.clone(),
                        r.dimension.clone(),
                        origin,
                        hour,
                    ))
                    .or_default();
                *c = c.checked_add(r.quantity).ok_or_else(|| {
                    overflow(&(resource.clone(), r.plan.clone(), r.dimension.clone(), hour))
                })?;
                rows.carried += 1;
            }
            rows.k.push(r.idem_key.clone());
            rows.res.push(resource);
            rows.plan.push(r.plan.clone());
            rows.dim.push(r.dimension.clone());
            rows.et.push(r.event_time);
            rows.oh.push(origin);
            rows.hr.push(hour);
            rows.q.push(r.quantity);
            rows.ra.push(r.received_at);
        }
        Ok(rows)
    }
}

/// The columns of [`ADD_TOTALS`] (one row per total) and of [`ADD_CARRIES`] (one row per carry key).
struct SumArrays {
    tr: Vec<String>,
    tp: Vec<String>,
    td: Vec<String>,
    th: Vec<i64>,
    tq: Vec<i64>,
    tn: Vec<i64>,
    tc: Vec<i64>,
    cr: Vec<String>,
    cp: Vec<String>,
    cd: Vec<String>,
    cf: Vec<i64>,
    ch: Vec<i64>,
    cq: Vec<i64>,
}

impl SumArrays {
    fn of(sums: Sums, carries: Carries) -> SumArrays {
        let m = sums.len();
        let mut a = SumArrays {
            tr: Vec::with_capacity(m),
            tp: Vec::with_capacity(m),
            td: Vec::with_capacity(m),
            th: Vec::with_capacity(m),
            tq: Vec::with_capacity(m),
            tn: Vec::with_capacity(m),
            tc: Vec::with_capacity(m),
            cr: Vec::new(),
            cp: Vec::new(),
            cd: Vec::new(),
            cf: Vec::new(),
            ch: Vec::new(),
            cq: Vec::new(),
        };
        for ((r, p, d, h), (sq, sn, sc)) in sums {
            a.tr.push(r);
            a.tp.push(p);
            a.td.push(d);
            a.th.push(h);
            a.tq.push(sq);
            a.tn.push(sn);
            a.tc.push(sc);
        }
        for ((r, p, d, f, h), q) in carries {
            a.cr.push(r);
            a.cp.push(p);
            a.cd.push(d);
            a.cf.push(f);
            a.ch.push(h);
            a.cq.push(q);
        }
        a
    }
}

/// A pooled connection inside the fast path's pipelined transaction: unless [`Pipelined::done`] is called (the
/// `COMMIT` answered, so the connection is out of the transaction whatever happened in it), dropping it closes the
/// connection instead of returning it to the pool, so that a transaction left open (the forward cancelled, a
/// connection error mid-way) is rolled back by the server and never reused.
struct Pipelined(Option<deadpool_postgres::Object>);

impl Pipelined {
    fn done(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Pipelined {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a connection until done")
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Key order (lock order: bytes, as `COLLATE "C"`), one record per key; and how many were copies.
fn one_per_key(batch: &[OutboxRecord]) -> (Vec<&OutboxRecord>, usize) {
    let mut recs: Vec<&OutboxRecord> = batch.iter().collect();
    recs.sort_by(|a, b| a.idem_key.cmp(&b.idem_key));
    recs.dedup_by(|a, b| a.idem_key == b.idem_key);
    let copies = batch.len() - recs.len();
    (recs, copies)
}

impl PgJournal {
    /// Forwards `batch` (records of `replica`'s outbox) in one transaction; see the module doc. Idempotent: a
    /// record whose key is already in `records` adds nothing.
    pub async fn forward(
        &self,
        replica: &str,
        batch: &[OutboxRecord],
        rules: &IngestRules,
    ) -> Result<ForwardSummary, PgError> {
        let plain = match self.forward_known(replica, batch, rules).await {
            Ok(Some(s)) => return Ok(s),
            // Not every resource's spelling known, an hour before `frozen_through`, or `frozen_through` moved:
            // looked up in the transaction.
            Ok(None) => self.forward_as(replica, batch, rules, Insert::Plain).await,
            Err(e) => Err(e),
        };
        match plain {
            // A key the fleet has already (a batch forwarded again, an id sent through two replicas): nothing of
            // the plain attempt committed; again, skipping what is there.
            Err(e) if is_known_record(&e) => {
                self.forward_as(replica, batch, rules, Insert::SkipExisting)
                    .await
            }
            other => other,
        }
    }

    /// The common case in two round trips, without lookups: every resource's spelling is in the cache and every
    /// record's hour is at or after the cached `frozen_through`, so no key can have its event (see
    /// [`ForwardCache`]). BEGIN, then one pipelined round trip: [`FROZEN_THROUGH_IS`] (the judgement still
    /// holds), the plain insert of the records, [`ADD_TOTALS_ALL`], the carries, COMMIT. A statement that fails
    /// makes the ones after it fail and the `COMMIT` roll back, so nothing commits unless all succeeded. `None`
    /// when it does not apply or `frozen_through` has moved (nothing committed).
    async fn forward_known(
        &self,
        replica: &str,
        batch: &[OutboxRecord],
        rules: &IngestRules,
    ) -> Result<Option<ForwardSummary>, PgError> {
        let Some(frozen_through) = self.forward_cache.frozen_through() else {
            return Ok(None);
        };
        let (recs, copies) = one_per_key(batch);
        if recs.is_empty()
            || recs
                .iter()
                .any(|r| hour_of_secs(r.event_time) < frozen_through)
        {
            return Ok(None);
        }
        let Some(spelling) = self.forward_cache.spellings_of(&recs) else {
            return Ok(None);
        };
        let now = rules.now.timestamp();
        let target = hour_of_secs(now).max(frozen_through);
        let rows = Rows::judge(&recs, &spelling, |_, _, _| false, target, rules)?;
        let n = recs.len();
        let carried = rows.carried;
        let a = SumArrays::of(rows.sums, rows.carries);
        let to_add = a.tr.len() as i64;
        let any_carry = !a.cr.is_empty();

        let client = Pipelined(Some(self.client().await?));
        let (guard, ins, tot, car) = tokio::try_join!(
            client.prepare_cached(FROZEN_THROUGH_IS),
            client.prepare_cached(INSERT_RECORDS),
            client.prepare_cached(ADD_TOTALS_ALL),
            client.prepare_cached(ADD_CARRIES),
        )?;
        client.batch_execute("BEGIN").await?;
        let records: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &rows.k, &replica, &rows.res, &rows.plan, &rows.dim, &rows.et, &rows.oh, &rows.hr,
            &rows.q, &rows.ra, &now,
        ];
        let totals: [&(dyn tokio_postgres::types::ToSql + Sync); 8] =
            [&a.tr, &a.tp, &a.td, &a.th, &a.tq, &a.tn, &a.tc, &to_add];
        let carries: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&a.cr, &a.cp, &a.cd, &a.cf, &a.ch, &a.cq, &now];
        let judged_by: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&frozen_through, &i64::MIN];
        // Sent in this order in one round trip: `join!` polls its futures in order the first time, and each sends
        // its statement when first polled. A statement that fails before it is sent (an error encoding its
        // parameters) fails in that first poll, before the COMMIT is polled: then ROLLBACK is sent instead, so
        // the statements after it never commit without it. (One that fails in PostgreSQL fails the rest and
        // turns the COMMIT into a rollback there.)
        let failed = std::sync::atomic::AtomicBool::new(false);
        let noted = |r: Result<(), tokio_postgres::Error>| {
            if r.is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            r
        };
        let (guarded, ins, tot, car, commit) = tokio::join!(
            async { noted(client.query_one(&guard, &judged_by).await.map(|_| ())) },
            async { noted(client.execute(&ins, &records).await.map(|_| ())) },
            async { noted(client.query_one(&tot, &totals).await.map(|_| ())) },
            async {
                if any_carry {
                    noted(client.execute(&car, &carries).await.map(|_| ()))
                } else {
                    Ok(())
                }
            },
            async {
                let end = if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    "ROLLBACK"
                } else {
                    "COMMIT"
                };
                client.batch_execute(end).await
            },
        );
        // The COMMIT answered: the connection is out of the transaction (committed, or rolled back if anything
        // before it failed).
        commit?;
        client.done();
        match guarded {
            Err(e) if is_refused(&e) => return Ok(None),
            other => {
                other?;
            }
        }
        ins?;
        match tot {
            Err(e) if is_refused(&e) => {
                // Judged again with the lookups next time (the retry finds the freeze's `frozen_through`).
                *self
                    .forward_cache
                    .frozen_through
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                return Err(frozen_meanwhile(1));
            }
            other => {
                other?;
            }
        }
        car?;
        Ok(Some(ForwardSummary {
            inserted: n,
            duplicates: copies,
            carried,
        }))
    }

    async fn forward_as(
        &self,
        replica: &str,
        batch: &[OutboxRecord],
        rules: &IngestRules,
        insert: Insert,
    ) -> Result<ForwardSummary, PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = rules.now.timestamp();
        let (recs, copies) = one_per_key(batch);
        let mut summary = ForwardSummary {
            duplicates: copies,
            ..Default::default()
        };
        if recs.is_empty() {
            tx.commit().await?;
            return Ok(summary);
        }

        // Spellings: the fleet's first spelling of each resource, in folded order (the lock order of new ones).
        let mut spellings: Vec<(String, String)> = Vec::new();
        let mut seen = HashSet::new();
        for r in &recs {
            let f = r.resource.to_ascii_lowercase();
            if seen.insert(f.clone()) {
                spellings.push((f, r.resource.clone()));
            }
        }
        spellings.sort();
        let (folded, given): (Vec<String>, Vec<String>) = spellings.into_iter().unzip();
        // The keys (folded resource, dimension, hour) whose event may exist already, in order.
        let mut lookup: Vec<(String, String, i64)> = recs
            .iter()
            .map(|r| {
                (
                    r.resource.to_ascii_lowercase(),
                    r.dimension.clone(),
                    hour_of_secs(r.event_time),
                )
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        lookup.sort();
        let (lr, ld, lh): (Vec<String>, Vec<String>, Vec<i64>) = lookup.into_iter().fold(
            (Vec::new(), Vec::new(), Vec::new()),
            |mut acc, (r, d, h)| {
                acc.0.push(r);
                acc.1.push(d);
                acc.2.push(h);
                acc
            },
        );
        // One round trip, three statements pipelined (run in this order): new spellings inserted (RETURNING
        // them) and known ones read; where late usage goes; which keys already have their event (through the
        // spellings, which the first statement has just completed).
        let (spell, meta, events) = tokio::try_join!(
            tx.prepare_cached(
                "WITH new AS (
                     INSERT INTO resource_spellings (folded, spelling)
                     SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (folded) DO NOTHING
                     RETURNING folded, spelling)
                 SELECT folded, spelling FROM new
                 UNION ALL
                 SELECT folded, spelling FROM resource_spellings WHERE folded = ANY($1)",
            ),
            tx.prepare_cached("SELECT value FROM meta WHERE key = 'frozen_through'"),
            tx.prepare_cached(
                "SELECT k.f, o.dimension, o.hour FROM unnest($1::text[], $2::text[], $3::int8[]) AS k(f, d, h)
                 JOIN resource_spellings s ON s.folded = k.f
                 JOIN outbound_events o ON o.resource = s.spelling AND o.dimension = k.d AND o.hour = k.h",
            ),
        )?;
        let keys: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&lr, &ld, &lh];
        let spell_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&folded, &given];
        let (spelled, meta, events) = tokio::try_join!(
            tx.query(&spell, &spell_params),
            tx.query_opt(&meta, &[]),
            tx.query(&events, &keys)
        )?;
        let spelling: HashMap<String, String> = spelled
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let frozen_through: i64 = meta.map(|row| row.get(0)).unwrap_or(i64::MIN);
        let target = hour_of_secs(now).max(frozen_through);
        let frozen: HashSet<(String, String, i64)> = events
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();

        // Each record's hour, then insert; only the inserted ones count.
        let rows = Rows::judge(
            &recs,
            &spelling,
            |f, d, h| frozen.contains(&(f.to_string(), d.to_string(), h)),
            target,
            rules,
        )?;
        let n = recs.len();
        let records: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &rows.k, &replica, &rows.res, &rows.plan, &rows.dim, &rows.et, &rows.oh, &rows.hr,
            &rows.q, &rows.ra, &now,
        ];
        let (to_add, added) = match insert {
            Insert::Plain => {
                // Every record is new (else the insert fails and the forward runs again, skipping what is there):
                // the totals and carries are the sums above. Three statements pipelined in one round trip, run in
                // this order: records, totals, carries.
                summary.inserted = n;
                summary.carried = rows.carried;
                let a = SumArrays::of(rows.sums, rows.carries);
                let m = a.tr.len();
                let (ins, tot, car) = tokio::try_join!(
                    tx.prepare_cached(INSERT_RECORDS),
                    tx.prepare_cached(ADD_TOTALS),
                    tx.prepare_cached(ADD_CARRIES),
                )?;
                let totals: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                    [&a.tr, &a.tp, &a.td, &a.th, &a.tq, &a.tn, &a.tc];
                let carried: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                    [&a.cr, &a.cp, &a.cd, &a.cf, &a.ch, &a.cq, &now];
                let any_carry = !a.cr.is_empty();
                // Joined, not try-joined: the records' error (a known key) is the one to report, not the
                // "transaction aborted" of the statements after it.
                let (ins, tot, car) = tokio::join!(
                    tx.execute(&ins, &records),
                    tx.execute(&tot, &totals),
                    async {
                        if any_carry {
                            tx.execute(&car, &carried).await.map(|_| ())
                        } else {
                            Ok(())
                        }
                    }
                );
                ins?;
                let added = tot?;
                car?;
                (m as i64, added as i64)
            }
            Insert::SkipExisting => {
                let forward = tx.prepare_cached(FORWARD_SKIPPING_EXISTING).await?;
                let row = tx.query_one(&forward, &records).await?;
                let (inserted, carried, to_add, added): (i64, i64, i64, i64) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                summary.inserted = inserted as usize;
                summary.carried = carried as usize;
                (to_add, added)
            }
        };
        summary.duplicates += n - summary.inserted;
        if added < to_add {
            // A freeze on another replica won these totals between the lookup and the upsert. Nothing of this
            // transaction commits; the retry sees their events and carries the records.
            return Err(frozen_meanwhile(to_add - added));
        }
        tx.commit().await?;
        // What was read holds for the next batches (see `ForwardCache`).
        self.forward_cache.remember(&spelling, frozen_through);
        Ok(summary)
    }

    /// The fleet's hourly totals of `resource` (any spelling) as (plan, dimension, hour, quantity, records,
    /// carried_in), for tests and `meterd forward`'s summary.
    pub async fn totals_of(
        &self,
        resource: &str,
    ) -> Result<Vec<(String, String, i64, i64, i64, i64)>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT plan, dimension, hour, quantity, records, carried_in FROM hourly_totals
                 WHERE lower(resource) = lower($1) ORDER BY hour, dimension, plan",
                &[&resource],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect())
    }

    /// How many records the fleet journal holds.
    pub async fn record_count(&self) -> Result<i64, PgError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT COUNT(*) FROM records", &[])
            .await?
            .get(0))
    }
}
