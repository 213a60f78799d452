//! Sending one batch: the call, the split of a batch refused with 400, and the settlement of every event of it.

use super::RetryDelays;
use crate::alert_kind::AlertKey;
use crate::clock::{SharedClock, fmt_time, to_utc};
use crate::journal::outbound::{self, PendingEvent, Settle};
use crate::journal::{Answers, Journal};
use crate::marketplace::client::{CallError, MarketplaceClient};
use crate::marketplace::outcome::{
    Classified, SentKey, classify, match_results, settle, unmatched,
};
use crate::marketplace::types::batch_body;
use crate::ops::telemetry::{EventsSettled, InternalEvent};
use crate::quantity::Micros;
use crate::resource::ResourceRef;
use crate::settle::SettleContext;
use chrono::Duration;
use std::collections::BTreeMap;

/// What one sender's calls did.
#[derive(Debug, Default)]
pub(crate) struct BatchResult {
    /// Marketplace calls made.
    pub(crate) calls: usize,
    /// Events sent (counting each attempt).
    pub(crate) sent: usize,
    /// Outcomes settled, by name.
    pub(crate) outcomes: BTreeMap<String, usize>,
    /// An answer asked for a fresh look at the subscription list.
    pub(crate) recheck_subscriptions: bool,
}

/// Batches waiting for a sender: the pass fills it page by page, the `emit.concurrency` senders take from it.
pub(super) type Queue =
    std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Vec<PendingEvent>>>>;

/// One call slot: takes batches from `queue` until it is closed and empty, and sends each.
///
/// Each batch is marked in flight before its call in the same commit that settles the answers of this sender's
/// previous call ([`Journal::settle_and_mark`]): one durable commit per call instead of two, and the in-flight
/// mark still commits before the call starts (a crash during it leaves the attempt ambiguous). When no batch is
/// waiting, the last answers are settled at once rather than held back. A whole call refused with HTTP 400 is
/// sent again at once in halves, down to single events, so one malformed event keeps only itself pending
/// (retried and alerted as before) and the good ones go through.
pub(super) async fn sender(
    client: &MarketplaceClient,
    journal: &Journal,
    clock: &SharedClock,
    policy: outbound::SettlePolicy,
    delays: (RetryDelays, Duration),
    queue: Queue,
) -> anyhow::Result<BatchResult> {
    let mut total = BatchResult::default();
    // Halves of a batch refused with 400, sent before the next batch from the queue.
    let mut todo: Vec<Vec<PendingEvent>> = Vec::new();
    let mut answered: Option<Answers> = None;
    loop {
        let batch = match todo.pop() {
            Some(b) => Some(b),
            None => {
                // Another sender waiting on the queue holds its lock: nothing is waiting for this one either.
                let waiting = match queue.try_lock() {
                    Ok(mut q) => q.try_recv(),
                    Err(_) => Err(tokio::sync::mpsc::error::TryRecvError::Empty),
                };
                match waiting {
                    Ok(b) => Some(b),
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        // Nothing to send right now: settle the last answers without waiting for the next batch.
                        if let Some(a) = answered.take() {
                            add_settled(
                                &mut total,
                                journal
                                    .settle_and_mark(Some(a), Vec::new(), policy.clone())
                                    .await?,
                            );
                        }
                        let waited = std::time::Instant::now();
                        let next = queue.lock().await.recv().await;
                        metrics::histogram!("meterd_emit_wait_seconds", "on" => "queue")
                            .record(waited.elapsed().as_secs_f64());
                        next
                    }
                }
            }
        };
        let Some(batch) = batch else { break };
        let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
        let waited = std::time::Instant::now();
        let settled = journal
            .settle_and_mark(answered.take(), ids, policy.clone())
            .await?;
        metrics::histogram!("meterd_emit_wait_seconds", "on" => "journal")
            .record(waited.elapsed().as_secs_f64());
        add_settled(&mut total, settled);
        let mut r = call(client, clock, delays, batch).await;
        total.calls += 1;
        total.sent += r.sent;
        total.recheck_subscriptions |= r.recheck_subscriptions;
        if let Some((first, second)) = r.split.take() {
            todo.push(second);
            todo.push(first);
        }
        answered = Some(r.answers);
    }
    if let Some(a) = answered.take() {
        add_settled(
            &mut total,
            journal.settle_and_mark(Some(a), Vec::new(), policy).await?,
        );
    }
    Ok(total)
}

fn add_settled(total: &mut BatchResult, outcomes: BTreeMap<String, usize>) {
    for (k, n) in outcomes {
        EventsSettled {
            outcome: &k,
            count: n as u64,
        }
        .emit();
        *total.outcomes.entry(k).or_default() += n;
    }
}

/// What one call answered: how each event settles, and the halves to send when the call was refused with 400.
pub(crate) struct Called {
    pub(crate) answers: Answers,
    pub(crate) sent: usize,
    pub(crate) split: Option<(Vec<PendingEvent>, Vec<PendingEvent>)>,
    pub(crate) recheck_subscriptions: bool,
}

/// Sends `batch` (marked in flight already) and classifies the answer; writes nothing. (The fleet emitter's
/// workers call it too: `fleet::emit` commits a call's answers with the next call's mark, as [`sender`] does.)
pub(crate) async fn call(
    client: &MarketplaceClient,
    clock: &SharedClock,
    (delays, hold_recheck): (RetryDelays, Duration),
    batch: Vec<PendingEvent>,
) -> Called {
    let bodies: Vec<&str> = batch.iter().map(|e| e.body.as_str()).collect();
    let body = batch_body(&bodies);
    let started = std::time::Instant::now();
    let answer = client.batch_usage(&body).await;
    metrics::histogram!("meterd_marketplace_call_seconds", "call" => "batchUsageEvent")
        .record(started.elapsed().as_secs_f64());
    let now = clock.now();
    let mut result = Called {
        answers: Answers {
            call_alert: None,
            settles: Vec::new(),
            now,
        },
        sent: batch.len(),
        split: None,
        recheck_subscriptions: false,
    };
    let mut settles: Vec<(i64, Settle)> = Vec::with_capacity(batch.len());
    let mut call_alert: Option<(AlertKey, serde_json::Value)> = None;
    match answer {
        Ok(call) => {
            metrics::counter!("meterd_marketplace_calls_total", "call" => "batchUsageEvent", "status" => call.status.to_string()).increment(1);
            let keys: Vec<SentKey> = batch
                .iter()
                .map(|e| {
                    SentKey::new(
                        ResourceRef::parse(&e.resource),
                        e.plan.clone(),
                        e.dimension.clone(),
                        to_utc(e.hour),
                    )
                })
                .collect();
            let pairs = match_results(&keys, &call.response);
            for (i, r) in &pairs {
                let ev = &batch[*i];
                let sent_quantity = ev.send_quantity.unwrap_or(ev.quantity);
                let classified = classify(r, sent_quantity);
                // The log events of the answers that call for one (each with its alert).
                match &classified {
                    Classified::DuplicateMismatch {
                        ours_micros,
                        theirs_micros,
                    } => tracing::error!(
                        message = "The marketplace already holds another quantity for this hour; ours can never replace it.",
                        resource = %ev.resource, dimension = %ev.dimension, hour = %fmt_time(ev.hour),
                        ours = %Micros(*ours_micros), theirs = %Micros(*theirs_micros), alert = "duplicate_mismatch",
                        request_id = %call.ids.request_id
                    ),
                    Classified::NotAuthorized { message } => tracing::error!(
                        message = "This identity may not report usage for the resource (ResourceNotAuthorized).",
                        resource = %ev.resource, detail = %message, alert = "resource_not_authorized"
                    ),
                    Classified::Invalid { status, message } => tracing::error!(
                        message = "The marketplace rejected the event.", resource = %ev.resource, dimension = %ev.dimension,
                        plan = %ev.plan, status = %status.as_str(), detail = %message, alert = "rejected"
                    ),
                    _ => {}
                }
                let settlement = settle(
                    classified,
                    &SettleContext {
                        sent_quantity,
                        attempts: ev.attempts,
                        delays,
                        hold_recheck,
                    },
                    now,
                );
                result.recheck_subscriptions |= settlement.recheck_subscriptions;
                let settle = settlement.settle;
                settles.push((ev.id, settle));
            }
            for i in unmatched(&keys, &pairs) {
                let ev = &batch[i];
                settles.push((
                    ev.id,
                    Settle::Retry {
                        error: "the batch answer had no result for this event".into(),
                        next_at: now + delays.after(ev.attempts + 1),
                        ambiguous: true,
                    },
                ));
            }
            tracing::info!(
                message = "Batch sent.",
                request_id = %call.ids.request_id, correlation_id = %call.ids.correlation_id,
                events = batch.len(), results = call.response.result.len()
            );
        }
        Err(e) => {
            let status = e
                .status()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into());
            metrics::counter!("meterd_marketplace_calls_total", "call" => "batchUsageEvent", "status" => status).increment(1);
            let ambiguous = e.is_ambiguous();
            let ids = e.ids();
            let split = e.status() == Some(400) && batch.len() > 1;
            match &e {
                _ if split => tracing::warn!(
                    message = "Batch call refused with 400; sending it again in halves to isolate the event that caused it.",
                    error = %e, request_id = %ids.request_id, correlation_id = %ids.correlation_id, events = batch.len()
                ),
                CallError::Fatal { advice, .. } => tracing::error!(
                    message = "Batch call refused; the events stay pending and are retried.",
                    error = %e, advice = advice.as_deref().unwrap_or(""), request_id = %ids.request_id,
                    correlation_id = %ids.correlation_id, events = batch.len(), alert = "marketplace_call_refused"
                ),
                CallError::Transient { .. } => tracing::warn!(
                    message = "Batch call failed; retrying later.",
                    error = %e, ambiguous, request_id = %ids.request_id, correlation_id = %ids.correlation_id, events = batch.len()
                ),
            }
            if let Some(status @ (401 | 403)) = e.status() {
                // Repeated 401/403 means the identity is wrong: one alert per hour while it lasts.
                call_alert = Some((
                    AlertKey::marketplace_auth(status, crate::clock::hour_of(now)),
                    serde_json::json!({"status": status, "error": e.to_string(), "advice": e.advice().unwrap_or("")}),
                ));
            }
            if split {
                // Nothing was recorded (a 400 is a definite refusal); the halves are sent right away.
                for ev in &batch {
                    settles.push((
                        ev.id,
                        Settle::Retry {
                            error: e.to_string(),
                            next_at: now,
                            ambiguous: false,
                        },
                    ));
                }
                let mut first: Vec<PendingEvent> = batch
                    .iter()
                    .map(|ev| PendingEvent {
                        attempts: ev.attempts + 1,
                        ..ev.clone()
                    })
                    .collect();
                let second = first.split_off(first.len() / 2);
                result.split = Some((first, second));
            }
            for ev in batch.iter().filter(|_| !split) {
                let delay = delays.after_answer(ev.attempts + 1, e.retry_after());
                settles.push((
                    ev.id,
                    Settle::Retry {
                        error: e.to_string(),
                        next_at: now + delay,
                        ambiguous,
                    },
                ));
            }
        }
    }
    result.answers.call_alert = call_alert;
    result.answers.settles = settles;
    result
}
