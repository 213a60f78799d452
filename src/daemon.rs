//! `meterd run`: opens the journal, binds the listener, starts emission, and shuts down in order.

use crate::clock::SharedClock;
use crate::config::{ListenAddr, LogFormat, MarketplaceMode, Settings};
use crate::emit::schedule::Passes as _;
use crate::emit::{Emitter, LastPass, PassSummary, schedule};
use crate::ingest::{self, AppState};
use crate::journal::Journal;
use crate::secret::load_secret;
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Sets up tracing: text or JSON on stderr, filtered by `log.level` (or `RUST_LOG`).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(format!("{level},tokio_cron_scheduler=warn"))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr's reader gone: a closed pipe) is dropped. With the default,
        // tracing-subscriber reports it with `eprintln!`, which panics on that same closed stderr: every task
        // that logged (a request handler, the emitter) panicked and requests got empty replies.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A bound listener, TCP or unix.
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix domain socket (path removed on shutdown).
    Unix(tokio::net::UnixListener, std::path::PathBuf),
    /// Unix domain socket passed by systemd (socket activation); systemd owns the path, it is left alone.
    UnixActivated(tokio::net::UnixListener, Option<std::path::PathBuf>),
}

impl Listener {
    /// Binds `addr`; a stale unix socket file is replaced. Under socket activation (`LISTEN_FDS=1`,
    /// `LISTEN_PID` = this process, read from the process environment) takes fd 3 instead.
    pub async fn bind(addr: &ListenAddr) -> anyhow::Result<Listener> {
        Self::bind_env(addr, &std::env::vars().collect()).await
    }

    /// [`Listener::bind`] with the environment given: fd 3 when systemd passed it (`meterd.socket`), else `addr`.
    pub async fn bind_env(
        addr: &ListenAddr,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Listener> {
        use crate::ops::activation::{Activated, take_listener};
        match take_listener(env).map_err(anyhow::Error::msg)? {
            Some(Activated::Tcp(l)) => {
                let l = tokio::net::TcpListener::from_std(l)
                    .context("socket activation: cannot use the TCP socket on fd 3")?;
                tracing::info!(message = "Using the listener passed by systemd (socket activation); ingest.listen is not used.", configured = %addr);
                return Ok(Listener::Tcp(l));
            }
            Some(Activated::Unix(l, path)) => {
                let l = tokio::net::UnixListener::from_std(l)
                    .context("socket activation: cannot use the unix socket on fd 3")?;
                tracing::info!(message = "Using the listener passed by systemd (socket activation); ingest.listen is not used.", configured = %addr);
                return Ok(Listener::UnixActivated(l, path));
            }
            None => {}
        }
        match addr {
            ListenAddr::Tcp(a) => {
                let l = tokio::net::TcpListener::bind(a).await.with_context(|| {
                    format!("cannot listen on {a} (ingest.listen); is another meterd running?")
                })?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Unix(p) => {
                if p.exists() {
                    std::fs::remove_file(p)
                        .with_context(|| format!("cannot remove stale socket {}", p.display()))?;
                }
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).ok();
                }
                let l = tokio::net::UnixListener::bind(p).with_context(|| {
                    format!(
                        "cannot listen on unix socket {} (ingest.listen)",
                        p.display()
                    )
                })?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// What to print: `http://127.0.0.1:8787` or `unix:/path`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::UnixActivated(_, Some(p)) => format!("unix:{}", p.display()),
            Listener::UnixActivated(_, None) => "unix:(socket activation)".into(),
        }
    }
}

/// Loads the ingest bearer token: `ingest.token_file`, else `$CREDENTIALS_DIRECTORY/ingest-token`, else
/// `METERD_INGEST__TOKEN`.
pub fn ingest_token(
    settings: &Settings,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Option<crate::secret::Secret>> {
    Ok(load_secret(
        settings.ingest.token_file.as_deref(),
        "ingest-token",
        "METERD_INGEST__TOKEN",
        env,
    )?)
}

/// Serves the API on `listener` until `shutdown` resolves, then drains in-flight requests.
///
/// Slow-client protection: at most `ingest.max_connections` connections are open at once (an accept-side
/// semaphore: further clients wait in the kernel's backlog, so idle or trickling connections cannot exhaust file
/// descriptors or tasks), a connection must send its request headers within `ingest.request_timeout`, a connection
/// idle between requests for `ingest.request_timeout` is closed, and a request body must arrive within
/// `ingest.request_timeout` (408, see [`crate::ingest::read_body`]).
///
/// Nothing times out once a request is being handled past its body: its journal job may already be queued, and
/// an error answer (or a closed connection) for a job that then commits would make a retrying client count its
/// records twice (design.md invariant 2). The wait for the journal is bounded by the writer's busy timeout, which
/// answers 503 with nothing stored.
pub async fn serve(
    listener: Listener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let timeout = state.settings.ingest.request_timeout_std();
    let limit = state.settings.ingest.max_connections.max(1);
    let app = ingest::router(state).layer(tower::limit::ConcurrencyLimitLayer::new(limit));
    match listener {
        Listener::Tcp(l) => serve_connections(l, app, limit, timeout, shutdown).await,
        Listener::Unix(l, path) => {
            serve_connections(l, app, limit, timeout, shutdown).await;
            let _ = std::fs::remove_file(&path);
        }
        // systemd owns the path: it is left alone.
        Listener::UnixActivated(l, _) => serve_connections(l, app, limit, timeout, shutdown).await,
    }
    Ok(())
}

/// The accept loop behind [`serve`]: one permit of a `limit`-sized semaphore per open connection, HTTP/1 header
/// read timeout `timeout`, idle timeout `timeout` while no request of the connection is being handled, graceful
/// shutdown of every connection when `shutdown` resolves.
async fn serve_connections<L>(
    mut listener: L,
    app: axum::Router,
    limit: usize,
    timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(limit));
    let mut stop = stop_rx.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.wait_for(|v| *v) => break,
        };
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            _ = stop.wait_for(|v| *v) => break,
        };
        // Requests of this connection being handled: while any is, the idle timeout does not cut the connection.
        let in_flight = Arc::new(AtomicUsize::new(0));
        let app = app.clone();
        let counted = in_flight.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |req: axum::http::Request<hyper::body::Incoming>| {
                let busy = InFlight::enter(&counted);
                let app = app.clone();
                async move {
                    let answer = app.oneshot(req).await;
                    drop(busy);
                    answer
                }
            },
        ));
        let mut conn_stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout);
            let io = IdleTimeout::new(io, timeout, in_flight);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = conn_stop.wait_for(|v| *v) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    // Drain: every connection gives its permit back when it ends.
    let _ = permits.acquire_many(limit as u32).await;
}

/// Counts one request being handled until dropped (the handler finished or was dropped).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection that closes itself when a read waits longer than `timeout` for a byte while none of its requests
/// is being handled: hyper's header read timeout only starts with the first byte of a request, so without this an
/// idle connection (opened and never used, or kept alive and forgotten) would hold one of the `max_connections`
/// permits forever. While a request is being handled (`in_flight > 0`) hyper still polls the socket (to notice a
/// client that goes away); cutting the connection then would drop an answer whose journal job may commit, so the
/// timer is off; the body read has its own timeout in the handler.
struct IdleTimeout<I> {
    io: I,
    timeout: std::time::Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    in_flight: Arc<AtomicUsize>,
}

impl<I> IdleTimeout<I> {
    fn new(io: I, timeout: std::time::Duration, in_flight: Arc<AtomicUsize>) -> Self {
        Self {
            io,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            in_flight,
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending if this.in_flight.load(Ordering::SeqCst) > 0 => {
                // A request is being handled: no idle timeout; it starts afresh at the next idle read.
                this.armed = false;
                Poll::Pending
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(deadline);
                    this.armed = true;
                }
                if this.sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle connection closed (ingest.request_timeout)",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Everything `meterd run` needs that is not configuration.
pub struct RunContext {
    /// Source of "now".
    pub clock: SharedClock,
    /// Process environment (secrets, `CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET`).
    pub env: BTreeMap<String, String>,
}

/// The daemon. Returns when a shutdown signal has been handled.
pub async fn run(mut settings: Settings, ctx: RunContext) -> anyhow::Result<()> {
    // Try-it mode: the built-in emulator, in-process, so a newcomer sees the whole flow without credentials.
    let mut _emulator = None;
    if settings.marketplace.mode == MarketplaceMode::Emulator {
        let (addr, emu, task) =
            crate::emulator::Emulator::spawn_local(crate::emulator::EmulatorConfig::default())
                .await
                .context("cannot start the built-in emulator")?;
        settings.marketplace.base_url = format!("http://{addr}/api");
        tracing::warn!(
            message = "No marketplace credentials in use: reporting to the built-in emulator. Nothing is billed.",
            emulator = %format!("http://{addr}"),
            hint = "configure [marketplace.auth] and mode = \"azure\" to report to the Azure Marketplace"
        );
        _emulator = Some((emu, task));
    }
    let settings = Arc::new(settings);
    let journal = Journal::open(&settings.journal.path).with_context(|| {
        format!(
            "cannot open the journal at {}",
            settings.journal.path.display()
        )
    })?;
    // The journal lock proves no other meterd uses this journal: a lease left behind is a crashed process's.
    let stale = journal.clear_leases().await?;
    if stale > 0 {
        tracing::info!(
            message = "Cleared the emission lease of a process that stopped without releasing it."
        );
    }
    // The [[pools]] of the configuration, journaled (who = config) before the API answers.
    journal
        .pools_pass(settings.clone(), ctx.clock.now())
        .await
        .context("cannot journal the configured [[pools]]")?;
    let token = ingest_token(&settings, &ctx.env)?.map(Arc::new);
    if let ListenAddr::Tcp(a) = &settings.ingest.listen
        && token.is_none()
        && !(a.starts_with("127.") || a.starts_with("[::1]"))
    {
        tracing::warn!(
            message = "Ingest listens beyond loopback without a token; anyone who reaches it can report usage.",
            listen = %settings.ingest.listen
        );
    }
    let client = crate::emit::client(&settings, &ctx.env, ctx.clock.clone())?;
    // ---- Fleet emission (issue 14 part B, branch fleet-emit) -------------------------------------------------
    // In fleet mode (`[fleet]` with a URL) this replica emits from the shared PostgreSQL journal: the fleet
    // emitter replaces the local one in the pass loop (cron, startup catch-up, `POST /v1/flush`, final pass), and
    // the shared reads (report, status with the replicas, balance, usage, consumption, /metrics gauges) read it.
    // PostgreSQL down at start does not stop the daemon: ingest keeps acknowledging into the local journal and
    // each pass fails (logged, retried) until the shared journal answers.
    let (emitter, reads) = match &settings.fleet {
        Some(fleet) => {
            let pg = crate::journal::pg::PgJournal::connect(&fleet.url, fleet.pool_size)?;
            match pg.migrate().await {
                Ok(v) => {
                    tracing::info!(message = "Fleet mode: emitting from the shared PostgreSQL journal.", replica = %fleet.replica_id, schema_version = v)
                }
                Err(e) => {
                    tracing::warn!(message = "Fleet mode: the shared PostgreSQL journal is unavailable; passes retry until it answers.", replica = %fleet.replica_id, error = %e)
                }
            }
            let fleet_emitter = crate::fleet::emit::FleetEmitter::new(
                settings.clone(),
                fleet.clone(),
                pg.clone(),
                ctx.clock.clone(),
                client,
            );
            let reads = crate::journal::reads::Reads::Fleet {
                pg,
                replica_timeout: fleet.replica_timeout,
            };
            (Arc::new(AnyEmitter::Fleet(fleet_emitter)), reads)
        }
        None => (
            Arc::new(AnyEmitter::Local(Emitter::new(
                settings.clone(),
                journal.clone(),
                ctx.clock.clone(),
                client,
            ))),
            crate::journal::reads::Reads::Local(journal.clone()),
        ),
    };
    // ---- end of fleet emission -------------------------------------------------------------------------------
    let listener = Listener::bind_env(&settings.ingest.listen, &ctx.env).await?;
    // Journal open (migrations ran in `Journal::open`) and listener bound: ready. Sent before the first pass
    // starts so that systemd sees READY=1 before any STATUS= of a pass.
    crate::ops::notify_ready();
    let ready = Arc::new(AtomicBool::new(false));
    let liveness = Arc::new(crate::ops::Liveness::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gauges = Arc::new(crate::ops::metrics::JournalGauges::default());
    let pass_gauges = gauges.clone();
    let on_pass: Arc<dyn Fn(&PassSummary) + Send + Sync> = Arc::new(move |s: &PassSummary| {
        crate::ops::notify_status(&s.status_line());
        pass_gauges.request_refresh();
    });
    // The pass loop drives `emitter`: the local SQLite emitter, or in fleet mode the fleet emitter (the local
    // SQLite emitter never runs in fleet mode: each replica's journal holds only its own share of an hour; the
    // shared PostgreSQL journal is the one that is sent). Fleet mode needs this loop too (tests/fleet.rs).
    let (handle, mut scheduler, loop_task) = schedule::start(
        emitter.clone(),
        &settings.emit.schedule,
        liveness.clone(),
        stop_rx.clone(),
        on_pass,
    )
    .await?;
    let emit_control = Some(Arc::new(handle) as Arc<dyn crate::ingest::EmitControl>);
    let state = AppState {
        settings: settings.clone(),
        journal: journal.clone(),
        reads: reads.clone(),
        clock: ctx.clock.clone(),
        token,
        emitter: emit_control,
        metrics: crate::ops::metrics::renderer(Some((gauges.clone(), ctx.clock.clone()))),
        ready: ready.clone(),
        liveness: liveness.clone(),
    };
    tracing::info!(
        message = "meterd listening.",
        addr = %listener.describe(),
        journal = %settings.journal.path.display(),
        config = %settings.source,
        marketplace = %settings.marketplace.base_url
    );
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(serve(listener, state, async move {
        let _ = server_stop.wait_for(|v| *v).await;
    }));
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let gauge_task = crate::ops::metrics::spawn_journal_gauges(
        gauges,
        reads.clone(),
        ctx.clock.clone(),
        stop_rx.clone(),
    );
    let watchdog = crate::ops::spawn_watchdog(journal.clone(), liveness.clone(), &ctx.env);
    // ---- Fleet mode: the forward path (forwarder + heartbeat; docs/fleet.md) ----
    let fleet_forward = match &settings.fleet {
        Some(fleet) => {
            let pg = crate::fleet::connect(fleet)
                .context("cannot set up the fleet PostgreSQL journal ([fleet])")?;
            tracing::info!(
                message = "Fleet mode: records are acknowledged into the local outbox and forwarded to PostgreSQL.",
                replica = %fleet.replica_id
            );
            Some(crate::fleet::spawn(
                settings.clone(),
                fleet.clone(),
                journal.clone(),
                pg,
                ctx.clock.clone(),
                stop_rx.clone(),
            ))
        }
        None => None,
    };
    // ---- end of the fleet forward path ----
    // Alerts: in fleet mode they are raised in the shared journal, and every replica delivers from it.
    let alert_store = match &settings.fleet {
        Some(fleet) => crate::alerts::AlertStore::Fleet(
            crate::fleet::connect(fleet)
                .context("cannot set up the fleet PostgreSQL journal ([fleet])")?,
        ),
        None => crate::alerts::AlertStore::Local(journal.clone()),
    };
    let alerts = crate::alerts::spawn(
        alert_store,
        ctx.clock.clone(),
        settings.alerts.webhook_url.clone(),
        stop_rx.clone(),
    );

    shutdown_signal().await;
    crate::ops::notify_stopping();
    tracing::info!(message = "Shutting down: no new requests; finishing the ones in flight.");
    // A second signal ends the process at once; everything acknowledged is already committed.
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!(message = "Second signal: exiting now.");
        std::process::exit(130);
    });
    ready.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = stop_tx.send(true);
    server.await.context("server task")??;
    let bound = settings
        .emit
        .shutdown_timeout
        .to_std()
        .unwrap_or(std::time::Duration::from_secs(20));
    let _ = loop_task.await;
    let _ = scheduler.shutdown().await;
    match tokio::time::timeout(bound, emitter.pass()).await {
        Ok(Ok(s)) => tracing::info!(
            message = "Final emission pass done.",
            frozen = s.frozen,
            sent = s.sent,
            pending = s.pending_after
        ),
        Ok(Err(e)) => {
            tracing::warn!(message = "Final emission pass failed; pending events go at the next start.", error = %format!("{e:#}"))
        }
        Err(_) => tracing::warn!(
            message = "Final emission pass cut short by emit.shutdown_timeout; pending events go at the next start."
        ),
    }
    if let Some(tasks) = fleet_forward {
        // Each ends by itself within emit.shutdown_timeout (the forwarder's last drain is bounded by it).
        let _ = tokio::time::timeout(bound + std::time::Duration::from_secs(5), async {
            let _ = tasks.forwarder.await;
            let _ = tasks.heartbeat.await;
        })
        .await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    gauge_task.abort();
    // The delivery task was told to stop with the rest (before the final pass), so it makes no further attempt:
    // wait (briefly) for a delivery it has under way. Alerts raised by the final pass, and any still undelivered,
    // wait in the journal for the next start.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), alerts).await;
    journal.checkpoint().await.ok();
    journal.close();
    tracing::info!(message = "meterd stopped.");
    Ok(())
}

/// The emitter the pass loop drives: the local journal's, or in fleet mode the fleet emitter.
enum AnyEmitter {
    Local(Emitter),
    Fleet(crate::fleet::emit::FleetEmitter),
}

impl schedule::Passes for AnyEmitter {
    async fn pass(&self) -> anyhow::Result<PassSummary> {
        match self {
            AnyEmitter::Local(e) => e.pass().await,
            AnyEmitter::Fleet(e) => e.pass().await,
        }
    }

    async fn request_subscription_refresh(&self) {
        match self {
            AnyEmitter::Local(e) => e.request_subscription_refresh().await,
            AnyEmitter::Fleet(e) => e.request_subscription_refresh().await,
        }
    }

    async fn next_due(&self) -> anyhow::Result<Option<i64>> {
        match self {
            AnyEmitter::Local(e) => schedule::Passes::next_due(e).await,
            AnyEmitter::Fleet(e) => schedule::Passes::next_due(e).await,
        }
    }

    fn now_secs(&self) -> i64 {
        match self {
            AnyEmitter::Local(e) => schedule::Passes::now_secs(e),
            AnyEmitter::Fleet(e) => schedule::Passes::now_secs(e),
        }
    }

    fn last(&self) -> LastPass {
        match self {
            AnyEmitter::Local(e) => e.last(),
            AnyEmitter::Fleet(e) => e.last(),
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
