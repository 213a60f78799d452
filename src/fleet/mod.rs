//! Fleet mode's forward path (docs/fleet.md): the tasks that get this replica's acknowledged records from its
//! local SQLite outbox into the shared PostgreSQL journal, and publish its heartbeat and forward watermark.
//!
//! - The **forwarder** takes up to `fleet.forward_batch` records waiting in the outbox (oldest first), forwards
//!   them in one PostgreSQL transaction ([`PgJournal::forward`]: inserted once fleet-wide, added to the hourly
//!   totals by the late-usage rule), then clears their local mark; while a batch is in PostgreSQL the next one is
//!   read and the one before is marked ([`Forwarder`]). PostgreSQL unreachable: ingest keeps
//!   acknowledging (it needs only SQLite), the outbox and `meterd_fleet_forward_lag_seconds` grow, and the
//!   forwarder retries with exponential backoff (backon) until it gets through, by itself.
//! - The **heartbeat** upserts this replica's `replicas` row every `fleet.heartbeat`: heartbeat time, watermark
//!   (the `received_at` of the oldest record still waiting, else now), outbox size, version. A replica whose
//!   heartbeat is older than `fleet.replica_timeout` no longer holds back freezing. It also applies fleet mode's
//!   local retention hourly (the local SQLite emitter does not run in fleet mode), and starts the shared
//!   journal's hourly retention ([`retention_loop`]).
//!
//! Times on the replica side (`received_at`, `heartbeat_at`, `watermark`) come from the injected [`Clock`], so
//! tests drive them with a `ManualClock`.
//!
//! The fleet emitter (any replica freezes, claims, sends and settles) is [`emit`].
//!
//! [`Clock`]: crate::clock::Clock

pub mod emit;

use crate::clock::SharedClock;
use crate::config::{FleetSettings, Settings};
use crate::journal::Journal;
use crate::journal::pg::records::ForwardSummary;
use crate::journal::pg::replicas::ReplicaRow;
use crate::journal::pg::{PgError, PgJournal};
use crate::journal::usage::IngestRules;
use backon::{ExponentialBuilder, Retryable};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long the forwarder waits before looking at an empty outbox again.
pub const IDLE_POLL: Duration = Duration::from_millis(100);

/// Records received this close to the heartbeat may still be on their way into the journal (their `now` was
/// taken before the commit): the published watermark is at most `now - WATERMARK_SLACK`.
pub const WATERMARK_SLACK_SECS: i64 = 5;

/// What can go wrong on the forward path.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The shared journal.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The local journal.
    #[error("the local journal (outbox) failed: {0}")]
    Local(#[from] crate::journal::JournalError),
}

/// Connects to the fleet's PostgreSQL (lazily: nothing is sent yet) with `fleet.pool_size` connections.
pub fn connect(fleet: &FleetSettings) -> Result<PgJournal, PgError> {
    PgJournal::connect(&fleet.url, fleet.pool_size)
}

/// The late-usage rule's parameters at `now` (the same as ingest's).
pub fn rules(settings: &Settings, now: chrono::DateTime<chrono::Utc>) -> IngestRules {
    IngestRules {
        now,
        late: settings.late_usage,
        safety_margin: settings.emit.safety_margin,
        min_send_time: settings.emit.min_send_time,
        outbox: true,
    }
}

/// What forwarding did, added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Batches committed.
    pub batches: usize,
    /// Records new to the fleet.
    pub inserted: usize,
    /// Records already there (counted once).
    pub duplicates: usize,
    /// Inserted records carried into a later hour.
    pub carried: usize,
}

impl Forwarded {
    fn add(&mut self, s: ForwardSummary) {
        self.batches += 1;
        self.inserted += s.inserted;
        self.duplicates += s.duplicates;
        self.carried += s.carried;
    }

    fn merge(&mut self, o: Forwarded) {
        self.batches += o.batches;
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.carried += o.carried;
    }

    /// Records taken out of the outbox.
    pub fn records(&self) -> usize {
        self.inserted + self.duplicates
    }
}

/// How many forward transactions a streaming replica keeps in PostgreSQL at once, each a batch of its own on a
/// connection of its own (1 or 2). The second batch's records go in while the first one's totals and commit are
/// under way; where both add to the same hourly totals the second waits for the first's row locks (both take
/// them in the freeze's order, so they never deadlock).
pub const FORWARD_IN_FLIGHT: usize = 2;

/// Forwards one batch (at most `limit` records) and clears their local marks. `None` when the outbox is empty.
pub async fn forward_batch(
    journal: &Journal,
    pg: &PgJournal,
    replica: &str,
    settings: &Settings,
    clock: &SharedClock,
    limit: usize,
) -> Result<Option<ForwardSummary>, FleetError> {
    let mut f = Forwarder::new(journal, pg, replica, settings, clock, limit);
    f.in_flight = 1;
    let step = f.step().await?;
    f.flush().await?;
    Ok(step.map(|s| ForwardSummary {
        inserted: s.inserted,
        duplicates: s.duplicates,
        carried: s.carried,
    }))
}

/// The records of one step: up to [`FORWARD_IN_FLIGHT`] batches.
type Chunk = Vec<Vec<crate::journal::outbox::OutboxRecord>>;

/// A step's records (oldest first) as batches of at most `limit`. Two batches in flight that add to the same
/// hourly totals run one after the other (the second waits for the first's row locks until it commits), so
/// when the records fill two batches they are split by total (folded resource, plan, dimension, hour), every
/// total's records in one batch, the largest totals first into the emptier batch; only when that cannot fill
/// both within `limit` (one total with more records than that) are they split by `seq` instead. Each batch keeps
/// `seq` order.
fn split_by_total(mut all: Vec<crate::journal::outbox::OutboxRecord>, limit: usize) -> Chunk {
    if all.len() <= limit {
        return if all.is_empty() {
            Vec::new()
        } else {
            vec![all]
        };
    }
    if all.len() <= 2 * limit {
        let mut groups: std::collections::HashMap<(String, &str, &str, i64), Vec<usize>> =
            std::collections::HashMap::new();
        for (i, r) in all.iter().enumerate() {
            groups
                .entry((
                    r.resource.to_ascii_lowercase(),
                    r.plan.as_str(),
                    r.dimension.as_str(),
                    r.event_time.div_euclid(crate::clock::HOUR),
                ))
                .or_default()
                .push(i);
        }
        let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
        // Largest first; ties by first record, so the split does not depend on the map's order.
        groups.sort_by(|a, b| b.len().cmp(&a.len()).then(a[0].cmp(&b[0])));
        let mut side = vec![false; all.len()];
        let (mut left, mut right) = (0usize, 0usize);
        let mut fits = true;
        for g in &groups {
            let to_right = right < left;
            let size = if to_right { &mut right } else { &mut left };
            if *size + g.len() > limit {
                fits = false;
                break;
            }
            *size += g.len();
            for &i in g {
                side[i] = to_right;
            }
        }
        if fits {
            let (mut a, mut b) = (Vec::with_capacity(left), Vec::with_capacity(right));
            for (r, to_right) in all.into_iter().zip(side) {
                if to_right { b.push(r) } else { a.push(r) }
            }
            return [a, b].into_iter().filter(|x| !x.is_empty()).collect();
        }
    }
    let mut chunk = Vec::new();
    while all.len() > limit {
        let rest = all.split_off(limit);
        chunk.push(std::mem::replace(&mut all, rest));
    }
    if !all.is_empty() {
        chunk.push(all);
    }
    chunk
}

/// The forward path of one replica as a pipeline (what [`drain`] and the forwarder task run): each step forwards
/// up to [`FORWARD_IN_FLIGHT`] batches at once (one transaction each, on separate connections), and while they
/// are in PostgreSQL the next step's records are read from SQLite and the step before has its local marks
/// cleared, so a step costs about its PostgreSQL transactions, not the sum of the three.
///
/// The order per batch is unchanged: PostgreSQL commits a batch before its local mark is cleared (a crash in
/// between forwards it again, which adds nothing). Records are read ahead only after a full step (the outbox is
/// streaming); after a short one the marks are cleared at once, so an idle replica's outbox figures are exact.
/// After an error the batches of the step that did commit are marked, and nothing read ahead is kept: the next
/// step reads from the oldest waiting record again.
pub struct Forwarder<'a> {
    journal: &'a Journal,
    pg: &'a PgJournal,
    replica: &'a str,
    settings: &'a Settings,
    clock: &'a SharedClock,
    limit: usize,
    /// Batches forwarded at once (1 or 2).
    in_flight: usize,
    /// The next step's batches (and how many records were read), read while the step before was in PostgreSQL.
    next: Option<(Chunk, usize)>,
    /// The `seq`s of the last step committed in PostgreSQL whose local marks are not cleared yet.
    unmarked: Vec<i64>,
}

impl<'a> Forwarder<'a> {
    /// A pipeline for `replica`'s outbox in `journal`, batches of at most `limit` records.
    pub fn new(
        journal: &'a Journal,
        pg: &'a PgJournal,
        replica: &'a str,
        settings: &'a Settings,
        clock: &'a SharedClock,
        limit: usize,
    ) -> Self {
        Forwarder {
            journal,
            pg,
            replica,
            settings,
            clock,
            limit: limit.max(1),
            in_flight: FORWARD_IN_FLIGHT.clamp(1, 2),
            next: None,
            unmarked: Vec::new(),
        }
    }

    /// Forwards the next step's batches; `None` when nothing is waiting (every mark cleared then). On an error
    /// the pipeline starts over at the next step (what was committed in PostgreSQL and not marked is forwarded
    /// again, which adds nothing).
    pub async fn step(&mut self) -> Result<Option<Forwarded>, FleetError> {
        let result = self.step_inner().await;
        if result.is_err() {
            self.next = None;
            self.unmarked.clear();
        }
        result
    }

    /// Up to `in_flight` batches of the records waiting after `after`, and how many records were read.
    async fn read(&self, after: i64) -> Result<(Chunk, usize), FleetError> {
        let all = self
            .journal
            .outbox_batch_after(after, self.limit * self.in_flight)
            .await?;
        let read = all.len();
        Ok((split_by_total(all, self.limit), read))
    }

    async fn step_inner(&mut self) -> Result<Option<Forwarded>, FleetError> {
        let (chunk, read) = match self.next.take() {
            Some(c) => c,
            None => {
                let after = self.unmarked.last().copied().unwrap_or(i64::MIN);
                self.read(after).await?
            }
        };
        if chunk.is_empty() {
            self.flush().await?;
            return Ok(None);
        }
        let full = read >= self.limit * self.in_flight;
        let last = chunk
            .iter()
            .flatten()
            .map(|r| r.seq)
            .max()
            .unwrap_or(i64::MIN);
        let unmarked = std::mem::take(&mut self.unmarked);
        let rules = rules(self.settings, self.clock.now());
        let (forwarded, marked, next) = tokio::join!(
            async {
                match chunk.as_slice() {
                    [a, b] => {
                        let (x, y) = tokio::join!(
                            self.pg.forward(self.replica, a, &rules),
                            self.pg.forward(self.replica, b, &rules)
                        );
                        vec![x, y]
                    }
                    batches => {
                        let mut out = Vec::new();
                        for b in batches {
                            out.push(self.pg.forward(self.replica, b, &rules).await);
                        }
                        out
                    }
                }
            },
            mark(self.journal, unmarked),
            async {
                if full {
                    Some(self.read(last).await)
                } else {
                    None
                }
            },
        );
        // The batches that committed, in order; the first error.
        let mut done = Forwarded::default();
        let mut seqs: Vec<i64> = Vec::new();
        let mut failed = None;
        for (b, r) in chunk.iter().zip(forwarded) {
            match r {
                Ok(s) => {
                    done.add(s);
                    seqs.extend(b.iter().map(|r| r.seq));
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        // In `seq` order (a step's batches are split by total, not by `seq`): a whole step is one range to clear.
        seqs.sort_unstable();
        if let Some(e) = failed {
            // What committed is marked (else it is forwarded again, which adds nothing).
            let _ = mark(self.journal, seqs).await;
            marked?;
            return Err(e.into());
        }
        marked?;
        if full {
            // Streaming: this step's marks go with the next step's transactions.
            self.unmarked = seqs;
            self.next = Some(next.transpose()?.unwrap_or_default());
        } else {
            mark(self.journal, seqs).await?;
        }
        metrics::counter!("meterd_fleet_forwarded_records_total", "result" => "inserted")
            .increment(done.inserted as u64);
        metrics::counter!("meterd_fleet_forwarded_records_total", "result" => "duplicate")
            .increment(done.duplicates as u64);
        metrics::counter!("meterd_fleet_forwarded_records_total", "result" => "carried")
            .increment(done.carried as u64);
        Ok(Some(done))
    }

    /// Clears the local mark of the last step committed, if it is still set.
    pub async fn flush(&mut self) -> Result<(), FleetError> {
        let unmarked = std::mem::take(&mut self.unmarked);
        mark(self.journal, unmarked).await
    }
}

/// Clears the local marks of `seqs` (records committed in PostgreSQL); nothing to do for none.
async fn mark(journal: &Journal, seqs: Vec<i64>) -> Result<(), FleetError> {
    if !seqs.is_empty() {
        journal.outbox_mark_forwarded(seqs).await?;
    }
    Ok(())
}

/// Forwards until the outbox is empty (no retries: the first error is returned with what was done before it).
pub async fn drain(
    journal: &Journal,
    pg: &PgJournal,
    replica: &str,
    settings: &Settings,
    clock: &SharedClock,
    limit: usize,
) -> (Forwarded, Result<(), FleetError>) {
    let mut done = Forwarded::default();
    let mut f = Forwarder::new(journal, pg, replica, settings, clock, limit);
    loop {
        match f.step().await {
            Ok(Some(s)) => done.merge(s),
            Ok(None) => return (done, Ok(())),
            Err(e) => return (done, Err(e)),
        }
    }
}

/// Sets the outbox gauges from the journal; returns the outbox figures.
pub async fn publish_outbox_gauges(
    journal: &Journal,
    clock: &SharedClock,
) -> Result<crate::journal::outbox::OutboxStats, FleetError> {
    let stats = journal.outbox_stats().await?;
    let now = clock.now().timestamp();
    metrics::gauge!("meterd_fleet_unforwarded_records").set(stats.unforwarded as f64);
    let lag = stats
        .oldest_received_at
        .map(|t| (now - t).max(0))
        .unwrap_or(0);
    metrics::gauge!("meterd_fleet_forward_lag_seconds").set(lag as f64);
    Ok(stats)
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// Applies the schema migrations, retrying (with backoff) until PostgreSQL answers or `stop` is set. `None` when
/// stopped first.
pub async fn migrate_when_reachable(
    pg: &PgJournal,
    mut stop: watch::Receiver<bool>,
) -> Option<i64> {
    let attempt = || async {
        let v = pg.migrate().await?;
        if v > crate::journal::pg::schema::current_version() {
            return Err(PgError::Unavailable(format!(
                "the fleet database has schema version {v}, newer than this meterd ({}); upgrade this replica",
                crate::journal::pg::schema::current_version()
            )));
        }
        Ok::<i64, PgError>(v)
    };
    let retried = attempt
        .retry(backoff())
        .sleep(tokio::time::sleep)
        .notify(|e: &PgError, d: Duration| {
            metrics::counter!("meterd_fleet_forward_errors_total").increment(1);
            tracing::warn!(
                message = "The fleet PostgreSQL journal is not reachable yet; ingest keeps acknowledging into the local outbox.",
                error = %e,
                retry_in_ms = d.as_millis() as u64
            );
        });
    tokio::select! {
        v = retried => v.ok(),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// The fleet's forward-path tasks.
pub struct FleetTasks {
    /// Migrations, then the forwarder loop.
    pub forwarder: tokio::task::JoinHandle<()>,
    /// The heartbeat loop (and fleet mode's local retention).
    pub heartbeat: tokio::task::JoinHandle<()>,
}

/// Starts the forwarder and the heartbeat. Both end when `stop` is set: the forwarder after one last attempt
/// (bounded by `emit.shutdown_timeout`) to empty the outbox, the heartbeat after one last heartbeat.
pub fn spawn(
    settings: Arc<Settings>,
    fleet: FleetSettings,
    journal: Journal,
    pg: PgJournal,
    clock: SharedClock,
    stop: watch::Receiver<bool>,
) -> FleetTasks {
    let started_at = clock.now().timestamp();
    // The heartbeat starts once the forwarder has the schema in place (its table may not exist before).
    let (migrated_tx, migrated_rx) = watch::channel(false);
    let forwarder = tokio::spawn(forward_loop(
        migrated_tx,
        settings.clone(),
        fleet.clone(),
        journal.clone(),
        pg.clone(),
        clock.clone(),
        stop.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat_loop(
        settings,
        fleet,
        journal,
        pg,
        clock,
        started_at,
        migrated_rx,
        stop,
    ));
    FleetTasks {
        forwarder,
        heartbeat,
    }
}

async fn forward_loop(
    migrated: watch::Sender<bool>,
    settings: Arc<Settings>,
    fleet: FleetSettings,
    journal: Journal,
    pg: PgJournal,
    clock: SharedClock,
    mut stop: watch::Receiver<bool>,
) {
    if migrate_when_reachable(&pg, stop.clone()).await.is_none() {
        return;
    }
    let _ = migrated.send(true);
    tracing::info!(
        message = "Forwarding to the fleet PostgreSQL journal.",
        replica = %fleet.replica_id
    );
    let limit = fleet.forward_batch;
    let mut forwarder = Forwarder::new(&journal, &pg, &fleet.replica_id, &settings, &clock, limit);
    let mut delays = None;
    loop {
        let _ = publish_outbox_gauges(&journal, &clock).await;
        let outcome = tokio::select! {
            r = forwarder.step() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let pause = match outcome {
            Ok(Some(s)) if s.records() >= limit => {
                delays = None;
                continue;
            }
            Ok(_) => {
                delays = None;
                IDLE_POLL
            }
            Err(e) => {
                // Exponential backoff with jitter, without a limit on the number of retries.
                let d = delays
                    .get_or_insert_with(|| backon::BackoffBuilder::build(backoff()))
                    .next()
                    .unwrap_or(Duration::from_secs(10));
                metrics::counter!("meterd_fleet_forward_errors_total").increment(1);
                tracing::warn!(
                    message = "Forwarding to the fleet PostgreSQL journal failed; retrying. Ingest keeps acknowledging into the local outbox.",
                    error = %e,
                    retry_in_ms = d.as_millis() as u64
                );
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(forwarder);
    // Stopping: one bounded attempt to leave nothing behind (what is left goes at the next start, or by
    // `meterd forward --journal`).
    let bound = settings
        .emit
        .shutdown_timeout
        .to_std()
        .unwrap_or(Duration::from_secs(20));
    match tokio::time::timeout(
        bound,
        drain(&journal, &pg, &fleet.replica_id, &settings, &clock, limit),
    )
    .await
    {
        Ok((done, Ok(()))) => tracing::info!(
            message = "Outbox forwarded at shutdown.",
            records = done.records()
        ),
        Ok((_, Err(e))) => tracing::warn!(
            message = "Could not empty the outbox at shutdown; the rest is forwarded at the next start.",
            error = %e
        ),
        Err(_) => tracing::warn!(
            message = "Emptying the outbox at shutdown was cut short by emit.shutdown_timeout; the rest is forwarded at the next start."
        ),
    }
    let _ = publish_outbox_gauges(&journal, &clock).await;
}

/// This replica's row at `now` from the outbox figures.
pub fn replica_row(
    fleet: &FleetSettings,
    started_at: i64,
    now: i64,
    stats: crate::journal::outbox::OutboxStats,
) -> ReplicaRow {
    let watermark = match stats.oldest_received_at {
        Some(t) => t.min(now - WATERMARK_SLACK_SECS),
        None => now - WATERMARK_SLACK_SECS,
    };
    ReplicaRow {
        replica_id: fleet.replica_id.clone(),
        started_at,
        heartbeat_at: now,
        watermark,
        unforwarded: stats.unforwarded,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Publishes one heartbeat now.
pub async fn beat(
    fleet: &FleetSettings,
    journal: &Journal,
    pg: &PgJournal,
    clock: &SharedClock,
    started_at: i64,
) -> Result<(), FleetError> {
    // `now` before the outbox is read: a record committed after the read was received after `now - slack`.
    let now = clock.now().timestamp();
    let stats = publish_outbox_gauges(journal, clock).await?;
    pg.heartbeat(&replica_row(fleet, started_at, now, stats))
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    settings: Arc<Settings>,
    fleet: FleetSettings,
    journal: Journal,
    pg: PgJournal,
    clock: SharedClock,
    started_at: i64,
    mut migrated: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let every = fleet.heartbeat.to_std().unwrap_or(Duration::from_secs(10));
    // Until PostgreSQL answers (and the schema is in place) the lag still shows: the outbox gauges.
    while !*migrated.borrow() {
        let _ = publish_outbox_gauges(&journal, &clock).await;
        tokio::select! {
            r = migrated.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    // The shared journal's retention, hourly, in a task of its own so that a long run never delays a heartbeat.
    let retention = tokio::spawn(retention_loop(
        settings.clone(),
        pg.clone(),
        clock.clone(),
        every,
        stop.clone(),
    ));
    let mut last_compact = i64::MIN;
    loop {
        if let Err(e) = beat(&fleet, &journal, &pg, &clock, started_at).await {
            metrics::counter!("meterd_fleet_forward_errors_total").increment(1);
            tracing::warn!(message = "Fleet heartbeat failed; retrying at the next one.", error = %e);
        }
        let now = clock.now();
        if now.timestamp() >= last_compact.saturating_add(3600) {
            last_compact = now.timestamp();
            match journal
                .outbox_compact(
                    now,
                    settings.journal.retention,
                    settings.ingest.dedupe_window,
                )
                .await
            {
                Ok(n) if n > 0 => tracing::info!(
                    message = "Compacted forwarded records past the dedupe window.",
                    records = n
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(message = "Local retention failed; retried in an hour.", error = %e)
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = beat(&fleet, &journal, &pg, &clock, started_at).await;
    let _ = retention.await;
}

/// Applies the shared journal's retention ([`PgJournal::apply_retention`]) once an hour by `clock` (looking every
/// `every`), at the first look too. Every replica runs it; chunks of one transaction with `SKIP LOCKED` let them
/// run at once. Stopping cancels a run between or inside a chunk (an unfinished chunk is rolled back).
pub async fn retention_loop(
    settings: Arc<Settings>,
    pg: PgJournal,
    clock: SharedClock,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = i64::MIN;
    loop {
        let now = clock.now();
        if now.timestamp() >= last.saturating_add(3600) {
            last = now.timestamp();
            let rules = crate::journal::pg::retention::RetentionRules::new(
                now,
                settings.journal.retention,
                settings.ingest.dedupe_window,
            );
            let run = tokio::select! {
                r = pg.apply_retention(&rules) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match run {
                Ok(s) => {
                    for (what, n) in [
                        ("events", s.events),
                        ("hourly_totals", s.hourly_totals),
                        ("records", s.records),
                        ("carries", s.carries),
                        ("alerts", s.alerts),
                    ] {
                        metrics::counter!("meterd_fleet_retention_deleted_total", "what" => what)
                            .increment(n);
                    }
                    if s.any() {
                        tracing::info!(
                            message = "Shared journal retention applied.",
                            outbound_events_deleted = s.events,
                            hourly_totals_deleted = s.hourly_totals,
                            raw_records_compacted = s.records,
                            carries_deleted = s.carries,
                            alerts_deleted = s.alerts,
                            transactions = s.chunks,
                            more = s.more
                        );
                    }
                    if s.more {
                        // More than one run's worth: go on at the next look instead of in an hour.
                        last = i64::MIN;
                    }
                }
                Err(e) => tracing::warn!(
                    message = "Shared journal retention failed; retried in an hour.",
                    error = %e
                ),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::outbox::OutboxRecord;

    fn rec(seq: i64, resource: &str, hour: i64) -> OutboxRecord {
        OutboxRecord {
            seq,
            idem_key: format!("k{seq}"),
            resource: resource.to_string(),
            plan: String::new(),
            dimension: "d".into(),
            event_time: hour * 3600 + 7,
            quantity: 1,
            received_at: 0,
        }
    }

    fn totals(b: &[OutboxRecord]) -> std::collections::HashSet<(String, i64)> {
        b.iter()
            .map(|r| (r.resource.to_ascii_lowercase(), r.event_time / 3600))
            .collect()
    }

    /// Two full batches share no hourly total (so neither waits for the other's row locks), keep `seq` order
    /// and hold every record once; a total too large for that, and a short read, are split by `seq`.
    #[test]
    fn a_step_is_split_by_total() {
        // 10 totals (two casings of one resource are one total) of 8 records each, batches of 40.
        let all: Vec<OutboxRecord> = (0..80)
            .map(|i| {
                let r = if i % 20 == 0 {
                    "R0"
                } else {
                    ["r0", "r1", "r2", "r3", "r4"][i % 5]
                };
                rec(i as i64, r, (i / 40) as i64)
            })
            .collect();
        let chunk = split_by_total(all.clone(), 40);
        assert_eq!(chunk.len(), 2);
        assert_eq!((chunk[0].len(), chunk[1].len()), (40, 40));
        assert!(totals(&chunk[0]).is_disjoint(&totals(&chunk[1])));
        for b in &chunk {
            assert!(b.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        let mut seqs: Vec<i64> = chunk.iter().flatten().map(|r| r.seq).collect();
        seqs.sort();
        assert_eq!(seqs, (0..80).collect::<Vec<_>>());

        // One total of 50 records: no split by total fits in batches of 40.
        let one: Vec<OutboxRecord> = (0..60)
            .map(|i| rec(i, if i < 50 { "big" } else { "small" }, 1))
            .collect();
        let chunk = split_by_total(one, 40);
        assert_eq!(
            chunk
                .iter()
                .map(|b| (b[0].seq, b.len()))
                .collect::<Vec<_>>(),
            vec![(0, 40), (40, 20)]
        );
        assert_eq!(split_by_total(all[..30].to_vec(), 40).len(), 1);
        assert!(split_by_total(Vec::new(), 40).is_empty());
    }
}
