//! The journal: meterd's only state, one SQLite file.
//!
//! (Over 600 lines for one role: the face with its invariants and tables, the single writer thread, and the
//! tests of its commit and rollback rules.)
//!
//! # The face
//!
//! The layers above call typed methods, not SQL: `journal/ops.rs` holds one method per operation on
//! [`Journal`] (ingest, report, status, balance, consumption, pending count, alerts due and attempted, leases,
//! subscriptions, due and next due events (and [`Journal::due_page`], the pass's stream of them), attempts marked,
//! and the emission pass's jobs [`Journal::open_pass`], [`Journal::freeze_more`], [`Journal::dispose`],
//! [`Journal::settle_answers`], [`Journal::settle_and_mark`]) and on [`ReadOnlyJournal`] (the
//! read-only commands). Each is one read or one write job, exactly as the closure it replaced, so the
//! invariants below hold per operation. The `&Connection` functions of `usage`, `outbound`, `billing`, `status`,
//! `alerts`, `leases` and `subscriptions` are the SQLite side; no module of `src/` outside `journal/` calls them
//! or [`Journal::read`]/[`Journal::write`] (the in-process tests still do, see below).
//!
//! A second backend (PostgreSQL) draws the trait from `ops.rs`: a `Store` trait with those methods (`&self`,
//! owned arguments, [`JournalError`]), "one method, one transaction" as its contract, implemented by the SQLite
//! `Journal`; the emitter, API, alerts and commands then hold an `Arc<dyn Store>` (or a generic). Not drawn yet:
//! `read`/`write`, the submodules and their `&Connection` functions stay `pub` because the in-process tests
//! (`tests/`) still build their fixtures and assertions with them; narrowing them to `pub(crate)` comes with
//! moving those tests onto the face.
//!
//! # Invariants
//!
//! These are the promises of `design.md`; every change to this module keeps them, and each has a test.
//!
//! 1. **Acknowledged means durable.** Ingest answers 2xx only after the transaction holding its records has
//!    committed with `synchronous=FULL` in WAL mode, so it survives `kill -9` and power loss. Many requests share
//!    one commit (group commit): the writer thread takes every job waiting when it starts a transaction.
//! 2. **Idempotent ingest.** `usage_records.idem_key` is `UNIQUE`; a repeated key is counted as a duplicate and
//!    adds nothing. Keys are kept at least `ingest.dedupe_window`.
//! 3. **Exact sums.** Quantities are `i64` micro-units everywhere; sums use checked arithmetic.
//! 4. **Frozen outbound events.** `outbound_events` has one row per (resource, dimension, hour), ever
//!    (`UNIQUE`), written at freezing with its final quantity. Its `body` is written once, when the event is first
//!    billed (just before its first send, when the plan is known: `outbound::set_body` only fills an empty body),
//!    and then sent byte for byte on every attempt.
//! 5. **No partial hours; freezing per key.** A key (resource, dimension, hour) is frozen only when
//!    `hour + 1h + emit.grace <= now`, by the first pass after that, or (late usage) by the first pass after its
//!    usage arrives. A record for a closed hour whose key has no outbound event yet, while the hour is still
//!    sendable (`hour + 24h - emit.safety_margin - emit.min_send_time > now`), goes into its own hour; only a record
//!    whose key is frozen, or whose hour is past that limit, is late (`late_usage`: carried into the open hour, or
//!    refused). The freeze pass finds unfrozen totals through the partial index `hourly_totals_unfrozen`.
//!    `meta.frozen_through` is the first hour the last pass left open and never moves backwards (outbound events
//!    exist only for earlier hours, so ingest looks up a key's event only for them); late usage is
//!    carried into it or later, so a carry never lands in a frozen key. A pass freezes in chunks
//!    (`outbound::freeze_some`); `frozen_through` moves with the first chunk, so while the later chunks run, ingest
//!    looks up the key of every record of an earlier hour: carried if frozen, else added to the total that a later
//!    chunk freezes. Every spelling of a resource is journaled
//!    as its first spelling (`resource_spellings`, ASCII case-insensitive), so two casings are one key.
//! 6. **Nothing vanishes.** Every record's quantity is in exactly one `hourly_totals` row (its own hour, or a
//!    later one with a `carries` row saying where from). Every frozen row points at one outbound event, whose
//!    `state` is its outcome; totals a stopped daemon never froze are frozen by the next pass (and expire and carry
//!    if their window is gone), and retention deletes only settled totals. A record that arrives while its key
//!    is being frozen is serialised by the single writer: it is either in the frozen total (it committed first)
//!    or carried (it committed after).
//! 7. **Single-flight emission.** The `leases` row named `emitter` has one owner until it expires.
//! 8. **UTC only.** Times are unix seconds (UTC); "now" is always passed in.
//! 9. **Units and remainders add up.** For every subscription and dimension, the billing units of the events that
//!    are billed times `unit`, plus the `remainders` row, equal the usage of those events: an expiry carries only
//!    what the units covered, an event that ends not billed gives back the remainder it took
//!    (`outbound::settle`). `in_flight` is set before a call and cleared by every answer, so `ambiguous` marks
//!    only attempts that may have been recorded unseen.
//!
//! # Tables
//!
//! Every table, what it holds and which invariant guards it:
//!
//! - `usage_records`: accepted records (idempotency keys, compacted after `ingest.dedupe_window`) — 1, 2. In fleet
//!   mode `forward_pending = 1` marks a record not yet in the shared PostgreSQL journal (`outbox.rs`); retention
//!   never compacts one.
//! - `hourly_totals`: the sum per (resource, plan, dimension, hour); `outbound_id` once frozen — 3, 5, 6.
//! - `carries`: where a late or expired quantity went (from hour, to hour, why) — 6.
//! - `outbound_events`: one frozen event per key, its body, state (the [`crate::outcome::Outcome`] strings), retry
//!   state, billing figures — 4, 6, 9.
//! - `outcome_totals`: events, quantity and latest `finished_at` per outcome, kept by triggers on `outbound_events`
//!   (schema 7) for `status`: always the `GROUP BY` of the events, without reading them.
//! - `resource_spellings`: the first spelling of each resource (ASCII case-folded) — 5.
//! - `meta`: `frozen_through` (never moves backwards) — 5. The schema version is `PRAGMA user_version`.
//! - `leases`: the emitter lease (owner, expiry; no fencing counter yet, see design.md 8); cleared by `meterd run`
//!   at start — 7.
//! - `subscriptions`: the last subscription list seen (status, plan `''` for none, term, when first seen
//!   `Unsubscribed`, the customer's tenant), for holds, terms and customer pools.
//! - `term_usage`: consumption and overage per (resource, dimension, plan, term), added to once per event when it
//!   is billed (`billing::bill`) — 3, 9.
//! - `remainders`: the partial billing unit carried per (resource, dimension); may be negative — 9.
//! - `thresholds_fired`: one row per (resource, dimension, term, threshold): a threshold fires once per term.
//! - `pools`, `pool_changes`, `pool_draws`, `pool_thresholds_fired`: credit pools (spec, source, voided), their audit
//!   trail (who, when, what), what each pool drew per outbound event and period (kept past retention: balances
//!   are amounts minus draws), and pool thresholds fired once per pool and period (`journal::pools`) — 3, 9.
//! - `usage_months`: monthly sums of the hourly totals retention deleted (consumption by month).
//! - `alerts`: raised in the transaction of their cause, once per dedupe key ([`crate::alert_kind::AlertKey`]);
//!   delivery state (attempts, next attempt, delivered) survives restarts.
//!
//! # Threads
//!
//! One writer thread owns the only read-write connection. Jobs reach it over a channel; it runs each in a
//! savepoint inside one `BEGIN IMMEDIATE` transaction, commits once, and only then answers every job. A job that
//! fails is rolled back alone; a commit that fails answers every job of the batch with the error.
//! Ingest requests are *grouped* jobs ([`Journal::write_grouped`], issue 15): they run without a savepoint and
//! share the transaction's [`usage::IngestGroup`], which sums their hourly totals per key and writes them once per
//! key before the next ordinary job (a freeze sees every total of the requests before it) and before the commit.
//! Such a job checks everything that could refuse it before its first write (or asks for a savepoint, having
//! written nothing); if it still fails after a write (only SQLite can make it), the whole transaction is given up
//! as below. SQLite may
//! roll back the whole transaction when a job fails (disk full, I/O error, out of memory): the writer checks
//! `is_autocommit()` after every job, answers every job run in the lost transaction with the error, and runs the
//! jobs not yet run in a new transaction. So a job is answered OK only if its changes committed, and with an error
//! only if none of them did. A job whose requester stopped waiting (its `write` future was dropped, e.g. the HTTP
//! client went away) before the writer reached it does not run. Readers use a small pool of read-only
//! connections (WAL lets them run beside the writer).
//! The journal-only commands (`status`, `report`, `balance`) start no writer: [`open_read_only`] opens the file
//! without ever creating or writing one (immutable when no `-wal` exists, else read-only through the `-shm`).
//!
//! # What a crash may leave
//!
//! Only whole transactions: SQLite's WAL replays committed frames and drops the rest. A crash between a
//! marketplace answer and the journal update leaves the event `pending`; the next pass sends the same bytes and
//! the marketplace answers `Duplicate` with the original quantity, which counts as billed once.

pub mod alerts;
pub mod billing;
pub mod dashboard;
pub mod leases;
mod ops;
pub mod outbound;
pub mod outbox;
pub mod pg;
mod pool_ops;
pub mod pools;
pub mod reads;
mod schema;
pub mod status;
pub mod subscriptions;
pub mod usage;

pub use ops::{Answers, Disposition, Opened, PassStart};
pub use schema::{current_version, migrate};

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 4096;

thread_local! {
    /// On a writer thread: how many commands wait on its channel for the transaction in progress to end.
    static WAITING: std::cell::RefCell<Option<Arc<std::sync::atomic::AtomicUsize>>> =
        const { std::cell::RefCell::new(None) };
}

/// True inside a writer job when another job (an ingest request, a sender's mark) is waiting for the writer.
/// Long jobs that can stop at a consistent point and be continued by the next job (a freeze chunk, a dispose
/// page) check it between steps and stop early, so nothing waits behind them for long: the writer is shared.
pub(crate) fn others_waiting() -> bool {
    WAITING.with(|w| {
        w.borrow()
            .as_ref()
            .is_some_and(|n| n.load(std::sync::atomic::Ordering::Relaxed) > 0)
    })
}
/// Read connections kept open for reuse.
const READ_POOL: usize = 8;

/// What can go wrong with the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The disk (or `max_page_count`) is full: nothing of the job was stored.
    #[error(
        "the journal's disk is full; nothing was stored (free space at {path}; meterd recovers by itself)"
    )]
    Full {
        /// The journal file.
        path: String,
    },
    /// The journal cannot be written (read-only file system, permissions).
    #[error("the journal is read-only; nothing was stored (check permissions and mount of {path})")]
    ReadOnly {
        /// The journal file.
        path: String,
    },
    /// Another process holds the write lock for too long.
    #[error("the journal is locked by another process; nothing was stored")]
    Busy,
    /// The writer thread is gone (shutting down).
    #[error("the journal is closed")]
    Closed,
    /// Any other SQLite error.
    #[error("journal error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A rule of the data was broken (an overflow, a missing row).
    #[error("{0}")]
    Invalid(String),
    /// The fleet's shared PostgreSQL journal failed (fleet mode reads, see [`reads`]).
    #[error("{message}")]
    Fleet {
        /// What failed (never the URL).
        message: String,
        /// PostgreSQL could not be reached: retrying later may succeed.
        unavailable: bool,
    },
}

impl From<pg::PgError> for JournalError {
    fn from(e: pg::PgError) -> Self {
        let unavailable = match &e {
            pg::PgError::Unavailable(_) => true,
            pg::PgError::Db(d) => d.is_closed() || d.code().is_none(),
            _ => false,
        };
        JournalError::Fleet {
            message: e.to_string(),
            unavailable,
        }
    }
}

impl JournalError {
    /// True when retrying later may succeed (disk space returns, lock released).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            JournalError::Full { .. }
                | JournalError::ReadOnly { .. }
                | JournalError::Busy
                | JournalError::Closed
                | JournalError::Fleet {
                    unavailable: true,
                    ..
                }
        )
    }

    /// A copy of a shared error (errors of a failed commit go to every job of the batch).
    fn duplicate(&self) -> JournalError {
        match self {
            JournalError::Full { path } => JournalError::Full { path: path.clone() },
            JournalError::ReadOnly { path } => JournalError::ReadOnly { path: path.clone() },
            JournalError::Busy => JournalError::Busy,
            JournalError::Closed => JournalError::Closed,
            other => JournalError::Invalid(format!("commit failed: {other}")),
        }
    }

    fn classify(e: rusqlite::Error, path: &Path) -> JournalError {
        use rusqlite::ErrorCode;
        let path = path.display().to_string();
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => JournalError::Full { path },
            Some(ErrorCode::ReadOnly)
            | Some(ErrorCode::CannotOpen)
            | Some(ErrorCode::PermissionDenied) => JournalError::ReadOnly { path },
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => JournalError::Busy,
            _ => JournalError::Sqlite(e),
        }
    }
}

type Finisher = Box<dyn FnOnce(Result<(), Arc<JournalError>>) + Send>;
/// A unit of work for the writer. Given a connection it runs and returns its own error if it failed (a copy:
/// the job still answers with the original); given `None` (the transaction could not start) it does not run.
/// Either way it returns what to do once the commit is known.
type Job = Box<dyn FnOnce(Option<&Connection>) -> (Option<JournalError>, Finisher) + Send>;

fn make_job<T, F, R>(f: F, reply: R) -> Job
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    R: FnOnce(Result<T, JournalError>) + Send + 'static,
{
    make_abandonable_job(f, reply, || true)
}

/// What a caller of the writer awaits.
type Answer<T> = tokio::sync::oneshot::Receiver<Result<T, JournalError>>;

/// A job's answer: the reply (sent at most once), whether its caller still waits for it (a dropped future means
/// the job need not run), and the receiver the caller awaits.
fn answer_slot<T: Send + 'static>() -> (
    impl FnOnce(Result<T, JournalError>) + Send + 'static,
    impl FnOnce() -> bool + Send + 'static,
    Answer<T>,
) {
    let (reply, rx) = tokio::sync::oneshot::channel();
    let reply = Arc::new(Mutex::new(Some(reply)));
    let probe = reply.clone();
    let waiting = move || {
        probe
            .lock()
            .map(|r| r.as_ref().is_some_and(|s| !s.is_closed()))
            .unwrap_or(false)
    };
    let send = move |r| {
        if let Some(reply) = reply.lock().ok().and_then(|mut g| g.take()) {
            let _ = reply.send(r);
        }
    };
    (send, waiting, rx)
}

/// [`make_job`] for a requester that may stop waiting: when `waiting()` is false as the writer reaches the job,
/// the job does not run (nobody would learn that it committed; a client that gave up and retries must not find
/// its first attempt stored).
fn make_abandonable_job<T, F, R, W>(f: F, reply: R, waiting: W) -> Job
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    R: FnOnce(Result<T, JournalError>) + Send + 'static,
    W: FnOnce() -> bool + Send + 'static,
{
    Box::new(move |conn: Option<&Connection>| {
        answer_once_committed(conn.filter(|_| waiting()).map(f), reply)
    })
}

/// A job's result (`None`: it did not run) as its error, if any, and the finisher that answers `reply` once the
/// commit is known: the job's own error, else the commit's, else its value (`Closed` when it did not run).
fn answer_once_committed<T, R>(
    result: Option<Result<T, JournalError>>,
    reply: R,
) -> (Option<JournalError>, Finisher)
where
    T: Send + 'static,
    R: FnOnce(Result<T, JournalError>) + Send + 'static,
{
    let failure = match &result {
        Some(Err(e)) => Some(e.duplicate()),
        _ => None,
    };
    let finisher: Finisher = Box::new(move |commit: Result<(), Arc<JournalError>>| {
        let answer = match (commit, result) {
            (_, Some(Err(e))) => Err(e),
            (Err(e), _) => Err(e.duplicate()),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Ok(()), None) => Err(JournalError::Closed),
        };
        reply(answer);
    });
    (failure, finisher)
}

/// A job that runs without a savepoint, with the transaction's shared [`usage::IngestGroup`] (issue 15: the
/// hourly totals of a transaction's ingest jobs are written once per key, and a job that cannot fail once it
/// wrote needs no savepoint). Given `None` (the transaction could not start) it does not run.
type GroupJob = Box<dyn FnOnce(Option<&Connection>, &mut usage::IngestGroup) -> Grouped + Send>;

/// What a [`GroupJob`] did.
enum Grouped {
    /// It ran (or did not run at all): its error if it failed, and what to do once the commit is known. A job
    /// that failed after it wrote costs the whole transaction (it has no savepoint to roll back to).
    Ran(Option<JournalError>, Finisher),
    /// It wrote nothing and asks to run as an ordinary job, in a savepoint.
    Savepoint(Job),
}

/// [`make_abandonable_job`] for a grouped job: `f` is called with the group first; `Ok(None)` from it (nothing
/// written) makes it an ordinary job in a savepoint, where `f` is called again without a group.
fn make_grouped_job<T, F, R, W>(f: F, reply: R, waiting: W) -> GroupJob
where
    T: Send + 'static,
    F: Fn(&Connection, Option<&mut usage::IngestGroup>) -> Result<Option<T>, JournalError>
        + Send
        + 'static,
    R: FnOnce(Result<T, JournalError>) + Send + 'static,
    W: FnOnce() -> bool + Send + 'static,
{
    Box::new(
        move |conn: Option<&Connection>, group: &mut usage::IngestGroup| {
            let result = match conn.filter(|_| waiting()) {
                None => None,
                Some(c) => match f(c, Some(group)) {
                    Ok(None) => {
                        return Grouped::Savepoint(make_job(
                            move |c| {
                                f(c, None)?.ok_or_else(|| {
                                    JournalError::Invalid(
                                        "a job run in a savepoint asked for a savepoint".into(),
                                    )
                                })
                            },
                            reply,
                        ));
                    }
                    Ok(Some(v)) => Some(Ok(v)),
                    Err(e) => Some(Err(e)),
                },
            };
            let (failure, finisher) = answer_once_committed(result, reply);
            Grouped::Ran(failure, finisher)
        },
    )
}

/// A job as the writer queues it.
enum Work {
    /// An ordinary job: in a savepoint of its own.
    Savepoint(Job),
    /// A grouped job (see [`GroupJob`]).
    Grouped(GroupJob),
}

impl Work {
    /// Answers the job without running it (the transaction could not start).
    fn refuse(self, err: Arc<JournalError>) {
        let finish = match self {
            Work::Savepoint(job) => job(None).1,
            Work::Grouped(job) => match job(None, &mut usage::IngestGroup::default()) {
                Grouped::Ran(_, finish) => finish,
                Grouped::Savepoint(job) => job(None).1,
            },
        };
        finish(Err(err));
    }
}

enum Command {
    Job(Job),
    Grouped(GroupJob),
    Checkpoint(tokio::sync::oneshot::Sender<Result<(), JournalError>>),
}

/// Figures the writer keeps about its own work (for metrics and health).
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: u64,
    /// Jobs committed.
    pub jobs: u64,
    /// When the writer last finished a loop iteration (liveness).
    pub last_active: Option<Instant>,
}

/// Handle to the journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Exclusive lock on `<journal>.lock`, held for the writer's life: a second writer process on the same
    /// journal is refused at open, and a lease left by a crashed process can be cleared safely.
    lock: Mutex<Option<std::fs::File>>,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    /// Commands sent and not yet taken by the writer ([`others_waiting`]).
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    readers: Mutex<Vec<Connection>>,
    stats: Arc<Mutex<WriterStats>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(())
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`, runs migrations and starts the writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                JournalError::Invalid(format!(
                    "cannot create the journal directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                JournalError::Invalid(format!("cannot open {}: {e}", lock_path.display()))
            })?;
        if lock.try_lock().is_err() {
            return Err(JournalError::Invalid(format!(
                "another meterd process is using the journal at {} (it holds {}); stop it first",
                path.display(),
                lock_path.display()
            )));
        }
        let mut conn = Connection::open(path).map_err(|e| JournalError::classify(e, path))?;
        configure(&conn).map_err(|e| JournalError::classify(e, path))?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(JournalError::Invalid(format!(
                "the journal at {} could not be put in WAL mode (got {mode}); it must be on a local disk",
                path.display()
            )));
        }
        let version = migrate(&mut conn).map_err(|e| JournalError::classify(e, path))?;
        if version > current_version() {
            return Err(JournalError::Invalid(format!(
                "the journal at {} has schema version {version}, newer than this meterd understands ({}); \
                 run the newer meterd or restore a backup",
                path.display(),
                current_version()
            )));
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(WriterStats::default()));
        let writer_stats = stats.clone();
        let writer_path = path.to_path_buf();
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer_waiting = waiting.clone();
        let thread = std::thread::Builder::new()
            .name("meterd-journal".into())
            .spawn(move || {
                WAITING.with(|w| *w.borrow_mut() = Some(writer_waiting));
                writer_loop(conn, rx, writer_stats, writer_path)
            })
            .map_err(|e| {
                JournalError::Invalid(format!("cannot start the journal writer thread: {e}"))
            })?;
        Ok(Journal {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                lock: Mutex::new(Some(lock)),
                tx: Mutex::new(Some(tx)),
                waiting,
                readers: Mutex::new(Vec::new()),
                stats,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` inside the writer's next transaction and answers after that transaction committed.
    ///
    /// `f` runs in a savepoint: if it returns an error, only its own changes are rolled back. If the returned
    /// future is dropped before the writer reaches the job (an HTTP client went away while its request waited
    /// for the journal), `f` does not run; once it ran, its transaction commits or fails regardless.
    pub async fn write<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (reply, waiting, rx) = answer_slot();
        self.send(Command::Job(make_abandonable_job(f, reply, waiting)))?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Like [`Journal::write`] for a job that may run without a savepoint of its own, sharing the transaction's
    /// [`usage::IngestGroup`] with the other grouped jobs (the ingest requests, [`Journal::ingest`]).
    ///
    /// `f` is called with the group; it must then read everything that could make it fail before its first
    /// write (a grouped job failing after it wrote loses the whole transaction: every job run in it is answered
    /// with the error, none is stored), and may answer `Ok(None)`, having written nothing, to run as an ordinary
    /// job in a savepoint instead, where it is called again without a group and must answer `Some`.
    pub(crate) async fn write_grouped<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: Fn(&Connection, Option<&mut usage::IngestGroup>) -> Result<Option<T>, JournalError>
            + Send
            + 'static,
    {
        let (reply, waiting, rx) = answer_slot();
        self.send(Command::Grouped(make_grouped_job(f, reply, waiting)))?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Like [`Journal::write`] for callers outside an async runtime (the CLI, tests).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let (reply, rx) = std::sync::mpsc::channel();
        self.send(Command::Job(make_job(f, move |r| {
            let _ = reply.send(r);
        })))?;
        rx.recv().map_err(|_| JournalError::Closed)?
    }

    fn send(&self, cmd: Command) -> Result<(), JournalError> {
        use std::sync::atomic::Ordering::Relaxed;
        let guard = self.inner.tx.lock().expect("journal sender lock");
        let tx = guard.as_ref().ok_or(JournalError::Closed)?;
        self.inner.waiting.fetch_add(1, Relaxed);
        tx.send(cmd).map_err(|_| {
            self.inner.waiting.fetch_sub(1, Relaxed);
            JournalError::Closed
        })
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_blocking(f))
            .await
            .map_err(|e| JournalError::Invalid(format!("read task failed: {e}")))?
    }

    /// Runs `f` on a read-only connection in the calling thread.
    pub fn read_blocking<T, F>(&self, f: F) -> Result<T, JournalError>
    where
        F: FnOnce(&Connection) -> Result<T, JournalError>,
    {
        let conn = self.inner.readers.lock().expect("reader pool lock").pop();
        let conn = match conn {
            Some(c) => c,
            None => open_reader(&self.inner.path)?,
        };
        let result = f(&conn);
        let mut pool = self.inner.readers.lock().expect("reader pool lock");
        if pool.len() < READ_POOL {
            pool.push(conn);
        }
        result
    }

    /// Copies the WAL back into the main file (at shutdown, and before a backup).
    pub async fn checkpoint(&self) -> Result<(), JournalError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Checkpoint(reply))?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Seconds since the writer thread last finished a job or idled; `None` if it never ran.
    pub fn writer_stats(&self) -> (u64, u64) {
        let s = self.inner.stats.lock().expect("stats lock");
        (s.commits, s.jobs)
    }

    /// True when the writer thread still runs.
    pub fn writer_alive(&self) -> bool {
        self.inner
            .thread
            .lock()
            .expect("thread lock")
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Checks the writer answers: runs an empty job through it.
    pub async fn ping(&self) -> Result<(), JournalError> {
        self.write(|_| Ok(())).await
    }

    /// Stops the writer after the jobs already queued, checkpoints the WAL and waits for the thread.
    pub fn close(&self) {
        self.inner.tx.lock().expect("journal sender lock").take();
        self.inner.readers.lock().expect("reader pool lock").clear();
        if let Some(t) = self.inner.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
        self.inner.lock.lock().expect("journal lock").take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.tx.get_mut().map(|t| t.take()).ok();
        if let Ok(t) = self.thread.get_mut()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, JournalError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| JournalError::classify(e, path))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// A read-only view of a journal, for the commands that only read it (`status`, `report`, `balance`).
pub struct ReadOnlyJournal {
    /// The connection (opened with `SQLITE_OPEN_READ_ONLY`; it never writes).
    pub conn: Connection,
    /// Set when the journal had to be opened `immutable` (see [`open_read_only`]): say so to the user.
    pub note: Option<String>,
}

impl std::ops::Deref for ReadOnlyJournal {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Opens a journal read-only without starting a writer (for `meterd report` and `status` while the daemon runs,
/// after it stopped, or on a copy or a read-only mount). It never creates, writes or locks-for-writing a file.
///
/// - No `-wal` file beside the journal: no process has it open (SQLite keeps the `-wal` while any connection
///   is open and removes it, checkpointed, when the last one closes), so the main file is complete. It is
///   opened `immutable=1`: SQLite reads it alone and creates no `-wal`/`-shm` (a plain read-only open would
///   create both, and fails where the directory is not writable).
/// - A `-wal` file (a daemon runs, or one was killed): opened `SQLITE_OPEN_READ_ONLY`, which reads the `-wal`
///   through the existing `-shm` index, so the view includes the newest commits. Should that fail (the `-shm`
///   is missing and cannot be created in a read-only directory), it falls back to `immutable=1` and
///   [`ReadOnlyJournal::note`] says the view may miss what sits only in the `-wal`.
pub fn open_read_only(path: &Path) -> Result<ReadOnlyJournal, JournalError> {
    if !path.exists() {
        return Err(JournalError::Invalid(format!(
            "no journal at {}; start the daemon with `meterd run` or pass --config with the right journal.path",
            path.display()
        )));
    }
    let wal = wal_path(path);
    if !wal.exists() {
        let conn = open_immutable(path).map_err(|e| {
            JournalError::Invalid(format!(
                "cannot read the journal at {}: {e}; check that this user may read the file",
                path.display()
            ))
        })?;
        return Ok(ReadOnlyJournal { conn, note: None });
    }
    let conn = open_reader(path)?;
    // Opening is lazy: the first read is what maps (or fails to create) the WAL index.
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => Ok(ReadOnlyJournal { conn, note: None }),
        Err(first) => {
            drop(conn);
            let conn = open_immutable(path).map_err(|e| {
                JournalError::Invalid(format!(
                    "cannot read the journal at {}: {first}; read as immutable: {e}; check that this user may \
                     read the file and its directory",
                    path.display()
                ))
            })?;
            Ok(ReadOnlyJournal {
                conn,
                note: Some(format!(
                    "note: {} is read without its write-ahead log ({} cannot be used here: {first}); the \
                     newest commits may be missing from this view; for a live view run this as a user who may \
                     write the journal's directory (the daemon's user)",
                    path.display(),
                    wal.display()
                )),
            })
        }
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push("-wal");
    PathBuf::from(s)
}

fn open_immutable(path: &Path) -> Result<Connection, rusqlite::Error> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // A URI path: percent-encode what URIs reserve so any file name works.
    let mut uri = String::from("file:");
    for b in abs.to_string_lossy().bytes() {
        match b {
            b'%' | b'?' | b'#' | b' ' | 0x80.. => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(b as char),
        }
    }
    uri.push_str("?immutable=1");
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(conn)
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Mutex<WriterStats>>,
    path: PathBuf,
) {
    let mut batch: Vec<Work> = Vec::new();
    // Every command taken off the channel is no longer waiting (`others_waiting`).
    let took = || {
        WAITING.with(|w| {
            if let Some(n) = w.borrow().as_ref() {
                n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    while let Ok(first) = rx.recv() {
        took();
        let mut pending = Some(first);
        loop {
            match pending.take() {
                Some(Command::Job(job)) => batch.push(Work::Savepoint(job)),
                Some(Command::Grouped(job)) => batch.push(Work::Grouped(job)),
                Some(Command::Checkpoint(reply)) => {
                    // Run the jobs gathered so far first so the checkpoint covers them.
                    run_batch(&mut conn, &mut batch, &stats, &path);
                    let r = conn
                        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                        .map_err(|e| JournalError::classify(e, &path));
                    let _ = reply.send(r);
                }
                None => {}
            }
            if batch.len() >= MAX_GROUP {
                break;
            }
            match rx.try_recv() {
                Ok(cmd) => {
                    took();
                    pending = Some(cmd)
                }
                Err(_) => break,
            }
        }
        run_batch(&mut conn, &mut batch, &stats, &path);
    }
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

fn run_batch(
    conn: &mut Connection,
    batch: &mut Vec<Work>,
    stats: &Mutex<WriterStats>,
    path: &Path,
) {
    let mut jobs: std::collections::VecDeque<Work> = batch.drain(..).collect();
    // A transaction SQLite rolled back as a whole takes only the jobs run in it; the rest start over in the next.
    while !jobs.is_empty() {
        run_transaction(conn, &mut jobs, stats, path);
    }
}

/// Runs jobs from the front of `jobs` in one transaction and answers them once its fate is known. Returns after
/// the commit, or early, with the remaining jobs left in `jobs`, when the transaction was lost mid-way.
///
/// Ordinary jobs run in a savepoint each. Grouped jobs (the ingest requests) run without one and share the
/// transaction's [`usage::IngestGroup`]: their hourly totals are written by its flush, once per key, before the
/// next ordinary job (which may freeze or read them: invariants 5 and 6) and before the commit. A grouped job that
/// fails having written nothing is answered with its error alone; one that fails after a write (only SQLite
/// itself can make it: it checks its own rules before its first write) loses the whole transaction, as a
/// transaction SQLite rolled back does, so a job is still answered OK only if all of it committed and with an
/// error only if none of it did.
fn run_transaction(
    conn: &mut Connection,
    jobs: &mut std::collections::VecDeque<Work>,
    stats: &Mutex<WriterStats>,
    path: &Path,
) {
    let started = Instant::now();
    let mut finishers: Vec<Finisher> = Vec::with_capacity(jobs.len());
    if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
        let err = Arc::new(JournalError::classify(e, path));
        tracing::error!(message = "Journal transaction could not start; the batch was not stored.", error = %err, jobs = jobs.len());
        for work in jobs.drain(..) {
            work.refuse(err.clone());
        }
        return;
    }
    let mut group = usage::IngestGroup::default();
    while let Some(work) = jobs.pop_front() {
        let job = match work {
            Work::Savepoint(job) => job,
            Work::Grouped(job) => {
                let before = conn.total_changes();
                match job(Some(conn), &mut group) {
                    Grouped::Savepoint(job) => job,
                    Grouped::Ran(failure, finisher) => {
                        finishers.push(finisher);
                        let wrote = conn.total_changes() != before;
                        if conn.is_autocommit() || (failure.is_some() && wrote) {
                            // SQLite rolled the transaction back, or the job failed after a write it has no
                            // savepoint to undo: nothing of this transaction is kept.
                            let err = failure.unwrap_or_else(lost_transaction);
                            abandon(conn, finishers, err);
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        // The job may read or change hourly totals: write the group's first, and forget the group's reads after.
        if let Err(e) = group.flush(conn) {
            jobs.push_front(Work::Savepoint(job));
            abandon(conn, finishers, e);
            return;
        }
        if conn.is_autocommit() {
            jobs.push_front(Work::Savepoint(job));
            abandon(conn, finishers, lost_transaction());
            return;
        }
        let ran = run_in_savepoint(conn, job, &mut finishers, path);
        group.forget();
        if !ran {
            return;
        }
    }
    if let Err(e) = group.flush(conn) {
        abandon(conn, finishers, e);
        return;
    }
    let size = finishers.len();
    let syncing = Instant::now();
    let commit = run_cached(conn, "COMMIT");
    metrics::histogram!("meterd_journal_sync_seconds").record(syncing.elapsed().as_secs_f64());
    let outcome: Result<(), Arc<JournalError>> = match commit {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            let err = JournalError::classify(e, path);
            tracing::error!(message = "Journal commit failed; the batch was not stored.", error = %err, jobs = size);
            Err(Arc::new(err))
        }
    };
    metrics::histogram!("meterd_journal_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("meterd_journal_commit_jobs").record(size as f64);
    {
        let mut s = stats.lock().expect("stats lock");
        s.commits += 1;
        s.jobs += size as u64;
        s.last_active = Some(Instant::now());
    }
    for f in finishers {
        f(outcome.clone());
    }
}

/// The error of a transaction SQLite ended by itself.
fn lost_transaction() -> JournalError {
    JournalError::Invalid(
        "the journal transaction was rolled back; nothing of this request was stored, retry it"
            .into(),
    )
}

/// Runs an ordinary job in a savepoint of the current transaction: a job that fails is rolled back alone. Returns
/// false when the transaction was lost (its jobs are answered with the error, see [`abandon`]).
fn run_in_savepoint(
    conn: &Connection,
    job: Job,
    finishers: &mut Vec<Finisher>,
    path: &Path,
) -> bool {
    if let Err(e) = run_cached(conn, "SAVEPOINT job") {
        let err = Arc::new(JournalError::classify(e, path));
        let (_, finish) = job(None);
        if conn.is_autocommit() {
            // Not even the savepoint could be taken inside the transaction: treat it as lost.
            finishers.push(Box::new(move |_| finish(Err(err.clone()))));
            abandon(conn, std::mem::take(finishers), JournalError::Invalid(
                "the journal transaction ended unexpectedly; nothing of this request was stored, retry it".into(),
            ));
            return false;
        }
        finishers.push(Box::new(move |_| finish(Err(err))));
        return true;
    }
    let (failure, finisher) = job(Some(conn));
    finishers.push(finisher);
    if conn.is_autocommit() {
        // SQLite rolled back the whole transaction (SQLITE_FULL, IOERR, NOMEM may): every job run in it so
        // far is gone, not only this one. A savepoint taken now would open a new transaction that its RELEASE
        // commits, behind the final COMMIT's back.
        let err = failure.unwrap_or_else(lost_transaction);
        abandon(conn, std::mem::take(finishers), err);
        return false;
    }
    let undo = if failure.is_some() {
        // Undo the failed job's own changes; the others in this transaction stay.
        run_cached(conn, "ROLLBACK TO job")
    } else {
        Ok(())
    };
    if let Err(e) = undo.and_then(|()| run_cached(conn, "RELEASE job")) {
        // The savepoint cannot be closed: the transaction's state is unknown, so none of it is kept.
        abandon(
            conn,
            std::mem::take(finishers),
            JournalError::classify(e, path),
        );
        return false;
    }
    true
}

/// Runs a statement kept prepared in the connection's cache: the writer's `BEGIN`/`COMMIT` and per-job
/// `SAVEPOINT`/`RELEASE` are parsed once, not for every transaction and job (issue 15).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Gives up the current transaction (rolled back if SQLite has not already) and answers every job run in it
/// with `err`: none of them is stored.
fn abandon(conn: &Connection, finishers: Vec<Finisher>, err: JournalError) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    tracing::error!(message = "Journal transaction lost mid-batch; its jobs were not stored and are answered with the error.", error = %err, jobs = finishers.len());
    let err = Arc::new(err);
    for f in finishers {
        f(Err(err.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues `f` without waiting; its answer arrives on the returned channel.
    fn queue<T: Send + 'static>(
        journal: &Journal,
        f: impl FnOnce(&Connection) -> Result<T, JournalError> + Send + 'static,
    ) -> std::sync::mpsc::Receiver<Result<T, JournalError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        journal
            .send(Command::Job(make_job(f, move |r| {
                let _ = tx.send(r);
            })))
            .unwrap();
        rx
    }

    fn insert(x: i64) -> impl FnOnce(&Connection) -> Result<(), JournalError> + Send + 'static {
        move |c: &Connection| {
            c.execute("INSERT INTO scratch(x) VALUES (?1)", [x])?;
            Ok(())
        }
    }

    /// Issue 11 defect 3, "a whole-transaction rollback inside group commit": SQLite rolls the whole transaction
    /// back in the middle of a batch (as on SQLITE_FULL, IOERR or NOMEM; forced here by a job that runs
    /// `ROLLBACK` and fails). No job answered OK is missing from the journal, no job answered with an error is in
    /// it, and the jobs after the lost transaction are not lost with it.
    #[test]
    fn a_whole_transaction_rollback_inside_group_commit_answers_every_job_truly() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        journal
            .write_blocking(|c| {
                c.execute_batch("CREATE TABLE scratch(x INTEGER NOT NULL)")?;
                Ok(())
            })
            .unwrap();
        // Hold the writer in a job of its own so that the jobs below are queued together and run in one batch.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let blocker = queue(&journal, move |_| {
            started_tx.send(()).unwrap();
            gate.recv().unwrap();
            Ok(())
        });
        started.recv().unwrap();
        let before = queue(&journal, insert(1));
        let rollback = queue(&journal, |c| {
            c.execute("INSERT INTO scratch(x) VALUES (2)", [])?;
            c.execute_batch("ROLLBACK")?;
            Err::<(), _>(JournalError::Full {
                path: "journal.db".into(),
            })
        });
        let after = queue(&journal, insert(3));
        let failing = queue(&journal, |c| {
            c.execute("INSERT INTO scratch(x) VALUES (4)", [])?;
            Err::<(), _>(JournalError::Invalid("this job fails on its own".into()))
        });
        let last = queue(&journal, insert(5));
        release.send(()).unwrap();
        blocker.recv().unwrap().unwrap();
        let answers: Vec<(i64, bool)> = [
            (1, before.recv().unwrap().is_ok()),
            (2, rollback.recv().unwrap().is_ok()),
            (3, after.recv().unwrap().is_ok()),
            (4, failing.recv().unwrap().is_ok()),
            (5, last.recv().unwrap().is_ok()),
        ]
        .into();
        let stored: Vec<i64> = journal
            .read_blocking(|c| {
                let mut st = c.prepare("SELECT x FROM scratch ORDER BY x")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<i64>, _>>()?)
            })
            .unwrap();
        for (x, ok) in &answers {
            assert_eq!(
                *ok,
                stored.contains(x),
                "job {x} was answered {} but is {}stored; answers {answers:?}, stored {stored:?}",
                if *ok { "OK" } else { "with an error" },
                if stored.contains(x) { "" } else { "not " },
            );
        }
        // The job that lost the transaction and the one before it (in the same transaction) fail; the job failing
        // on its own fails; the others are stored.
        assert_eq!(
            answers,
            vec![(1, false), (2, false), (3, true), (4, false), (5, true)]
        );
        // The writer still works.
        journal.write_blocking(insert(6)).unwrap();
        journal.close();
    }

    /// Issue 11 defect 2 (the journal side): a request that gave up waiting (its `write` future dropped, as when
    /// an HTTP client disconnects) before the writer reached its job is not stored; one still waiting is.
    #[test]
    fn a_write_abandoned_before_the_writer_reaches_it_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        journal
            .write_blocking(|c| {
                c.execute_batch("CREATE TABLE scratch(x INTEGER NOT NULL)")?;
                Ok(())
            })
            .unwrap();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let blocker = queue(&journal, move |_| {
            started_tx.send(()).unwrap();
            gate.recv().unwrap();
            Ok(())
        });
        started.recv().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Polled once (the job is queued), then dropped: the requester gave up.
        let abandoned = journal.write(insert(1));
        rt.block_on(async {
            let mut abandoned = std::pin::pin!(abandoned);
            assert!(futures_poll_once(abandoned.as_mut()).await.is_none());
        });
        let kept = {
            let j = journal.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(j.write(insert(2)))
            })
        };
        // Whether the kept write is queued before or after the release does not matter: it is waited for.
        release.send(()).unwrap();
        blocker.recv().unwrap().unwrap();
        kept.join().unwrap().unwrap();
        let stored: Vec<i64> = journal
            .read_blocking(|c| {
                let mut st = c.prepare("SELECT x FROM scratch ORDER BY x")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<i64>, _>>()?)
            })
            .unwrap();
        assert_eq!(stored, vec![2], "the abandoned write was stored");
        journal.close();
    }

    /// Queues a grouped job (as [`Journal::write_grouped`] does) without waiting.
    fn queue_grouped<T: Send + 'static>(
        journal: &Journal,
        f: impl Fn(&Connection, Option<&mut usage::IngestGroup>) -> Result<Option<T>, JournalError>
        + Send
        + 'static,
    ) -> std::sync::mpsc::Receiver<Result<T, JournalError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        journal
            .send(Command::Grouped(make_grouped_job(
                f,
                move |r| {
                    let _ = tx.send(r);
                },
                || true,
            )))
            .unwrap();
        rx
    }

    /// Holds the writer in a job of its own until the returned sender is used, so that the jobs queued meanwhile
    /// run in one transaction.
    fn hold(
        journal: &Journal,
    ) -> (
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<Result<(), JournalError>>,
    ) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let blocker = queue(journal, move |_| {
            started_tx.send(()).unwrap();
            gate.recv().unwrap();
            Ok(())
        });
        started.recv().unwrap();
        (release, blocker)
    }

    fn one_record(key: &str, quantity: i64) -> Vec<usage::NewRecord> {
        vec![usage::NewRecord {
            resource: "11111111-1111-4111-8111-111111111111".into(),
            plan: None,
            dimension: "api_calls".into(),
            time: chrono::DateTime::from_timestamp(1_773_100_800, 0).unwrap(),
            quantity: crate::quantity::Micros(quantity),
            key: Some(key.into()),
        }]
    }

    fn carry_rules() -> usage::IngestRules {
        usage::IngestRules {
            now: chrono::DateTime::from_timestamp(1_773_100_800 + 600, 0).unwrap(),
            late: crate::config::LateUsage::CarryForward,
            safety_margin: chrono::Duration::minutes(15),
            min_send_time: chrono::Duration::hours(1),
            outbox: false,
        }
    }

    fn ingest_job(
        records: Vec<usage::NewRecord>,
    ) -> impl Fn(
        &Connection,
        Option<&mut usage::IngestGroup>,
    ) -> Result<Option<usage::IngestOutcome>, JournalError>
    + Send
    + 'static {
        move |c, g| match g {
            Some(g) => usage::ingest_grouped(c, &records, &carry_rules(), g),
            None => Ok(Some(usage::ingest(c, &records, &carry_rules())?.unwrap())),
        }
    }

    fn total(journal: &Journal) -> (i64, i64, i64) {
        journal
            .read_blocking(|c| {
                Ok(c.query_row(
                    "SELECT COALESCE(SUM(quantity), 0), COALESCE(SUM(records), 0), (SELECT COUNT(*) FROM usage_records) FROM hourly_totals",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?)
            })
            .unwrap()
    }

    /// Issue 15, the hazard of a job without a savepoint: grouped ingest jobs share one hourly-total upsert per key,
    /// an ordinary job between them sees their totals (the group is written before it), a grouped job that fails
    /// before it wrote is answered alone, and one that fails after a write takes its whole transaction with it: no
    /// job answered OK is missing, no job answered with an error is stored (not even its part of a shared total),
    /// and the jobs after it run in the next transaction.
    #[test]
    fn a_grouped_job_failing_after_a_write_takes_its_transaction_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        journal
            .write_blocking(|c| {
                c.execute_batch("CREATE TABLE scratch(x INTEGER NOT NULL)")?;
                Ok(())
            })
            .unwrap();
        // One transaction: two grouped ingests, an ordinary job reading the total, a third ingest, a grouped job
        // failing before any write.
        let (release, blocker) = hold(&journal);
        let a = queue_grouped(&journal, ingest_job(one_record("a", 1_000_000)));
        let b = queue_grouped(&journal, ingest_job(one_record("b", 2_000_000)));
        let seen = queue(&journal, |c| {
            Ok(
                c.query_row("SELECT quantity, records FROM hourly_totals", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })?,
            )
        });
        let c3 = queue_grouped(&journal, ingest_job(one_record("c", 4_000_000)));
        let clean = queue_grouped::<()>(&journal, |_, _| {
            Err(JournalError::Invalid("refused before any write".into()))
        });
        release.send(()).unwrap();
        blocker.recv().unwrap().unwrap();
        assert_eq!(seen.recv().unwrap().unwrap(), (3_000_000, 2));
        for r in [a, b, c3] {
            assert_eq!(r.recv().unwrap().unwrap().accepted, 1);
        }
        assert!(clean.recv().unwrap().is_err());
        assert_eq!(total(&journal), (7_000_000, 3, 3));
        let (commits_before, _) = journal.writer_stats();

        // The next transaction: an ingest, a grouped job that writes and then fails, another ingest queued after it.
        let (release, blocker) = hold(&journal);
        let before = queue_grouped(&journal, ingest_job(one_record("d", 8_000_000)));
        let dirty = queue_grouped::<()>(&journal, |c, _| {
            c.execute("INSERT INTO scratch(x) VALUES (1)", [])?;
            Err(JournalError::Invalid("failed after a write".into()))
        });
        let after = queue_grouped(&journal, ingest_job(one_record("e", 16_000_000)));
        release.send(()).unwrap();
        blocker.recv().unwrap().unwrap();
        assert!(before.recv().unwrap().is_err(), "its transaction was lost");
        assert!(dirty.recv().unwrap().is_err());
        assert_eq!(after.recv().unwrap().unwrap().accepted, 1);
        let scratch: i64 = journal
            .read_blocking(|c| Ok(c.query_row("SELECT COUNT(*) FROM scratch", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(scratch, 0, "the failed job's write was kept");
        // "d" is not stored (nor in the total); "e" is.
        assert_eq!(total(&journal), (23_000_000, 4, 4));
        let (commits_after, _) = journal.writer_stats();
        assert!(commits_after > commits_before);
        // "d" may be sent again: it was not stored.
        let again = queue_grouped(&journal, ingest_job(one_record("d", 8_000_000)));
        assert_eq!(again.recv().unwrap().unwrap().accepted, 1);
        assert_eq!(total(&journal), (31_000_000, 5, 5));
        journal.close();
    }

    /// A grouped ingest whose total could overflow runs as an ordinary job in a savepoint (the exact rule: only
    /// stored records count): refused alone with the overflow, the other jobs of its transaction stored.
    #[test]
    fn a_grouped_ingest_that_could_overflow_runs_in_a_savepoint_and_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        let (release, blocker) = hold(&journal);
        let big = queue_grouped(&journal, ingest_job(one_record("big", i64::MAX - 10)));
        let small = queue_grouped(&journal, ingest_job(one_record("small", 5)));
        let over = queue_grouped(&journal, ingest_job(one_record("over", 6)));
        // A duplicate of a stored key adds nothing: under the exact rule it is no overflow.
        let dup = queue_grouped(&journal, ingest_job(one_record("big", i64::MAX - 10)));
        release.send(()).unwrap();
        blocker.recv().unwrap().unwrap();
        assert_eq!(big.recv().unwrap().unwrap().accepted, 1);
        assert_eq!(small.recv().unwrap().unwrap().accepted, 1);
        let err = over.recv().unwrap().unwrap_err().to_string();
        assert!(err.contains("would overflow"), "{err}");
        assert_eq!(dup.recv().unwrap().unwrap().duplicates, 1);
        assert_eq!(total(&journal), (i64::MAX - 5, 2, 2));
        journal.close();
    }

    /// Polls `f` once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        let mut f = Some(f);
        std::future::poll_fn(move |cx| match f.take().unwrap().poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
