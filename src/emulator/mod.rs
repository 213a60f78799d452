//! `meterd emulator`: a local Azure Marketplace (Entra token endpoints, Metering API, SaaS subscription list) with
//! fault injection.
//!
//! Why it exists: meterd's hard cases (first write wins per hour, the 24-hour window, HTTP 200 batches where every
//! item failed, a 429 with `Retry-After`, an answer lost after the marketplace recorded the events, paging through a
//! `@nextLink` on another host) cannot be produced on demand against the real service. The emulator reproduces the
//! contract in `shared/azure-marketplace.md` with the exact body shapes of `shared/fixtures/`, keeps its own
//! shiftable clock, and lets tests and developers script failures per route through an admin API.
//!
//! # Layout
//!
//! - [`config`]: [`EmulatorConfig`], defaults (credentials, seed subscriptions), seed files, durations.
//! - `model`: subscriptions, plans, managed apps and usage events as the emulator stores them.
//! - `state`: the mutable world behind one mutex.
//! - `usage`: the metering rules and the JSON they answer with.
//! - `call`: what every marketplace call shares: request ids, logging, bearer auth, `api-version`, the fault guard.
//! - `metering`, `saas`, `token`: the marketplace routes.
//! - `admin`: `/emulator/...`, the control API.
//! - `faults`: scripted failures, delays, dropped connections.
//! - `routes`: the router (the route table).
//! - `server`: the accept loop that can drop a connection without answering.
//! - `clock`: the emulator's own clock.

mod admin;
mod call;
mod clock;
pub mod config;
mod faults;
mod metering;
mod model;
mod routes;
mod saas;
mod server;
mod state;
mod token;
mod usage;

pub use config::{ConfigError, Credentials, EmulatorConfig, NextLinkMode, ResultOrder};
pub use faults::{Fault, FaultKind, Phase, Route};
pub use model::{
    AcceptedEvent, ManagedApp, Plan, ReceivedEvent, Subscription, SubscriptionStatus, Term,
};

use crate::clock::{Clock, SharedClock};
use chrono::{DateTime, Utc};
use clock::EmulatorClock;
use state::State;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::info;

/// `meterd emulator`: run a local Azure Marketplace.
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// Address to listen on; meterd's base_url is then http://ADDRESS/api.
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: String,
    /// Seed file (.toml or .json): credentials, plans, subscriptions, managed apps, knobs.
    #[arg(long)]
    pub seed: Option<PathBuf>,
    /// Subscriptions per page of GET /api/saas/subscriptions/ (default 2, or the seed's page_size).
    #[arg(long)]
    pub page_size: Option<usize>,
    /// Lifetime of issued tokens, like 30s, 5m, 1h (default 1h).
    #[arg(long)]
    pub token_lifetime: Option<String>,
    /// Latency added to every marketplace call, like 200ms or 2s (default none).
    #[arg(long)]
    pub latency: Option<String>,
    /// Make @nextLink point at another host name of this server (http://localhost:PORT/api; start at 127.0.0.1), as production does.
    #[arg(long)]
    pub foreign_next_link: bool,
    /// Make @nextLink start with this base URL (ending in /api), e.g. http://localhost:8788/api.
    #[arg(long)]
    pub next_link_base: Option<String>,
    /// Order of batch results: as-sent, reversed or shuffled (clients must match by fields).
    #[arg(long)]
    pub result_order: Option<String>,
}

impl EmulatorArgs {
    /// The configuration these arguments describe (seed file, then flags).
    pub fn config(&self) -> anyhow::Result<EmulatorConfig> {
        let mut config = match &self.seed {
            Some(path) => EmulatorConfig::from_seed_file(path)?,
            None => EmulatorConfig::default(),
        };
        if let Some(n) = self.page_size {
            config.page_size = n.max(1);
        }
        if let Some(t) = &self.token_lifetime {
            config.token_lifetime = config::parse_std_duration(t)?;
        }
        if let Some(l) = &self.latency {
            config.latency = config::parse_std_duration(l)?;
        }
        if self.foreign_next_link {
            config.next_link = NextLinkMode::ForeignHost;
        }
        if let Some(base) = &self.next_link_base {
            config.next_link = NextLinkMode::Base(base.clone());
        }
        if let Some(order) = &self.result_order {
            config.result_order = config::parse_result_order(order).ok_or_else(|| {
                anyhow::anyhow!(
                    "--result-order must be as-sent, reversed or shuffled, not {order:?}"
                )
            })?;
        }
        Ok(config)
    }
}

/// Runs the emulator from the command line until ctrl-c.
pub async fn run_cli(args: EmulatorArgs) -> anyhow::Result<()> {
    let emulator = Emulator::new(args.config()?);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    info!("emulator listening on http://{addr}");
    info!(
        message = "Emulator ready.",
        base_url = %format!("http://{addr}/api"),
        token_url = %format!("http://{addr}/{}/oauth2/v2.0/token", emulator.lock().current.credentials.tenant),
        admin = %format!("http://{addr}/emulator/"),
    );
    emulator
        .serve(listener, async {
            // If ctrl-c cannot be watched, serve until killed.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            info!(message = "Emulator stopping.");
        })
        .await?;
    Ok(())
}

/// A running (or ready to run) marketplace emulator; clones share the same state.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept for `reset`.
    config: EmulatorConfig,
    clock: Arc<EmulatorClock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// An emulator with `config`'s catalogue and knobs.
    pub fn new(config: EmulatorConfig) -> Self {
        let clock = Arc::new(EmulatorClock::new(config.clock.clone()));
        let state = Mutex::new(State::from_config(&config));
        Self {
            inner: Arc::new(Inner {
                config,
                clock,
                state,
            }),
        }
    }

    /// An emulator seeded from a TOML or JSON file (see `docs/emulator.md`).
    pub fn from_seed_file(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::new(EmulatorConfig::from_seed_file(path)?))
    }

    /// Every route: `/api/...`, the token endpoints and `/emulator/...`.
    pub fn router(&self) -> axum::Router {
        routes::router(self)
    }

    /// Serves on `listener` until `shutdown` completes. Use this (not `axum::serve(router)`) so that "drop the
    /// connection" faults really close the socket.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        server::serve(self.router(), listener, shutdown).await
    }

    /// Starts an emulator on `127.0.0.1:0` in the background, for in-process use and tests. Abort the handle to
    /// stop accepting connections.
    pub async fn spawn_local(
        config: EmulatorConfig,
    ) -> std::io::Result<(SocketAddr, Emulator, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let emulator = Emulator::new(config);
        let server = emulator.clone();
        let handle = tokio::spawn(async move {
            if let Err(error) = server.serve(listener, std::future::pending()).await {
                tracing::error!(message = "Emulator stopped.", %error);
            }
        });
        Ok((addr, emulator, handle))
    }

    /// The emulator's own clock (shiftable through [`Emulator::shift_clock`] or `POST /emulator/clock`).
    pub fn clock(&self) -> SharedClock {
        self.inner.clock.clone()
    }

    /// Now, by the emulator's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Moves the emulator's clock by `by` (negative: back).
    pub fn shift_clock(&self, by: chrono::Duration) {
        self.inner.clock.shift(by);
    }

    /// Sets the emulator's clock to `at` (it then runs on from there).
    pub fn set_clock(&self, at: DateTime<Utc>) {
        self.inner.clock.set(at);
    }

    /// Adds a subscription, or replaces the one with its id.
    pub fn add_subscription(&self, subscription: Subscription) {
        self.lock().upsert_subscription(subscription);
    }

    /// Changes a subscription's status; false if the id is unknown.
    pub fn set_status(&self, id: &str, status: SubscriptionStatus) -> bool {
        let now = self.now();
        let mut state = self.lock();
        match state
            .current
            .subscriptions
            .iter_mut()
            .find(|s| s.id.eq_ignore_ascii_case(id))
        {
            Some(s) => {
                s.unsubscribed_at = match status {
                    SubscriptionStatus::Unsubscribed => s.unsubscribed_at.or(Some(now)),
                    _ => None,
                };
                s.saas_subscription_status = status;
                true
            }
            None => false,
        }
    }

    /// Scripts the real cancellation of subscription `id` at `at` (emulator clock): from then on the list shows it
    /// `Unsubscribed` and hours ending after `at` answer `ResourceNotFound`, whatever a client last listed.
    pub fn cancel_at(&self, id: &str, at: DateTime<Utc>) {
        self.lock()
            .faults
            .cancellations
            .insert(id.to_ascii_lowercase(), at);
    }

    /// Makes every batch holding an event for `dimension` fail as a whole with 400 (one malformed event).
    pub fn poison_dimension(&self, dimension: &str) {
        self.lock()
            .faults
            .poison_dimensions
            .insert(dimension.to_string());
    }

    /// Every subscription, in list order.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.lock().current.subscriptions.clone()
    }

    /// Adds a plan, or replaces the one with its id.
    pub fn add_plan(&self, plan: Plan) {
        self.lock().upsert_plan(plan);
    }

    /// Adds a managed application that may be metered by `resourceUri` or `resourceUsageId`.
    pub fn add_managed_app(&self, app: ManagedApp) {
        self.lock().upsert_managed_app(app);
    }

    /// Every usage event received, with the status it got.
    pub fn received_events(&self) -> Vec<ReceivedEvent> {
        self.lock().received.clone()
    }

    /// The accepted ("billed") events.
    pub fn accepted_events(&self) -> Vec<AcceptedEvent> {
        self.lock().accepted.clone()
    }

    /// Scripts a fault (see [`Fault`]).
    pub fn add_fault(&self, fault: Fault) {
        self.lock().faults.scripted.push(fault);
    }

    /// Fails the next `times` calls of `route` with `status` (and `Retry-After: retry_after` seconds if given).
    pub fn fail_next(&self, route: Route, times: u32, status: u16, retry_after: Option<u64>) {
        self.add_fault(Fault::new(
            route,
            FaultKind::Fail {
                status,
                retry_after,
                body: None,
            },
            times,
        ));
    }

    /// Drops the connection of the next `times` calls of `route`, before or after processing.
    pub fn drop_next(&self, route: Route, times: u32, phase: Phase) {
        self.add_fault(Fault::new(route, FaultKind::Drop { phase }, times));
    }

    /// Delays the next `times` calls of `route` by `delay`, before or after processing.
    pub fn delay_next(&self, route: Route, times: u32, delay: std::time::Duration, phase: Phase) {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.add_fault(Fault::new(
            route,
            FaultKind::Delay { delay_ms, phase },
            times,
        ));
    }

    /// Latency added to every marketplace call from now on (on top of the configured one).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().faults.latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    }

    /// Refuses events for `resource` (a resourceId or resourceUri): 403 on the single call,
    /// `ResourceNotAuthorized` in a batch.
    pub fn forbid_resource(&self, resource: &str) {
        self.lock()
            .faults
            .forbidden
            .insert(resource.trim().to_ascii_lowercase());
    }

    /// The next `count` events that would be accepted get the status `Error` instead.
    pub fn fail_next_events(&self, count: u32) {
        self.lock().faults.event_errors = count;
    }

    /// Removes every fault and standing fault setting.
    pub fn clear_faults(&self) {
        self.lock().faults = faults::Faults::default();
    }

    /// Calls received on `route` so far, faulted ones included.
    pub fn request_count(&self, route: Route) -> u64 {
        self.lock()
            .requests
            .get(route.name())
            .copied()
            .unwrap_or_default()
    }

    /// Issues a token as the token endpoints would (valid for the configured lifetime by the emulator clock).
    pub fn issue_token(&self) -> String {
        let now = self.now();
        self.lock().issue_token(now).0
    }

    /// Back to the initial configuration: catalogue, events, tokens, faults, counters and clock offset.
    pub fn reset(&self) {
        *self.lock() = State::from_config(&self.inner.config);
        self.inner.clock.reset();
    }

    pub(crate) fn emulator_clock(&self) -> &EmulatorClock {
        &self.inner.clock
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // State stays consistent between statements, so a panic elsewhere leaves it usable.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
