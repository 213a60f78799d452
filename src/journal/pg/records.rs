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
//! Lock order: records by key, totals and carries by their key, so two replicas forwarding overlapping batches
//! cannot deadlock each other; a deadlock with a freeze is an error the forwarder retries (nothing committed).

use super::{PgError, PgJournal};
use crate::journal::outbox::OutboxRecord;
use crate::journal::usage::IngestRules;
use std::collections::{BTreeMap, HashMap, HashSet};

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

#[derive(Default)]
struct Sum {
    quantity: i64,
    records: i64,
    carried_in: i64,
}

fn overflow(k: &TotalKey) -> PgError {
    PgError::Unavailable(format!(
        "the fleet's hourly total of {}/{} at {} would overflow",
        k.0,
        k.2,
        crate::clock::fmt_time(k.3)
    ))
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = rules.now.timestamp();
        // Key order (lock order), one row per key.
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

        // Spellings: the fleet's first spelling of each resource.
        let mut folded: Vec<String> = Vec::new();
        let mut given: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for r in &recs {
            let f = r.resource.to_ascii_lowercase();
            if seen.insert(f.clone()) {
                folded.push(f);
                given.push(r.resource.clone());
            }
        }
        // One round trip: new spellings inserted (RETURNING them), known ones read.
        let spell = tx
            .prepare_cached(
                "WITH new AS (
                     INSERT INTO resource_spellings (folded, spelling)
                     SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (folded) DO NOTHING
                     RETURNING folded, spelling)
                 SELECT folded, spelling FROM new
                 UNION ALL
                 SELECT folded, spelling FROM resource_spellings WHERE folded = ANY($1)",
            )
            .await?;
        let spelling: HashMap<String, String> = tx
            .query(&spell, &[&folded, &given])
            .await?
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let resource_of = |r: &OutboxRecord| -> String {
            spelling
                .get(&r.resource.to_ascii_lowercase())
                .cloned()
                .unwrap_or_else(|| r.resource.clone())
        };

        let mut lookup: Vec<(String, String, i64)> = recs
            .iter()
            .map(|r| {
                (
                    resource_of(r),
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
        // Where late usage goes, and which keys already have their event: two reads, pipelined.
        let (meta, events) = tokio::try_join!(
            tx.prepare_cached("SELECT value FROM meta WHERE key = 'frozen_through'"),
            tx.prepare_cached(
                "SELECT o.resource, o.dimension, o.hour FROM outbound_events o
                 JOIN unnest($1::text[], $2::text[], $3::int8[]) AS k(r, d, h)
                   ON o.resource = k.r AND o.dimension = k.d AND o.hour = k.h",
            ),
        )?;
        let keys: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&lr, &ld, &lh];
        let (meta, events) = tokio::try_join!(tx.query_opt(&meta, &[]), tx.query(&events, &keys))?;
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
                || frozen.contains(&(resource.clone(), r.dimension.clone(), origin));
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
        let insert = tx
            .prepare_cached(
                "INSERT INTO records (idem_key, replica, resource, plan, dimension, event_time, origin_hour, hour,
                                      quantity, received_at, forwarded_at)
                 SELECT k, $2, r, p, d, e, o, h, q, ra, $11
                 FROM unnest($1::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[],
                             $9::int8[], $10::int8[]) AS t(k, r, p, d, e, o, h, q, ra)
                 ORDER BY k
                 ON CONFLICT (idem_key) DO NOTHING
                 RETURNING idem_key",
            )
            .await?;
        let inserted: HashSet<String> = tx
            .query(
                &insert,
                &[
                    &k, &replica, &res, &plan, &dim, &et, &oh, &hr, &q, &ra, &now,
                ],
            )
            .await?
            .into_iter()
            .map(|row| row.get(0))
            .collect();
        summary.inserted = inserted.len();
        summary.duplicates += n - inserted.len();

        // Sums per total (and per carry) of the inserted records.
        let mut totals: BTreeMap<TotalKey, Sum> = BTreeMap::new();
        for i in 0..n {
            if !inserted.contains(&k[i]) {
                continue;
            }
            let key = (res[i].clone(), plan[i].clone(), dim[i].clone(), hr[i]);
            let s = totals.entry(key.clone()).or_default();
            s.quantity = s.quantity.checked_add(q[i]).ok_or_else(|| overflow(&key))?;
            s.records += 1;
            if hr[i] != oh[i] {
                s.carried_in += q[i];
            }
        }
        let mut carries: BTreeMap<(String, String, String, i64, i64), i64> = BTreeMap::new();
        for i in 0..n {
            if inserted.contains(&k[i]) && hr[i] != oh[i] {
                summary.carried += 1;
                *carries
                    .entry((
                        res[i].clone(),
                        plan[i].clone(),
                        dim[i].clone(),
                        oh[i],
                        hr[i],
                    ))
                    .or_default() += q[i];
            }
        }
        let refused = upsert_totals(&tx, &totals).await?;
        if !refused.is_empty() {
            // A freeze on another replica won these totals between the lookup and the upsert. Nothing of this
            // transaction commits; the retry sees their events and carries the records.
            return Err(PgError::Unavailable(format!(
                "{} hourly total(s) were frozen by another replica during this forward; it is retried",
                refused.len()
            )));
        }
        if !carries.is_empty() {
            let mut cols = Columns::default();
            for ((r, p, d, from, to), qty) in &carries {
                cols.push(r, p, d, [*from, *to, *qty, 0]);
            }
            let carry = tx
                .prepare_cached(
                "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, created_at)
                 SELECT r, p, d, f, t, q, 'late', $7
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[])
                      AS c(r, p, d, f, t, q)
                 ON CONFLICT (resource, plan, dimension, from_hour, to_hour, reason) WHERE outbound_id IS NULL
                 DO UPDATE SET quantity = carries.quantity + excluded.quantity",
                )
                .await?;
            tx.execute(
                &carry,
                &[
                    &cols.resource,
                    &cols.plan,
                    &cols.dimension,
                    &cols.ints[0],
                    &cols.ints[1],
                    &cols.ints[2],
                    &now,
                ],
            )
            .await?;
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

/// Column arrays for one `unnest(...)` statement: the key's three text columns and up to four integers.
#[derive(Default)]
struct Columns {
    resource: Vec<String>,
    plan: Vec<String>,
    dimension: Vec<String>,
    ints: [Vec<i64>; 4],
}

impl Columns {
    fn push(&mut self, resource: &str, plan: &str, dimension: &str, ints: [i64; 4]) {
        self.resource.push(resource.to_string());
        self.plan.push(plan.to_string());
        self.dimension.push(dimension.to_string());
        for (col, v) in self.ints.iter_mut().zip(ints) {
            col.push(v);
        }
    }
}

/// Adds each sum to its total unless the total is frozen; returns the frozen ones (nothing added to them).
async fn upsert_totals(
    tx: &deadpool_postgres::Transaction<'_>,
    totals: &BTreeMap<TotalKey, Sum>,
) -> Result<Vec<TotalKey>, PgError> {
    if totals.is_empty() {
        return Ok(Vec::new());
    }
    let mut cols = Columns::default();
    for ((r, p, d, h), s) in totals {
        cols.push(r, p, d, [*h, s.quantity, s.records, s.carried_in]);
    }
    let upsert = tx
        .prepare_cached(
            "INSERT INTO hourly_totals AS t (resource, plan, dimension, hour, quantity, records, carried_in)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[],
                                  $7::int8[])
             ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
                 quantity = t.quantity + excluded.quantity,
                 records = t.records + excluded.records,
                 carried_in = t.carried_in + excluded.carried_in
             WHERE t.outbound_id IS NULL
             RETURNING resource, plan, dimension, hour",
        )
        .await?;
    let applied: HashSet<TotalKey> = tx
        .query(
            &upsert,
            &[
                &cols.resource,
                &cols.plan,
                &cols.dimension,
                &cols.ints[0],
                &cols.ints[1],
                &cols.ints[2],
                &cols.ints[3],
            ],
        )
        .await?
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    Ok(totals
        .keys()
        .filter(|k| !applied.contains(*k))
        .cloned()
        .collect())
}
