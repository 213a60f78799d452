//! Usage records and hourly totals: what ingest writes and what reports read.

use super::JournalError;
use crate::config::LateUsage;
use crate::outcome::Outcome;
use crate::quantity::Micros;
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

// The hour helpers belong to the rules layer ([`crate::clock`]); re-exported here for callers that reach them
// through the journal's face.
pub use crate::clock::{HOUR, fmt_time, hour_of, to_utc};

/// One validated record ready to be journaled.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// SaaS subscription id (lower-case GUID) or managed app resource URI.
    pub resource: String,
    /// Plan id if the application gave one.
    pub plan: Option<String>,
    /// Declared dimension.
    pub dimension: String,
    /// When the usage happened.
    pub time: DateTime<Utc>,
    /// How much.
    pub quantity: Micros,
    /// Idempotency key.
    pub key: Option<String>,
}

/// Rules ingest applies inside the transaction.
#[derive(Debug, Clone, Copy)]
pub struct IngestRules {
    /// Now, from the clock.
    pub now: DateTime<Utc>,
    /// Late usage policy.
    pub late: LateUsage,
    /// Retries of hour H stop at `H + 24h - safety_margin` (`emit.safety_margin`).
    pub safety_margin: Duration,
    /// A closed hour takes late usage only while `H + 24h - safety_margin - min_send_time` is ahead
    /// (`emit.min_send_time`).
    pub min_send_time: Duration,
    /// Fleet mode: each stored record waits in the local outbox (`forward_pending = 1`) until the forwarder has
    /// put it into the shared PostgreSQL journal.
    pub outbox: bool,
}

impl IngestRules {
    /// The last instant (exclusive) at which a record of `hour` still goes into its own hour: after it, too little
    /// of the marketplace's window is left to send it.
    pub fn sendable_until(&self, hour: i64) -> i64 {
        hour + 24 * HOUR - self.safety_margin.num_seconds() - self.min_send_time.num_seconds()
    }
}

/// What an ingest request did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IngestOutcome {
    /// Records newly stored (including carried ones).
    pub accepted: usize,
    /// Records whose key was already stored.
    pub duplicates: usize,
    /// Records stored in a later hour than their own (late usage, carried forward).
    pub carried: usize,
}

/// A record refused under `late_usage = "reject"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LateRecord {
    /// Position in the request.
    pub index: usize,
    /// Why it is late.
    pub message: String,
}

/// The first hour the last freeze pass left open (`meta.frozen_through`, never moves backwards). Every total of an
/// earlier hour was frozen by that pass; late usage may add keys of earlier hours since, which the next pass
/// freezes. Late usage is carried into this hour or later, whose keys are never frozen yet.
pub fn frozen_through(conn: &Connection) -> Result<i64, JournalError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'frozen_through'")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(i64::MIN))
}

/// Where late usage goes: the open hour, or the first hour the last freeze pass left open if the clock is
/// behind it (no key of that hour or later is frozen, so the carried units are sent with it).
pub fn carry_target(conn: &Connection, now: DateTime<Utc>) -> Result<i64, JournalError> {
    Ok(hour_of(now).max(frozen_through(conn)?))
}

/// Whether the key (resource, dimension, hour) already has its outbound event (frozen, sending or settled).
pub fn key_frozen(
    conn: &Connection,
    resource: &str,
    dimension: &str,
    hour: i64,
) -> Result<bool, JournalError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM outbound_events WHERE resource = ?1 AND dimension = ?2 AND hour = ?3",
        )?
        .exists(params![resource, dimension, hour])?)
}

/// The journaled spelling of `resource`: the first spelling ever seen of it, compared ASCII case-insensitively
/// (resource ids and managed-app URIs are case-insensitive on the marketplace). `None` when it is new.
pub fn known_spelling(conn: &Connection, resource: &str) -> Result<Option<String>, JournalError> {
    Ok(conn
        .prepare_cached("SELECT spelling FROM resource_spellings WHERE folded = ?1")?
        .query_row([resource.to_ascii_lowercase()], |r| r.get(0))
        .optional()?)
}

/// Why a record of `hour` cannot go into its own hour, if it cannot: its key is already frozen, or too little of
/// the hour's window is left to send it. Freezing is per key, so a late record for a key that has no outbound
/// event yet goes into its own hour even when other keys of that hour are frozen.
///
/// `watermark` is `frozen_through`: outbound events exist only for earlier hours, so a record of that hour or
/// later (the open hour, the usual case) needs no lookup.
fn lateness(
    conn: &Connection,
    resource: &str,
    dimension: &str,
    hour: i64,
    watermark: i64,
    rules: &IngestRules,
) -> Result<Option<String>, JournalError> {
    let until = rules.sendable_until(hour);
    if until <= rules.now.timestamp() {
        return Ok(Some(format!(
            "the hour {} can no longer be sent: its 24-hour window (less emit.safety_margin and \
             emit.min_send_time) ended at {}",
            fmt_time(hour),
            fmt_time(until)
        )));
    }
    if hour < watermark && key_frozen(conn, resource, dimension, hour)? {
        return Ok(Some(format!(
            "the hour {} is already closed and frozen for sending for {resource}/{dimension}",
            fmt_time(hour)
        )));
    }
    Ok(None)
}

/// Journals `records` (already validated) in the caller's transaction.
///
/// Each record goes into its own hour unless it is late (see `lateness`); a late record goes into the open hour
/// with a `carries` row naming where it came from. Returns `Ok(Err(late))` without writing anything when the
/// policy is `reject` and some record is late. Every spelling of a resource is stored as its first spelling.
pub fn ingest(
    conn: &Connection,
    records: &[NewRecord],
    rules: &IngestRules,
) -> Result<Result<IngestOutcome, Vec<LateRecord>>, JournalError> {
    if rules.late != LateUsage::Reject {
        let mut group = IngestGroup::default();
        let outcome =
            ingest_carrying(conn, records, rules, &mut group, false)?.ok_or_else(|| {
                JournalError::Invalid(
                    "the carrying path without its precheck did not answer".into(),
                )
            })?;
        group.flush(conn)?;
        return Ok(Ok(outcome));
    }
    let watermark = frozen_through(conn)?;
    let target = hour_of(rules.now).max(watermark);
    let mut seen: HashSet<&str> = HashSet::new();
    let mut exists = conn.prepare_cached("SELECT 1 FROM usage_records WHERE idem_key = ?1")?;
    // Resources of this request: (folded, journaled spelling, new to the journal), found by the spelling as given
    // (the common case: one spelling repeated) or else by the folded form.
    let mut names: Vec<(String, String, bool)> = Vec::new();
    let mut by_given: HashMap<&str, usize> = HashMap::new();
    let mut by_folded: HashMap<String, usize> = HashMap::new();
    // (resource, dimension, hour) -> why it is late, decided once per key and request.
    let mut late_keys: HashMap<(usize, &str, i64), Option<String>> = HashMap::new();
    // Phase 1: decide each record's fate without writing, so `reject` stores nothing.
    let mut plan: Vec<Option<(i64, usize)>> = Vec::with_capacity(records.len());
    let mut late = Vec::new();
    for (index, r) in records.iter().enumerate() {
        if let Some(k) = r.key.as_deref()
            && (!seen.insert(k) || exists.exists([k])?)
        {
            plan.push(None);
            continue;
        }
        let name = match by_given.get(&r.resource.as_str()) {
            Some(&i) => i,
            None => {
                let folded = r.resource.to_ascii_lowercase();
                let i = match by_folded.get(&folded) {
                    Some(&i) => i,
                    None => {
                        let (spelling, new) = match known_spelling(conn, &r.resource)? {
                            Some(s) => (s, false),
                            None => (r.resource.clone(), true),
                        };
                        names.push((folded.clone(), spelling, new));
                        by_folded.insert(folded, names.len() - 1);
                        names.len() - 1
                    }
                };
                by_given.insert(r.resource.as_str(), i);
                i
            }
        };
        let hour = hour_of(r.time);
        let why = match late_keys.get(&(name, r.dimension.as_str(), hour)) {
            Some(w) => w.clone(),
            None => {
                let w = lateness(conn, &names[name].1, &r.dimension, hour, watermark, rules)?;
                late_keys.insert((name, r.dimension.as_str(), hour), w.clone());
                w
            }
        };
        match why {
            None => plan.push(Some((hour, name))),
            Some(message) => {
                late.push(LateRecord { index, message });
                plan.push(Some((target, name)));
            }
        }
    }
    if rules.late == LateUsage::Reject && !late.is_empty() {
        return Ok(Err(late));
    }
    // Phase 2: write.
    let mut remember = conn.prepare_cached(
        "INSERT INTO resource_spellings (folded, spelling) VALUES (?1, ?2) ON CONFLICT (folded) DO NOTHING",
    )?;
    for (folded, spelling, new) in &names {
        if *new {
            remember.execute(params![folded, spelling])?;
        }
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at, forward_pending)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let outbox = i64::from(rules.outbox);
    let mut outcome = IngestOutcome::default();
    let now = rules.now.timestamp();
    // Hourly totals touched by this request, in first-seen order: (key, quantity, records, carried_in).
    type TotalKey<'a> = (&'a str, &'a str, &'a str, i64);
    let mut totals: Vec<(TotalKey, i64, i64, i64)> = Vec::new();
    let mut totals_index: HashMap<TotalKey, usize> = HashMap::new();
    for (r, decided) in records.iter().zip(plan) {
        let Some((hour, name)) = decided else {
            outcome.duplicates += 1;
            continue;
        };
        let resource = names[name].1.as_str();
        let origin = hour_of(r.time);
        let plan_id = r.plan.as_deref().unwrap_or("");
        insert.execute(params![
            r.key,
            resource,
            plan_id,
            r.dimension,
            r.time.timestamp(),
            origin,
            hour,
            r.quantity.0,
            now,
            outbox
        ])?;
        let carried = if hour != origin { r.quantity.0 } else { 0 };
        // Summed per hourly total and written once per total below (a batch of 1,000 records of one
        // resource and dimension is one upsert, not 1,000).
        let slot = *totals_index
            .entry((resource, plan_id, r.dimension.as_str(), hour))
            .or_insert_with(|| {
                totals.push(((resource, plan_id, r.dimension.as_str(), hour), 0, 0, 0));
                totals.len() - 1
            });
        let t = &mut totals[slot];
        t.1 = t.1.checked_add(r.quantity.0).ok_or_else(|| {
            JournalError::Invalid(format!(
                "the hourly total of {}/{} at {} would overflow",
                resource,
                r.dimension,
                fmt_time(hour)
            ))
        })?;
        t.2 += 1;
        t.3 += carried;
        if hour != origin {
            record_carry(
                conn,
                resource,
                plan_id,
                &r.dimension,
                origin,
                hour,
                r.quantity.0,
                "late",
                None,
                now,
            )?;
            outcome.carried += 1;
        }
        outcome.accepted += 1;
    }
    for ((resource, plan_id, dimension, hour), quantity, records, carried) in totals {
        add_to_hour(
            conn, resource, plan_id, dimension, hour, quantity, records, carried,
        )?;
    }
    Ok(Ok(outcome))
}

/// What the ingest jobs of one writer transaction share (issue 15): the watermark and the resources' spellings
/// they read, and the hourly totals they add to, summed per key and written once per key, by [`IngestGroup::flush`],
/// before the transaction commits and before any other job runs in it (so a freeze job in the same transaction
/// sees every total first, invariants 5 and 6). Only the writer's grouped jobs ([`ingest_grouped`]) keep one
/// across jobs; [`ingest`] uses one of its own and flushes it before it returns.
///
/// What it holds is what the transaction holds: the writer drops it with the transaction, flushes it before any
/// job that may read or change hourly totals, `meta` or `outbound_events`, and forgets its reads after such a job
/// ([`IngestGroup::forget`]). A grouped job adds to it only what it wrote (a job that fails after a write loses
/// the whole transaction, see `journal::run_transaction`).
#[derive(Debug, Default)]
pub struct IngestGroup {
    /// `meta.frozen_through`, once read.
    watermark: Option<i64>,
    /// Folded resource -> its journaled spelling (`None`: not journaled), once read or written.
    spellings: SmallIndex<String, Option<String>>,
    /// Hourly totals touched, in first-seen order (the order the per-job upserts had).
    totals: Vec<PendingTotal>,
    /// Resource -> the slots of its totals in `totals`: found by `&str` without building a key (issue 15: the
    /// key of owned strings cost three allocations per stored record); a resource has few totals per transaction.
    index: SmallIndex<String, Vec<usize>>,
}

/// An hourly total as the transaction sees it: `base` as read from the table, plus what the group added.
#[derive(Debug)]
struct PendingTotal {
    resource: String,
    plan: String,
    dimension: String,
    hour: i64,
    /// The row's quantity when first touched (0 if none).
    base: i64,
    quantity: i64,
    records: i64,
    carried_in: i64,
}

impl PendingTotal {
    fn current(&self) -> i64 {
        // Never overflows: every addition was checked against it.
        self.base + self.quantity
    }
}

impl IngestGroup {
    fn watermark(&mut self, conn: &Connection) -> Result<i64, JournalError> {
        if let Some(w) = self.watermark {
            return Ok(w);
        }
        let w = frozen_through(conn)?;
        self.watermark = Some(w);
        Ok(w)
    }

    fn spelling(
        &mut self,
        conn: &Connection,
        folded: &str,
    ) -> Result<Option<String>, JournalError> {
        if let Some(s) = self.spellings.get(folded) {
            return Ok(s.clone());
        }
        let s = known_spelling(conn, folded)?;
        self.spellings.insert(folded.to_string(), s.clone());
        Ok(s)
    }

    /// The slot of a total, its current quantity read from the table the first time.
    fn slot(
        &mut self,
        conn: &Connection,
        resource: &str,
        plan: &str,
        dimension: &str,
        hour: i64,
    ) -> Result<usize, JournalError> {
        if let Some(slots) = self.index.get(resource)
            && let Some(&i) = slots.iter().find(|&&i| {
                let t = &self.totals[i];
                t.hour == hour && t.dimension == dimension && t.plan == plan
            })
        {
            return Ok(i);
        }
        let base: i64 = conn
            .prepare_cached(
                "SELECT quantity FROM hourly_totals WHERE resource = ?1 AND plan = ?2 AND dimension = ?3 AND hour = ?4",
            )?
            .query_row(params![resource, plan, dimension, hour], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        self.totals.push(PendingTotal {
            resource: resource.to_string(),
            plan: plan.to_string(),
            dimension: dimension.to_string(),
            hour,
            base,
            quantity: 0,
            records: 0,
            carried_in: 0,
        });
        let i = self.totals.len() - 1;
        match self.index.get_mut(resource) {
            Some(slots) => slots.push(i),
            None => {
                self.index.insert(resource.to_string(), vec![i]);
            }
        }
        Ok(i)
    }

    /// Adds one stored record to its total, refusing an overflow (as `add_to_hour` does).
    fn add(&mut self, slot: usize, quantity: i64, carried: bool) -> Result<(), JournalError> {
        let t = &mut self.totals[slot];
        if t.current().checked_add(quantity).is_none() {
            return Err(JournalError::Invalid(format!(
                "the hourly total of {}/{} at {} would overflow",
                t.resource,
                t.dimension,
                fmt_time(t.hour)
            )));
        }
        t.quantity += quantity;
        t.records += 1;
        if carried {
            t.carried_in += quantity;
        }
        Ok(())
    }

    /// Writes every total added to (one upsert per key, in first-seen order) and keeps the reads: after it, the
    /// table holds what the group held.
    pub fn flush(&mut self, conn: &Connection) -> Result<(), JournalError> {
        if self.totals.iter().any(|t| t.records > 0) {
            let mut upsert = conn.prepare_cached(
                "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, carried_in)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
                     quantity = quantity + excluded.quantity,
                     records = records + excluded.records,
                     carried_in = carried_in + excluded.carried_in",
            )?;
            for t in self.totals.iter().filter(|t| t.records > 0) {
                upsert.execute(params![
                    t.resource,
                    t.plan,
                    t.dimension,
                    t.hour,
                    t.quantity,
                    t.records,
                    t.carried_in
                ])?;
            }
        }
        for t in &mut self.totals {
            t.base += t.quantity;
            t.quantity = 0;
            t.records = 0;
            t.carried_in = 0;
        }
        Ok(())
    }

    /// Forgets every read (after a job that may have changed what was read). Call only after [`Self::flush`].
    pub fn forget(&mut self) {
        debug_assert!(self.totals.iter().all(|t| t.records == 0));
        *self = IngestGroup::default();
    }
}

/// [`ingest`] for the writer's grouped jobs: the records are journaled with the transaction's shared
/// [`IngestGroup`] (the hourly totals are written by its flush, once per key per transaction) and without a
/// savepoint of their own. So that such a job cannot fail once it wrote, everything that could refuse it is
/// checked before its first write: `Ok(None)` (nothing written) asks the writer to run the request as an ordinary
/// job in a savepoint instead: under `late_usage = "reject"` (it must know every record's fate first), and when a
/// total could overflow (the exact check, on what is stored, is [`ingest`]'s).
pub fn ingest_grouped(
    conn: &Connection,
    records: &[NewRecord],
    rules: &IngestRules,
    group: &mut IngestGroup,
) -> Result<Option<IngestOutcome>, JournalError> {
    if rules.late == LateUsage::Reject {
        return Ok(None);
    }
    ingest_carrying(conn, records, rules, group, true)
}

/// [`ingest`] under a policy that refuses nothing (`late_usage = "carry"`): one pass over the records, each an
/// `INSERT ... ON CONFLICT (idem_key) DO NOTHING` whose change count says whether it was new (issue 15: one
/// statement per record instead of a lookup and an insert; the `reject` policy keeps its two phases, it must know
/// every record's fate before it writes any). Same outcome, same rows, same order of writes per total as the
/// two-phase path: a duplicate adds nothing and is never carried, a resource's first spelling is remembered only
/// when one of its records is stored, and each hourly total is added to `group` (written by its flush).
///
/// With `precheck` every read comes before the first write, and `Ok(None)` (nothing written) is returned when a
/// total could overflow, counting every record of the request as stored (a bound: duplicates add nothing).
fn ingest_carrying(
    conn: &Connection,
    records: &[NewRecord],
    rules: &IngestRules,
    group: &mut IngestGroup,
    precheck: bool,
) -> Result<Option<IngestOutcome>, JournalError> {
    let watermark = group.watermark(conn)?;
    let target = hour_of(rules.now).max(watermark);
    let now = rules.now.timestamp();
    // Fleet mode: a stored record waits in the local outbox for the forwarder.
    let outbox = i64::from(rules.outbox);
    // Resources of this request: (folded, journaled spelling, new to the journal, a record of it was stored).
    let mut names: Vec<(String, String, bool, bool)> = Vec::new();
    let mut by_given: SmallIndex<&str, usize> = SmallIndex::default();
    let mut by_folded: SmallIndex<String, usize> = SmallIndex::default();
    let mut late_keys: SmallIndex<(usize, &str, i64), bool> = SmallIndex::default();
    // Reads first: each record's resource, hour and lateness.
    let mut decided: Vec<(usize, i64, bool)> = Vec::with_capacity(records.len());
    // The previous record's resource, dimension and hour with what was decided for them: consecutive records of
    // one key (a batch of one resource and dimension) are decided without a lookup (issue 15: a hash per map).
    let mut last: Option<(&str, &str, i64, usize, bool)> = None;
    for r in records {
        let origin = hour_of(r.time);
        if let Some((resource, dimension, hour, name, late)) = last
            && hour == origin
            && resource == r.resource
            && dimension == r.dimension
        {
            decided.push((name, if late { target } else { origin }, late));
            continue;
        }
        let name = match by_given.get(&r.resource.as_str()) {
            Some(&i) => i,
            None => {
                let folded = r.resource.to_ascii_lowercase();
                let i = match by_folded.get(&folded) {
                    Some(&i) => i,
                    None => {
                        let (spelling, new) = match group.spelling(conn, &folded)? {
                            Some(s) => (s, false),
                            None => (r.resource.clone(), true),
                        };
                        names.push((folded.clone(), spelling, new, false));
                        by_folded.insert(folded, names.len() - 1);
                        names.len() - 1
                    }
                };
                by_given.insert(r.resource.as_str(), i);
                i
            }
        };
        let late = match late_keys.get(&(name, r.dimension.as_str(), origin)) {
            Some(&l) => l,
            None => {
                let l = lateness(conn, &names[name].1, &r.dimension, origin, watermark, rules)?
                    .is_some();
                late_keys.insert((name, r.dimension.as_str(), origin), l);
                l
            }
        };
        last = Some((
            r.resource.as_str(),
            r.dimension.as_str(),
            origin,
            name,
            late,
        ));
        decided.push((name, if late { target } else { origin }, late));
    }
    if precheck && !fits(conn, records, &decided, &names, group)? {
        return Ok(None);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at, forward_pending)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (idem_key) DO NOTHING",
    )?;
    let mut outcome = IngestOutcome::default();
    // The total the previous stored record went to: (name, plan, dimension, hour) -> slot (slots stay valid for
    // the group's life; a name's spelling no longer changes once one of its records is stored).
    let mut last_slot: Option<(usize, &str, &str, i64, usize)> = None;
    for (r, &(name, hour, late)) in records.iter().zip(&decided) {
        let origin = hour_of(r.time);
        let plan_id = r.plan.as_deref().unwrap_or("");
        if names[name].2 && !names[name].3 {
            // A resource new to the journal is journaled as the spelling of its first record stored, not of a
            // duplicate before it (as the two-phase path, which never looks at duplicates' resources).
            names[name].1 = r.resource.clone();
        }
        let stored = insert.execute(params![
            r.key,
            names[name].1,
            plan_id,
            r.dimension,
            r.time.timestamp(),
            origin,
            hour,
            r.quantity.0,
            now,
            outbox
        ])? == 1;
        if !stored {
            outcome.duplicates += 1;
            continue;
        }
        names[name].3 = true;
        let slot = match last_slot {
            Some((n, p, d, h, slot))
                if n == name && h == hour && p == plan_id && d == r.dimension =>
            {
                slot
            }
            _ => {
                let slot = group.slot(conn, &names[name].1, plan_id, &r.dimension, hour)?;
                last_slot = Some((name, plan_id, r.dimension.as_str(), hour, slot));
                slot
            }
        };
        group.add(slot, r.quantity.0, late)?;
        if late {
            record_carry(
                conn,
                &names[name].1,
                plan_id,
                &r.dimension,
                origin,
                hour,
                r.quantity.0,
                "late",
                None,
                now,
            )?;
            outcome.carried += 1;
        }
        outcome.accepted += 1;
    }
    let mut remember = conn.prepare_cached(
        "INSERT INTO resource_spellings (folded, spelling) VALUES (?1, ?2) ON CONFLICT (folded) DO NOTHING",
    )?;
    for (folded, spelling, new, used) in &names {
        if *new && *used {
            remember.execute(params![folded, spelling])?;
            group
                .spellings
                .insert(folded.clone(), Some(spelling.clone()));
        }
    }
    Ok(Some(outcome))
}

/// A map for the few keys of one request or one writer transaction (most requests have one record: one resource,
/// one key; a transaction of single-record requests has one resource or a few), read by a linear scan while it
/// holds at most [`SmallIndex::FEW`] keys and by a hash map after (issue 15: the three hash maps of each request
/// and the two of each transaction cost a random state, a SipHash per lookup and an allocation per first insert,
/// for one key each).
#[derive(Debug)]
struct SmallIndex<K, V> {
    few: Vec<(K, V)>,
    many: HashMap<K, V>,
}

impl<K, V> Default for SmallIndex<K, V> {
    fn default() -> Self {
        Self {
            few: Vec::new(),
            many: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq, V> SmallIndex<K, V> {
    /// Most keys scanned before the index moves into the hash map.
    const FEW: usize = 8;

    fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if self.many.is_empty() {
            self.few
                .iter()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v)
        } else {
            self.many.get(key)
        }
    }

    fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if self.many.is_empty() {
            self.few
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v)
        } else {
            self.many.get_mut(key)
        }
    }

    /// Sets `key` to `value`, in place if it is there.
    fn insert(&mut self, key: K, value: V) {
        if let Some(v) = self.get_mut(&key) {
            *v = value;
            return;
        }
        if self.many.is_empty() && self.few.len() < Self::FEW {
            self.few.push((key, value));
            return;
        }
        if self.many.is_empty() {
            self.many.extend(self.few.drain(..));
        }
        self.many.insert(key, value);
    }
}

/// Whether every total the request touches stays in range whichever of its records are stored (all of them
/// counted, positive and negative quantities apart), on top of what the table and the group hold.
fn fits(
    conn: &Connection,
    records: &[NewRecord],
    decided: &[(usize, i64, bool)],
    names: &[(String, String, bool, bool)],
    group: &mut IngestGroup,
) -> Result<bool, JournalError> {
    // (name, plan, dimension, hour) -> (sum of the positive quantities, sum of the negative ones), first seen first.
    type Key<'a> = (usize, &'a str, &'a str, i64);
    let mut sums: Vec<(Key, (i64, i64))> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    let mut last: Option<(Key, usize)> = None;
    for (r, &(name, hour, _)) in records.iter().zip(decided) {
        let key = (
            name,
            r.plan.as_deref().unwrap_or(""),
            r.dimension.as_str(),
            hour,
        );
        let i = match last {
            // Consecutive records of one key: no lookup.
            Some((k, i)) if k == key => i,
            _ => {
                let i = *index.entry(key).or_insert_with(|| {
                    sums.push((key, (0, 0)));
                    sums.len() - 1
                });
                last = Some((key, i));
                i
            }
        };
        let s = &mut sums[i].1;
        let q = r.quantity.0;
        let part = if q >= 0 { &mut s.0 } else { &mut s.1 };
        match part.checked_add(q) {
            Some(v) => *part = v,
            None => return Ok(false),
        }
    }
    for ((name, plan, dimension, hour), (up, down)) in sums {
        let (_, spelling, new, _) = &names[name];
        // A resource new to the journal has no total yet (the group journals a spelling with its first total).
        let current = if *new {
            0
        } else {
            let slot = group.slot(conn, spelling, plan, dimension, hour)?;
            group.totals[slot].current()
        };
        if current.checked_add(up).is_none() || current.checked_add(down).is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Adds `quantity` (and `records`) to an hourly total, refusing an overflow.
#[allow(clippy::too_many_arguments)]
pub fn add_to_hour(
    conn: &Connection,
    resource: &str,
    plan: &str,
    dimension: &str,
    hour: i64,
    quantity: i64,
    records: i64,
    carried_in: i64,
) -> Result<(), JournalError> {
    let current: Option<i64> = conn
        .prepare_cached(
            "SELECT quantity FROM hourly_totals WHERE resource = ?1 AND plan = ?2 AND dimension = ?3 AND hour = ?4",
        )?
        .query_row(params![resource, plan, dimension, hour], |r| r.get(0))
        .optional()?;
    if current.unwrap_or(0).checked_add(quantity).is_none() {
        return Err(JournalError::Invalid(format!(
            "the hourly total of {resource}/{dimension} at {} would overflow",
            fmt_time(hour)
        )));
    }
    conn.prepare_cached(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, carried_in)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
             quantity = quantity + excluded.quantity,
             records = records + excluded.records,
             carried_in = carried_in + excluded.carried_in",
    )?
    .execute(params![
        resource, plan, dimension, hour, quantity, records, carried_in
    ])?;
    Ok(())
}

/// Records that `quantity` moved from `from` to `to`.
#[allow(clippy::too_many_arguments)]
pub fn record_carry(
    conn: &Connection,
    resource: &str,
    plan: &str,
    dimension: &str,
    from: i64,
    to: i64,
    quantity: i64,
    reason: &str,
    outbound_id: Option<i64>,
    now: i64,
) -> Result<(), JournalError> {
    if outbound_id.is_some() {
        conn.prepare_cached(
            "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, outbound_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![resource, plan, dimension, from, to, quantity, reason, outbound_id, now])?;
    } else {
        conn.prepare_cached(
            "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (resource, plan, dimension, from_hour, to_hour, reason) WHERE outbound_id IS NULL
             DO UPDATE SET quantity = quantity + excluded.quantity",
        )?
        .execute(params![resource, plan, dimension, from, to, quantity, reason, now])?;
    }
    Ok(())
}

/// One hourly total with what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HourlyRow {
    /// Subscription or resource URI.
    pub resource: String,
    /// Plan as given on the records, else the plan it was sent with, else ''.
    pub plan: String,
    /// Dimension.
    pub dimension: String,
    /// Hour start, RFC 3339.
    pub hour: String,
    /// Exact total, decimal.
    pub quantity: String,
    /// Total in micro-units.
    pub quantity_micros: i64,
    /// Records counted.
    pub records: i64,
    /// Part of the total carried in from earlier hours, micro-units.
    pub carried_in_micros: i64,
    /// `open`, `closed` (waiting to be frozen), `pending`, or the final outcome.
    pub outcome: String,
    /// Marketplace usage event id when accepted.
    pub usage_event_id: Option<String>,
    /// Where the quantity went when it was carried, RFC 3339.
    pub carried_to: Option<String>,
    /// Last error while sending.
    pub last_error: Option<String>,
    /// Usage of the hour's event covered by the plan's included quantity (billing policy), decimal.
    pub included: Option<String>,
    /// Quantity the hour's event billed (sent), in billing units, decimal.
    pub billed: Option<String>,
    /// Which pools covered how much of the hour's event, in draw order (`plan:<plan>` for the plan allowance).
    pub pools: Vec<PoolCover>,
}

/// What one pool covered of an outbound event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolCover {
    /// Pool id.
    pub id: String,
    /// Quantity covered, decimal.
    pub quantity: String,
}

/// Which pools covered how much of outbound event `id` (billed under `plan`, `included` covered in all): the
/// recorded draws, and the plan allowance's part (`included` minus them).
pub fn pool_covers(
    conn: &Connection,
    id: i64,
    plan: &str,
    included: i64,
) -> Result<Vec<PoolCover>, JournalError> {
    let has_pools: bool = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'pool_draws'",
        )?
        .query_row([], |r| r.get::<_, i64>(0))?
        == 1;
    let mut draws: Vec<(String, i64)> = Vec::new();
    if has_pools {
        let mut stmt = conn.prepare_cached(
            "SELECT pool_id, quantity FROM pool_draws WHERE outbound_id = ?1 ORDER BY pool_id",
        )?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        draws = rows.collect::<Result<_, _>>()?;
    }
    let plan_part = included - draws.iter().map(|d| d.1).sum::<i64>();
    let mut out: Vec<PoolCover> = draws
        .into_iter()
        .map(|(id, q)| PoolCover {
            id,
            quantity: Micros(q).to_decimal_string(),
        })
        .collect();
    if plan_part > 0 {
        out.push(PoolCover {
            id: crate::pools::plan_pool_id(plan),
            quantity: Micros(plan_part).to_decimal_string(),
        });
    }
    Ok(out)
}

/// A quantity moved between hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CarryRow {
    /// Subscription or resource URI.
    pub resource: String,
    /// Plan.
    pub plan: String,
    /// Dimension.
    pub dimension: String,
    /// From hour.
    pub from_hour: String,
    /// To hour.
    pub to_hour: String,
    /// Quantity, decimal.
    pub quantity: String,
    /// `late` or `expired`.
    pub reason: String,
}

/// Filter for reports.
#[derive(Debug, Clone, Default)]
pub struct ReportFilter {
    /// Only this resource (any letter case: resource ids and URIs are case-insensitive).
    pub resource: Option<String>,
    /// Hours at or after this instant.
    pub from: Option<DateTime<Utc>>,
    /// Hours before this instant.
    pub to: Option<DateTime<Utc>>,
}

/// Hourly totals with their outcomes, oldest first.
pub fn hourly_report(
    conn: &Connection,
    filter: &ReportFilter,
    now: DateTime<Utc>,
    grace: Duration,
) -> Result<Vec<HourlyRow>, JournalError> {
    let from = filter.from.map(|t| t.timestamp()).unwrap_or(i64::MIN);
    let to = filter.to.map(|t| t.timestamp()).unwrap_or(i64::MAX);
    let open_hour = hour_of(now);
    let closed_before = hour_of(now - Duration::hours(1) - grace) + HOUR;
    let mut stmt = conn.prepare_cached(
        "SELECT h.resource, h.plan, h.dimension, h.hour, h.quantity, h.records, h.carried_in,
                o.state, o.usage_event_id, o.carried_to, o.last_error, o.plan, o.included, o.send_quantity, o.id
         FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
         WHERE (?1 IS NULL OR h.resource = ?1 COLLATE NOCASE)
           AND h.hour >= ?2 AND h.hour < ?3
         ORDER BY h.hour, h.resource, h.dimension, h.plan",
    )?;
    let rows = stmt.query_map(params![filter.resource, from, to], |r| {
        let hour: i64 = r.get(3)?;
        let qty: i64 = r.get(4)?;
        let state: Option<String> = r.get(7)?;
        let carried_to: Option<i64> = r.get(9)?;
        let plan: String = r.get(1)?;
        let sent_plan: Option<String> = r.get(11)?;
        let cover: Option<(i64, String, i64)> =
            match (r.get::<_, Option<i64>>(14)?, r.get::<_, Option<i64>>(12)?) {
                (Some(id), Some(included)) => {
                    Some((id, sent_plan.clone().unwrap_or_default(), included))
                }
                _ => None,
            };
        let outcome = match (state, carried_to) {
            (Some(s), Some(_)) if s == Outcome::Expired.as_str() => Outcome::Carried.to_string(),
            (Some(s), _) => s,
            (None, _) if hour >= open_hour => "open".to_string(),
            (None, _) if hour >= closed_before => "closing".to_string(),
            (None, _) => "closed".to_string(),
        };
        Ok(HourlyRow {
            resource: r.get(0)?,
            plan: if plan.is_empty() {
                sent_plan.unwrap_or_default()
            } else {
                plan
            },
            dimension: r.get(2)?,
            hour: fmt_time(hour),
            quantity: Micros(qty).to_decimal_string(),
            quantity_micros: qty,
            records: r.get(5)?,
            carried_in_micros: r.get(6)?,
            outcome,
            usage_event_id: r.get(8)?,
            carried_to: carried_to.map(fmt_time),
            last_error: r.get(10)?,
            included: r
                .get::<_, Option<i64>>(12)?
                .map(|q| Micros(q).to_decimal_string()),
            billed: r
                .get::<_, Option<i64>>(13)?
                .map(|q| Micros(q).to_decimal_string()),
            pools: Vec::new(),
        })
        .map(|row| (row, cover))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mut row, cover) = row?;
        if let Some((id, plan, included)) = cover {
            row.pools = pool_covers(conn, id, &plan, included)?;
        }
        out.push(row);
    }
    Ok(out)
}

/// Quantities moved between hours, oldest first.
pub fn carry_report(
    conn: &Connection,
    filter: &ReportFilter,
) -> Result<Vec<CarryRow>, JournalError> {
    let from = filter.from.map(|t| t.timestamp()).unwrap_or(i64::MIN);
    let to = filter.to.map(|t| t.timestamp()).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(
        "SELECT resource, plan, dimension, from_hour, to_hour, quantity, reason FROM carries
         WHERE (?1 IS NULL OR resource = ?1 COLLATE NOCASE)
           AND from_hour >= ?2 AND from_hour < ?3
         ORDER BY from_hour, resource, dimension",
    )?;
    let rows = stmt.query_map(params![filter.resource, from, to], |r| {
        Ok(CarryRow {
            resource: r.get(0)?,
            plan: r.get(1)?,
            dimension: r.get(2)?,
            from_hour: fmt_time(r.get(3)?),
            to_hour: fmt_time(r.get(4)?),
            quantity: Micros(r.get(5)?).to_decimal_string(),
            reason: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Number of raw records (for tests and status).
pub fn record_count(conn: &Connection) -> Result<i64, JournalError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM usage_records", [], |r| r.get(0))?)
}

/// Deletes raw records older than the dedupe window (their sums stay in `hourly_totals`), never one still waiting
/// in the fleet outbox (`forward_pending = 1`). Returns rows deleted.
pub fn compact_records(
    conn: &Connection,
    now: DateTime<Utc>,
    dedupe_window: Duration,
    limit: i64,
) -> Result<usize, JournalError> {
    let before = (now - dedupe_window).timestamp();
    Ok(conn
        .prepare_cached("DELETE FROM usage_records WHERE seq IN (SELECT seq FROM usage_records WHERE received_at < ?1 AND forward_pending = 0 ORDER BY received_at LIMIT ?2)")?
        .execute(params![before, limit])?)
}

/// Retention's statements (`?1` the cutoff hour). Each reads only what is older than the cutoff, through an index:
/// they run on every pass, on journals of years of hours, so none may scan the totals or the events (a
/// `outbound_id IN (SELECT id FROM outbound_events WHERE state != 'pending')` materialised every settled event's
/// id on every pass, and `state != 'pending'` cannot use the `(state, hour)` index).
const RETAIN_MONTHS: &str = "INSERT INTO usage_months (resource, dimension, month, quantity)
     SELECT resource, dimension, CAST(strftime('%s', hour, 'unixepoch', 'start of month') AS INTEGER), SUM(quantity)
     FROM hourly_totals INDEXED BY hourly_totals_hour WHERE hour < ?1 AND outbound_id IS NOT NULL
       AND EXISTS (SELECT 1 FROM outbound_events o WHERE o.id = hourly_totals.outbound_id AND o.state != 'pending')
     GROUP BY 1, 2, 3
     ON CONFLICT (resource, dimension, month) DO UPDATE SET quantity = quantity + excluded.quantity";
const RETAIN_TOTALS: &str = "DELETE FROM hourly_totals INDEXED BY hourly_totals_hour WHERE hour < ?1
       AND outbound_id IS NOT NULL
       AND EXISTS (SELECT 1 FROM outbound_events o WHERE o.id = hourly_totals.outbound_id AND o.state != 'pending')";
/// Every settled state stored in `outbound_events.state`, as an SQL list: what retention deletes and retires.
macro_rules! settled_states {
    () => {
        "'included', 'remainder', 'accepted', 'duplicate', 'duplicate_mismatch', 'expired',
         'expired_unconfirmed', 'rejected', 'skipped_unsubscribed', 'not_active'"
    };
}
/// The usage of the settled totals [`RETAIN_TOTALS`] deletes, per billing term of their events (the balance's
/// `usage` of a term reaches back past retention).
const RETIRE_USAGE: &str = "INSERT INTO retired_overage (resource, dimension, term_start, usage)
     SELECT h.resource, h.dimension, o.term_start, SUM(h.quantity - h.prebilled)
     FROM hourly_totals h INDEXED BY hourly_totals_hour JOIN outbound_events o ON o.id = h.outbound_id
     WHERE h.hour < ?1 AND h.outbound_id IS NOT NULL AND o.state != 'pending' AND o.term_start IS NOT NULL
     GROUP BY 1, 2, 3
     ON CONFLICT (resource, dimension, term_start) DO UPDATE SET usage = usage + excluded.usage";
/// What the events [`RETAIN_EVENTS`] deletes had frozen and the marketplace accepted, per billing term (a
/// balance's `overage_frozen` / `overage_accepted` stay exact for a term longer than retention).
const RETIRE_OVERAGE: &str = concat!(
    "INSERT INTO retired_overage (resource, dimension, term_start, frozen, accepted, events)
     SELECT resource, dimension, term_start, SUM(send_quantity),
            SUM(CASE WHEN state IN ('accepted', 'duplicate') THEN send_quantity ELSE 0 END), COUNT(*)
     FROM outbound_events WHERE hour < ?1 AND state IN (",
    settled_states!(),
    ") AND term_start IS NOT NULL
     GROUP BY 1, 2, 3
     ON CONFLICT (resource, dimension, term_start) DO UPDATE SET frozen = frozen + excluded.frozen,
       accepted = accepted + excluded.accepted, events = events + excluded.events"
);
/// Every settled state by name (the `(state, hour)` index then reads each state's old range); a state not listed
/// is kept, never deleted.
const RETAIN_EVENTS: &str = concat!(
    "DELETE FROM outbound_events WHERE hour < ?1 AND state IN (",
    settled_states!(),
    ")"
);

/// Deletes what the retention settings no longer keep: hourly totals (and their settled outbound events and
/// carries) older than `retention`, and raw records past the dedupe window (their sums stay in the totals).
pub fn apply_retention(
    conn: &Connection,
    now: DateTime<Utc>,
    retention: Duration,
    dedupe_window: Duration,
) -> Result<(usize, usize), JournalError> {
    let cutoff = hour_of(now - retention);
    // Only settled totals go: a total not frozen yet is never deleted (the freeze pass runs first and freezes
    // every closed one; `journal.retention` is at least 25h + emit.grace). Their monthly sums stay
    // (`usage_months`, for `GET /v1/consumption?group_by=month`).
    conn.prepare_cached(RETAIN_MONTHS)?.execute([cutoff])?;
    conn.prepare_cached(RETIRE_USAGE)?.execute([cutoff])?;
    let hours = conn.prepare_cached(RETAIN_TOTALS)?.execute([cutoff])?;
    conn.prepare_cached(RETIRE_OVERAGE)?.execute([cutoff])?;
    conn.prepare_cached(RETAIN_EVENTS)?.execute([cutoff])?;
    conn.execute("DELETE FROM carries WHERE from_hour < ?1", [cutoff])?;
    conn.execute(
        "DELETE FROM alerts WHERE created_at < ?1 AND delivered_at IS NOT NULL",
        [cutoff],
    )?;
    let records = compact_records(conn, now, dedupe_window, 100_000)?;
    Ok((hours, records))
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    /// Retention runs on every pass: each of its statements reads the old range through an index, never every
    /// total or event (before, the settled-event subquery was materialised and the event delete scanned the table;
    /// on a 24-month journal one pass wrote tens of GB of temporary b-tree).
    #[test]
    fn retention_reads_only_the_old_range() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::journal::migrate(&mut c).unwrap();
        for sql in [
            RETAIN_MONTHS,
            RETIRE_USAGE,
            RETAIN_TOTALS,
            RETIRE_OVERAGE,
            RETAIN_EVENTS,
        ] {
            let plan: Vec<String> = c
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([0i64], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for line in &plan {
                assert!(
                    !line.starts_with("SCAN") && !line.contains("LIST SUBQUERY"),
                    "{sql}\n{plan:#?}"
                );
            }
        }
    }

    /// The settled states the event delete names are every outcome stored in `outbound_events.state` but
    /// `pending` (`carried` is shown, not stored): a new outcome must be added there or it is never deleted.
    #[test]
    fn retention_names_every_settled_state() {
        let named: std::collections::BTreeSet<&str> =
            RETAIN_EVENTS.split('\'').skip(1).step_by(2).collect();
        let settled: std::collections::BTreeSet<&str> = crate::outcome::Outcome::ALL
            .iter()
            .map(|o| o.as_str())
            .filter(|s| *s != "pending" && *s != "carried")
            .collect();
        assert_eq!(named, settled);
    }
}

#[cfg(test)]
mod tests {
    use super::SmallIndex;
    use std::collections::HashMap;

    /// The small index answers as a hash map does, below, at and past the size where it moves into one, for
    /// borrowed lookups and for a key set twice.
    #[test]
    fn the_small_index_answers_as_a_hash_map() {
        for n in [0usize, 1, 2, 7, 8, 9, 30] {
            let mut small: SmallIndex<String, usize> = SmallIndex::default();
            let mut map: HashMap<String, usize> = HashMap::new();
            for i in 0..n {
                small.insert(format!("k{i}"), i);
                map.insert(format!("k{i}"), i);
                // Every other key set again: replaced in place, not added twice.
                if i % 2 == 0 {
                    small.insert(format!("k{i}"), i + 100);
                    map.insert(format!("k{i}"), i + 100);
                }
            }
            for i in 0..n + 3 {
                let k = format!("k{i}");
                assert_eq!(small.get(k.as_str()), map.get(k.as_str()), "n {n} key {k}");
            }
            if let Some(v) = small.get_mut("k1") {
                *v = 7;
                *map.get_mut("k1").unwrap() = 7;
            }
            assert_eq!(small.get("k1"), map.get("k1"));
            assert_eq!(small.few.len() + small.many.len(), map.len(), "n {n}");
        }
    }
}
