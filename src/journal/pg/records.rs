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
//! Round trips per batch: BEGIN; the spellings, `meta.frozen_through` and the keys that have their event (three
//! statements pipelined in one round trip); then, when every key is new to the fleet (the common case), a plain
//! `INSERT` of the records, the batch's sums (aggregated here, one row per total) added to the hourly totals and
//! its carries, three statements pipelined in one round trip; COMMIT. A plain `INSERT` costs about half of
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
const ADD_TOTALS: &str = "INSERT INTO hourly_totals AS t (resource, plan, dimension, hour, quantity, records, carried_in)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
         AS s(resource, plan, dimension, hour, quantity, records, carried_in)
     ORDER BY hour, resource, dimension, plan
     ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
         quantity = t.quantity + excluded.quantity,
         records = t.records + excluded.records,
         carried_in = t.carried_in + excluded.carried_in
     WHERE t.outbound_id IS NULL";

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

impl PgJournal {
    /// Forwards `batch` (records of `replica`'s outbox) in one transaction; see the module doc. Idempotent: a
    /// record whose key is already in `records` adds nothing.
    pub async fn forward(
        &self,
        replica: &str,
        batch: &[OutboxRecord],
        rules: &IngestRules,
    ) -> Result<ForwardSummary, PgError> {
        match self.forward_as(replica, batch, rules, Insert::Plain).await {
            // A key the fleet has already (a batch forwarded again, an id sent through two replicas): nothing of
            // the plain attempt committed; again, skipping what is there.
            Err(e) if is_known_record(&e) => {
                self.forward_as(replica, batch, rules, Insert::SkipExisting)
                    .await
            }
            other => other,
        }
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
        // Key order (lock order: bytes, as `COLLATE "C"`), one row per key.
        let mut recs: Vec<&OutboxRecord> = batch.iter().collect();
        recs.sort_by(|a, b| a.idem_key.cmp(&b.idem_key));
        recs.dedup_by(|a, b| a.idem_key == b.idem_key);
        let mut summary = ForwardSummary {
            duplicates: batch.len() - recs.len(),
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
        let resource_of = |r: &OutboxRecord| -> String {
            spelling
                .get(&r.resource.to_ascii_lowercase())
                .cloned()
                .unwrap_or_else(|| r.resource.clone())
        };
        let frozen_through: i64 = meta.map(|row| row.get(0)).unwrap_or(i64::MIN);
        let target = hour_of_secs(now).max(frozen_through);
        let frozen: HashSet<(String, String, i64)> = events
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();

        // Each record's hour, then insert; only the inserted ones count.
        let n = recs.len();
        let (mut k, mut res, mut plan, mut dim) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut et, mut oh, mut hr, mut q, mut ra) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for r in &recs {
            let resource = resource_of(r);
            let origin = hour_of_secs(r.event_time);
            let late = rules.sendable_until(origin) <= now
                || frozen.contains(&(r.resource.to_ascii_lowercase(), r.dimension.clone(), origin));
            let hour = if late { target.max(origin) } else { origin };
            k.push(r.idem_key.clone());
            res.push(resource);
            plan.push(r.plan.clone());
            dim.push(r.dimension.clone());
            et.push(r.event_time);
            oh.push(origin);
            hr.push(hour);
            q.push(r.quantity);
            ra.push(r.received_at);
        }
        // Overflow is refused before anything is written (the sums of the records inserted are at most these).
        let mut sums: Sums = HashMap::new();
        let mut carries: HashMap<(String, String, String, i64, i64), i64> = HashMap::new();
        for i in 0..n {
            let key = (res[i].clone(), plan[i].clone(), dim[i].clone(), hr[i]);
            let s = sums.entry(key.clone()).or_default();
            s.0 = s.0.checked_add(q[i]).ok_or_else(|| overflow(&key))?;
            s.1 += 1;
            if hr[i] != oh[i] {
                s.2 = s.2.checked_add(q[i]).ok_or_else(|| overflow(&key))?;
                let c = carries
                    .entry((
                        res[i].clone(),
                        plan[i].clone(),
                        dim[i].clone(),
                        oh[i],
                        hr[i],
                    ))
                    .or_default();
                *c = c.checked_add(q[i]).ok_or_else(|| overflow(&key))?;
            }
        }
        let records: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &k, &replica, &res, &plan, &dim, &et, &oh, &hr, &q, &ra, &now,
        ];
        let (to_add, added) = match insert {
            Insert::Plain => {
                // Every record is new (else the insert fails and the forward runs again, skipping what is there):
                // the totals and carries are the sums above. Three statements pipelined in one round trip, run in
                // this order: records, totals, carries.
                summary.inserted = n;
                summary.carried = (0..n).filter(|&i| hr[i] != oh[i]).count();
                let m = sums.len();
                let (mut tr, mut tp, mut td, mut th) = (
                    Vec::with_capacity(m),
                    Vec::with_capacity(m),
                    Vec::with_capacity(m),
                    Vec::with_capacity(m),
                );
                let (mut tq, mut tn, mut tc) = (
                    Vec::with_capacity(m),
                    Vec::with_capacity(m),
                    Vec::with_capacity(m),
                );
                for ((r, p, d, h), (sq, sn, sc)) in sums {
                    tr.push(r);
                    tp.push(p);
                    td.push(d);
                    th.push(h);
                    tq.push(sq);
                    tn.push(sn);
                    tc.push(sc);
                }
                let (mut cr, mut cp, mut cd) = (Vec::new(), Vec::new(), Vec::new());
                let (mut cf, mut ch, mut cq) = (Vec::new(), Vec::new(), Vec::new());
                for ((r, p, d, f, h), q) in carries {
                    cr.push(r);
                    cp.push(p);
                    cd.push(d);
                    cf.push(f);
                    ch.push(h);
                    cq.push(q);
                }
                let (ins, tot, car) = tokio::try_join!(
                    tx.prepare_cached(INSERT_RECORDS),
                    tx.prepare_cached(ADD_TOTALS),
                    tx.prepare_cached(ADD_CARRIES),
                )?;
                let totals: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                    [&tr, &tp, &td, &th, &tq, &tn, &tc];
                let carried: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
                    [&cr, &cp, &cd, &cf, &ch, &cq, &now];
                let any_carry = !cr.is_empty();
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
            return Err(PgError::Unavailable(format!(
                "{} hourly total(s) were frozen by another replica during this forward; it is retried",
                to_add - added
            )));
        }
        tx.commit().await?;
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
