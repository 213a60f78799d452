//! The journal's typed face: one method per operation the layers above use.
//!
//! Each method is one read (a pooled read-only connection) or one write job (one savepoint of the writer's
//! transaction), exactly as the closure it replaced: an operation that was one job stays one job, so the
//! invariants of [`super`] hold. The `&Connection` functions of the sibling files are the SQLite side.
//!
//! A second backend (PostgreSQL) would implement the same set as a trait `Store`: the methods below with
//! `&self` receivers, the types of [`super::usage`], [`super::outbound`], [`super::status`] and
//! [`super::billing`] as arguments and answers, [`JournalError`] as the error, and "one method, one
//! transaction" as the contract.

use super::alerts::PendingAlert;
use super::billing::DimensionBalance;
use super::outbound::{Expired, FreezeSummary, PendingEvent, Settle, SettlePolicy};
use super::status::{EventLine, JournalStatus};
use super::subscriptions::{KnownSubscription, ListedSubscription};
use super::usage::{
    CarryRow, HourlyRow, IngestOutcome, IngestRules, LateRecord, NewRecord, ReportFilter,
};
use super::{
    Journal, JournalError, ReadOnlyJournal, alerts, billing, leases, outbound, status,
    subscriptions, usage,
};
use crate::alert_kind::AlertKey;
use crate::config::Settings;
use crate::outcome::Outcome;
use chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Ingest: one write job per request (group commit shares the transaction).
impl Journal {
    /// Journals one request's records (invariants 1, 2, 5): all accepted, or the late ones refused.
    ///
    /// A grouped job ([`Journal::write_grouped`]): under `late_usage = "carry_forward"` the request runs without a
    /// savepoint and its hourly totals are summed with the other requests of the transaction and written once per
    /// key ([`usage::ingest_grouped`]); under `reject`, or when a total could overflow, it runs as before, in a
    /// savepoint ([`usage::ingest`]). Same rows and answers either way.
    pub async fn ingest(
        &self,
        records: Vec<NewRecord>,
        rules: IngestRules,
    ) -> Result<Result<IngestOutcome, Vec<LateRecord>>, JournalError> {
        self.write_grouped(move |c, group| match group {
            Some(g) => Ok(usage::ingest_grouped(c, &records, &rules, g)?.map(Ok)),
            None => usage::ingest(c, &records, &rules).map(Some),
        })
        .await
    }

    /// The hourly report and the carries for `filter`, read on one connection.
    pub async fn report(
        &self,
        filter: ReportFilter,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Result<(Vec<HourlyRow>, Vec<CarryRow>), JournalError> {
        self.read(move |c| {
            Ok((
                usage::hourly_report(c, &filter, now, grace)?,
                usage::carry_report(c, &filter)?,
            ))
        })
        .await
    }
}

/// Status, balances and consumption (reads).
impl Journal {
    /// The journal's figures at `now`.
    pub async fn status(&self, now: DateTime<Utc>) -> Result<JournalStatus, JournalError> {
        self.read(move |c| status::status(c, now)).await
    }

    /// Balances of one resource at `now`.
    pub async fn balance(
        &self,
        settings: Arc<Settings>,
        resource: String,
        now: DateTime<Utc>,
    ) -> Result<Vec<DimensionBalance>, JournalError> {
        self.read(move |c| billing::balance(c, &settings, &resource, now))
            .await
    }

    /// Consumption of one resource (one dimension, or all) in `[from, to)`.
    pub async fn consumption(
        &self,
        resource: String,
        dimension: Option<String>,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, i64)>, JournalError> {
        self.read(move |c| billing::consumption(c, &resource, dimension.as_deref(), from, to))
            .await
    }

    /// How many outbound events are `pending`.
    pub async fn pending_count(&self) -> Result<i64, JournalError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }
}

/// Alerts: due, delivered or failed.
impl Journal {
    /// The alerts due for delivery at `now`.
    pub async fn alerts_due(&self, now: DateTime<Utc>) -> Result<Vec<PendingAlert>, JournalError> {
        self.read(move |c| alerts::due(c, now)).await
    }

    /// Records one delivery attempt of alert `id`: delivered, or failed with its error and next attempt.
    pub async fn alert_attempted(
        &self,
        id: i64,
        attempts: i64,
        result: Result<DateTime<Utc>, (Option<String>, DateTime<Utc>)>,
    ) -> Result<(), JournalError> {
        self.write(move |c| match result {
            Ok(now) => alerts::delivered(c, id, attempts, now),
            Err((err, next)) => alerts::failed(c, id, attempts, err.as_deref(), next),
        })
        .await
    }
}

/// Leases (invariant 7) and subscriptions.
impl Journal {
    /// Takes or renews lease `name` for `owner`; `Err(holder)` when another owner holds it.
    pub async fn acquire_lease(
        &self,
        name: &'static str,
        owner: String,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Result<(), String>, JournalError> {
        self.write(move |c| leases::acquire_lease(c, name, &owner, now, ttl))
            .await
    }

    /// Gives lease `name` back if `owner` holds it.
    pub async fn release_lease(
        &self,
        name: &'static str,
        owner: String,
    ) -> Result<(), JournalError> {
        self.write(move |c| leases::release_lease(c, name, &owner))
            .await
    }

    /// Drops every lease (at `meterd run` start, under the journal lock); how many there were.
    pub async fn clear_leases(&self) -> Result<usize, JournalError> {
        self.write(leases::clear_leases).await
    }

    /// The subscriptions as last listed.
    pub async fn known_subscriptions(
        &self,
    ) -> Result<BTreeMap<String, KnownSubscription>, JournalError> {
        self.read(subscriptions::known_subscriptions).await
    }

    /// Stores a fresh subscription list seen at `now`.
    pub async fn store_subscriptions(
        &self,
        listed: Vec<ListedSubscription>,
        now: DateTime<Utc>,
    ) -> Result<(), JournalError> {
        self.write(move |c| subscriptions::store_subscriptions(c, &listed, now))
            .await
    }
}

/// Outbound events: due, next due, attempts.
impl Journal {
    /// At most `limit` events due at `now`, oldest first.
    pub async fn due_events(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<PendingEvent>, JournalError> {
        self.read(move |c| outbound::due_events(c, now, limit))
            .await
    }

    /// When the next retry is due (unix seconds), if any.
    pub async fn next_due(&self) -> Result<Option<i64>, JournalError> {
        self.read(outbound::next_due).await
    }

    /// Marks events `ids` in flight before their call (invariant 9).
    pub async fn mark_attempt(&self, ids: Vec<i64>) -> Result<(), JournalError> {
        self.write(move |c| outbound::mark_attempt(c, &ids)).await
    }

    /// One page of due events after id `after` (see [`outbound::due_page`]).
    pub async fn due_page(
        &self,
        now: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<PendingEvent>, JournalError> {
        self.read(move |c| outbound::due_page(c, now, after, limit))
            .await
    }

    /// Where a pass's first [`Journal::due_page`] starts.
    pub async fn first_pending_id(&self) -> Result<i64, JournalError> {
        self.read(outbound::first_pending_id).await
    }
}

/// What the emitter decided for one due event before the pass bills and sends.
#[derive(Debug, Clone)]
pub enum Disposition {
    /// Send it under `plan` (billed now, with its body, unless it already has a body).
    Send {
        /// The plan the event is billed and sent under.
        plan: String,
    },
    /// Settle it without a call (hold, defer, skip).
    Settle(Settle),
}

/// What a pass's opening job keeps and does (see [`Journal::open_pass`]).
#[derive(Debug, Clone)]
pub struct PassStart {
    /// Release subscription holds first (a flush asked for it).
    pub release_held: bool,
    /// `emit.grace`.
    pub grace: Duration,
    /// `emit.safety_margin`.
    pub margin: Duration,
    /// How expiries settle.
    pub policy: SettlePolicy,
    /// `alerts.pending_age`.
    pub pending_age: Duration,
    /// `journal.retention`.
    pub retention: Duration,
    /// `ingest.dedupe_window`.
    pub dedupe_window: Duration,
    /// Most hourly totals the opening job freezes; the rest by [`Journal::freeze_more`] (`usize::MAX`: all).
    pub freeze_limit: usize,
}

/// What a pass's opening job (or a later freeze chunk) did.
#[derive(Debug, Clone)]
pub struct Opened {
    /// What was frozen.
    pub frozen: FreezeSummary,
    /// Closed totals are left for [`Journal::freeze_more`].
    pub more: bool,
    /// Events ended by their deadline.
    pub expired: Vec<Expired>,
}

/// The emission pass: its opening job, its decisions, the settling of answers. Each is one write job.
impl Journal {
    /// One job: release holds (if asked), recover events left in flight, freeze due keys (at most
    /// `p.freeze_limit` totals; [`Opened::more`] says whether [`Journal::freeze_more`] has more), expire overdue
    /// events (raising their alerts), raise pending-age alerts and apply retention.
    pub async fn open_pass(
        &self,
        now: DateTime<Utc>,
        p: PassStart,
    ) -> Result<Opened, JournalError> {
        self.write(move |c| {
            if p.release_held {
                outbound::release_holds(c, now)?;
            }
            let recovered = outbound::recover_in_flight(c)?;
            if recovered > 0 {
                tracing::warn!(message = "Events were in flight when meterd stopped; they count as possibly recorded.", events = recovered);
            }
            let (frozen, more, expired) = freeze_and_expire(c, now, p.grace, p.margin, &p.policy, p.freeze_limit)?;
            alerts::raise_pending_age_alerts(c, now, p.pending_age)?;
            let (hours, records) = usage::apply_retention(c, now, p.retention, p.dedupe_window)?;
            if hours + records > 0 {
                tracing::info!(message = "Retention applied.", hourly_totals_deleted = hours, raw_records_compacted = records);
            }
            Ok(Opened { frozen, more, expired })
        })
        .await
    }

    /// One job: the next chunk of a pass's freezing (at most `limit` totals), and the expiry of what it froze
    /// past its window, as the opening job does.
    pub async fn freeze_more(
        &self,
        now: DateTime<Utc>,
        grace: Duration,
        margin: Duration,
        policy: SettlePolicy,
        limit: usize,
    ) -> Result<Opened, JournalError> {
        self.write(move |c| {
            let (frozen, more) = outbound::freeze_chunk(c, now, grace, margin, limit)?;
            // The opening job expired every overdue event; a later chunk only those it froze past their
            // deadline (finding them reads every pending event, which a pass of many chunks would repeat).
            let expired = if frozen.overdue > 0 {
                expire_with_alerts(c, now, &policy)?
            } else {
                Vec::new()
            };
            Ok(Opened {
                frozen,
                more,
                expired,
            })
        })
        .await
    }

    /// One job: settles what is not sent, bills what is sent for the first time and freezes its body (built by
    /// `body(event, plan, quantity to send)`). Returns what to send, the count per outcome settled, and the
    /// events it left for the next job: after each [`DISPOSE_STEP`] events it stops when another job is waiting
    /// for the writer ([`super::others_waiting`]), so a sender's mark or an ingest request does not wait for a
    /// whole page (issue 15). Events are disposed oldest hour first, then by resource; what is left is the
    /// rest of that order, so disposing it next gives the same billing order as one job would.
    #[allow(clippy::type_complexity)]
    pub async fn dispose<B>(
        &self,
        decided: Vec<(PendingEvent, Disposition)>,
        settings: Arc<Settings>,
        now: DateTime<Utc>,
        policy: SettlePolicy,
        body: B,
    ) -> Result<
        (
            Vec<PendingEvent>,
            BTreeMap<String, usize>,
            Vec<(PendingEvent, Disposition)>,
        ),
        JournalError,
    >
    where
        B: Fn(&PendingEvent, &str, i64) -> String + Send + 'static,
    {
        self.write(move |c| {
            let mut rest: Vec<(PendingEvent, Disposition)> = Vec::new();
            let mut sendable = Vec::new();
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            // Billed oldest hour first, then by resource id: subscriptions sharing a pool draw in a deterministic
            // order (journal::pools). What is sent keeps the order the pass decided.
            let mut decided: Vec<(usize, (PendingEvent, Disposition))> =
                decided.into_iter().enumerate().collect();
            decided.sort_by(|(i, (a, _)), (j, (b, _))| {
                (a.hour, a.resource.to_ascii_lowercase(), &a.dimension, i).cmp(&(
                    b.hour,
                    b.resource.to_ascii_lowercase(),
                    &b.dimension,
                    j,
                ))
            });
            let mut order: Vec<usize> = Vec::new();
            let mut decided = decided.into_iter();
            let mut done = 0usize;
            while let Some((position, (ev, decision))) = decided.next() {
                if done > 0 && done.is_multiple_of(DISPOSE_STEP) && super::others_waiting() {
                    rest.push((ev, decision));
                    rest.extend(decided.by_ref().map(|(_, d)| d));
                    break;
                }
                done += 1;
                let id = ev.id;
                match decision {
                    Disposition::Settle(s) => {
                        let state = outbound::settle(c, id, &s, now, &policy)?;
                        let name = match (&s, state) {
                            (Settle::Hold { .. }, _) => "held",
                            (Settle::Defer { .. }, _) => "deferred",
                            (_, st) => st.as_str(),
                        };
                        *counts.entry(name.to_string()).or_default() += 1;
                    }
                    Disposition::Send { plan } => {
                        if !ev.body.is_empty() {
                            order.push(position);
                            sendable.push(PendingEvent { plan, ..ev });
                            continue;
                        }
                        // Billed once, with the body: allowance, billing units, thresholds.
                        let bill = billing::bill(c, &settings, &ev, &plan, now)?;
                        if bill.send == 0 {
                            let state = outbound::settle_unbilled(c, id, &plan, &bill, now)?;
                            *counts.entry(state.to_string()).or_default() += 1;
                            continue;
                        }
                        let json = body(&ev, &plan, bill.send);
                        let body = outbound::set_body(c, id, &plan, &json, &bill)?;
                        order.push(position);
                        sendable.push(PendingEvent {
                            body,
                            plan,
                            send_quantity: Some(bill.send),
                            ..ev
                        });
                    }
                }
            }
            let mut sendable: Vec<(usize, PendingEvent)> =
                order.into_iter().zip(sendable).collect();
            sendable.sort_by_key(|(position, _)| *position);
            Ok((sendable.into_iter().map(|(_, e)| e).collect(), counts, rest))
        })
        .await
    }

    /// One job: raises the call's alert (if any), settles each answered event with its alerts, and returns the
    /// count per outcome.
    pub async fn settle_answers(
        &self,
        call_alert: Option<(AlertKey, serde_json::Value)>,
        settles: Vec<(i64, Settle)>,
        now: DateTime<Utc>,
        policy: SettlePolicy,
    ) -> Result<BTreeMap<String, usize>, JournalError> {
        self.write(move |c| settle_answers_in(c, call_alert.as_ref(), &settles, now, &policy))
            .await
    }

    /// One job, one commit: settles the answers of a sender's last call (as [`Journal::settle_answers`]), then marks
    /// the events of its next call in flight (as [`Journal::mark_attempt`]). The call starts only after this
    /// commit, so a crash during it still finds the events in flight (ambiguous), and the answers of the last
    /// call cost no commit of their own (issue 15: one durable commit per call slot instead of two).
    pub async fn settle_and_mark(
        &self,
        answered: Option<Answers>,
        mark: Vec<i64>,
        policy: SettlePolicy,
    ) -> Result<BTreeMap<String, usize>, JournalError> {
        self.write(move |c| {
            let counts = match &answered {
                Some(a) => settle_answers_in(c, a.call_alert.as_ref(), &a.settles, a.now, &policy)?,
                None => BTreeMap::new(),
            };
            outbound::mark_attempt(c, &mark)?;
            Ok(counts)
        })
        .await
    }
}

/// Events a dispose job ([`Journal::dispose`]) handles between two looks at whether another job waits.
const DISPOSE_STEP: usize = 100;

/// The answers of one marketplace call, to settle (see [`Journal::settle_and_mark`]).
#[derive(Debug, Clone)]
pub struct Answers {
    /// The call's alert, if it raised one.
    pub call_alert: Option<(AlertKey, serde_json::Value)>,
    /// How each event of the call settles.
    pub settles: Vec<(i64, Settle)>,
    /// When the answer came.
    pub now: DateTime<Utc>,
}

fn freeze_and_expire(
    c: &rusqlite::Connection,
    now: DateTime<Utc>,
    grace: Duration,
    margin: Duration,
    policy: &SettlePolicy,
    limit: usize,
) -> Result<(FreezeSummary, bool, Vec<Expired>), JournalError> {
    let (f, more) = outbound::freeze_chunk(c, now, grace, margin, limit)?;
    Ok((f, more, expire_with_alerts(c, now, policy)?))
}

/// Expires every overdue pending event, raising the alert of each that ends `expired_unconfirmed`.
fn expire_with_alerts(
    c: &rusqlite::Connection,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<Vec<Expired>, JournalError> {
    let e = outbound::expire_overdue(c, now, policy)?;
    for x in e.iter().filter(|x| x.state == Outcome::ExpiredUnconfirmed) {
        alerts::raise_expired_unconfirmed(c, x.id, now)?;
    }
    Ok(e)
}

fn settle_answers_in(
    c: &rusqlite::Connection,
    call_alert: Option<&(AlertKey, serde_json::Value)>,
    settles: &[(i64, Settle)],
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<BTreeMap<String, usize>, JournalError> {
    if let Some((dedupe, body)) = call_alert {
        alerts::raise(c, dedupe, body.clone(), now)?;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (id, s) in settles {
        let state = outbound::settle(c, *id, s, now, policy)?;
        alerts::raise_for_settle(c, *id, s, now)?;
        if state == Outcome::ExpiredUnconfirmed {
            // A per-event `Expired` after an earlier ambiguous attempt: the same alert as an expiry.
            alerts::raise_expired_unconfirmed(c, *id, now)?;
        }
        let name = match (s, state) {
            (Settle::Hold { .. }, _) => "held",
            (Settle::Retry { .. }, _) => "retry",
            (_, st) => st.as_str(),
        };
        *counts.entry(name.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// The read-only commands' face (`status`, `report`, `balance`, `reconcile`, `flush`): the same reads on the
/// one read-only connection of a [`ReadOnlyJournal`], in the calling thread.
impl ReadOnlyJournal {
    /// The journal's figures at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> Result<JournalStatus, JournalError> {
        status::status(&self.conn, now)
    }

    /// The hourly report and the carries for `filter`.
    pub fn report(
        &self,
        filter: &ReportFilter,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> Result<(Vec<HourlyRow>, Vec<CarryRow>), JournalError> {
        Ok((
            usage::hourly_report(&self.conn, filter, now, grace)?,
            usage::carry_report(&self.conn, filter)?,
        ))
    }

    /// Balances of one resource at `now`.
    pub fn balance(
        &self,
        settings: &Settings,
        resource: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<DimensionBalance>, JournalError> {
        billing::balance(&self.conn, settings, resource, now)
    }

    /// Accepted quantities per (lower-cased resource, dimension) for hours in `[from, to)`.
    pub fn accepted_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<BTreeMap<(String, String), i64>, JournalError> {
        status::accepted_totals(&self.conn, from, to)
    }

    /// Outbound events frozen or finished at or after `since` (what one pass did).
    pub fn events_since(&self, since: DateTime<Utc>) -> Result<Vec<EventLine>, JournalError> {
        status::events_since(&self.conn, since)
    }
}
