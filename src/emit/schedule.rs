//! Wake-ups: a UTC cron (`emit.schedule`), one catch-up pass at startup, `POST /v1/flush`, and a timer for the
//! next retry that is due. tokio-cron-scheduler only wakes the loop: it does not replay missed ticks, and it need
//! not, because every pass works from the journal. One task runs the passes, so they never overlap.

use super::{Emitter, LastPass, PassSummary};
use crate::ingest::{EmitControl, FlushFuture};
use crate::ops::Liveness;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

/// What the pass loop drives: the emitter of the SQLite journal, or (fleet mode) the fleet emitter.
pub trait Passes: Send + Sync + 'static {
    /// Runs one pass.
    fn pass(&self) -> impl Future<Output = anyhow::Result<PassSummary>> + Send;
    /// Makes the next pass re-read the subscription list and look at held events (an operator's flush).
    fn request_subscription_refresh(&self) -> impl Future<Output = ()> + Send;
    /// When the next retry is due (unix seconds), if any.
    fn next_due(&self) -> impl Future<Output = anyhow::Result<Option<i64>>> + Send;
    /// Now, unix seconds, by the emitter's clock.
    fn now_secs(&self) -> i64;
    /// The last pass, for status.
    fn last(&self) -> LastPass;
}

impl Passes for Emitter {
    async fn pass(&self) -> anyhow::Result<PassSummary> {
        Emitter::pass(self).await
    }

    async fn request_subscription_refresh(&self) {
        Emitter::request_subscription_refresh(self).await
    }

    async fn next_due(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.journal().next_due().await?)
    }

    fn now_secs(&self) -> i64 {
        self.clock.now().timestamp()
    }

    fn last(&self) -> LastPass {
        Emitter::last(self)
    }
}

/// Why the loop woke up.
pub enum Wake {
    /// The cron fired.
    Cron,
    /// Someone asked for a pass and waits for its summary.
    Flush(oneshot::Sender<anyhow::Result<PassSummary>>),
}

/// Handle used by the HTTP routes and the daemon.
pub struct EmitterHandle<E: Passes = Emitter> {
    tx: mpsc::Sender<Wake>,
    emitter: Arc<E>,
}

impl<E: Passes> Clone for EmitterHandle<E> {
    fn clone(&self) -> Self {
        EmitterHandle {
            tx: self.tx.clone(),
            emitter: self.emitter.clone(),
        }
    }
}

impl<E: Passes> EmitterHandle<E> {
    /// Runs a pass now (after any pass under way) and returns its summary.
    pub async fn flush(&self) -> anyhow::Result<PassSummary> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Wake::Flush(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the emitter has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the emitter stopped during the pass"))?
    }

    /// The emitter.
    pub fn emitter(&self) -> &Arc<E> {
        &self.emitter
    }
}

impl<E: Passes> EmitControl for EmitterHandle<E> {
    fn flush(&self) -> FlushFuture {
        let this = self.clone();
        Box::pin(async move { Ok(serde_json::to_value(EmitterHandle::flush(&this).await?)?) })
    }

    fn status_extra(&self) -> serde_json::Value {
        serde_json::to_value(self.emitter.last()).unwrap_or_default()
    }
}

/// Starts the cron scheduler (UTC) and the pass loop. The loop ends when `shutdown` turns true.
pub async fn start<E: Passes>(
    emitter: Arc<E>,
    schedule: &str,
    liveness: Arc<Liveness>,
    shutdown: watch::Receiver<bool>,
    on_pass: Arc<dyn Fn(&PassSummary) + Send + Sync>,
) -> anyhow::Result<(EmitterHandle<E>, JobScheduler, tokio::task::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Wake>(64);
    let scheduler = JobScheduler::new().await?;
    let cron_tx = tx.clone();
    let job = Job::new_async(schedule, move |_, _| {
        let tx = cron_tx.clone();
        Box::pin(async move {
            // A full queue means a pass is already waiting to run: nothing is lost by skipping.
            let _ = tx.try_send(Wake::Cron);
        })
    })
    .map_err(|e| {
        anyhow::anyhow!("emit.schedule `{schedule}` is not a valid cron expression: {e}")
    })?;
    scheduler.add(job).await?;
    let beat = liveness.clone();
    scheduler
        .add(Job::new_async("*/10 * * * * *", move |_, _| {
            let beat = beat.clone();
            Box::pin(async move { beat.tick() })
        })?)
        .await?;
    liveness.tick();
    scheduler.start().await?;
    let handle = EmitterHandle {
        tx,
        emitter: emitter.clone(),
    };
    let task = tokio::spawn(run_loop(emitter, rx, shutdown, on_pass));
    Ok((handle, scheduler, task))
}

async fn run_loop<E: Passes>(
    emitter: Arc<E>,
    mut rx: mpsc::Receiver<Wake>,
    mut shutdown: watch::Receiver<bool>,
    on_pass: Arc<dyn Fn(&PassSummary) + Send + Sync>,
) {
    // Catch-up after downtime: whatever closed while meterd was down goes now.
    let mut next_reply: Option<oneshot::Sender<anyhow::Result<PassSummary>>> = None;
    loop {
        let result = emitter.pass().await;
        if let Ok(s) = &result {
            on_pass(s);
        }
        if let Some(reply) = next_reply.take() {
            let _ = reply.send(result);
        }
        let wait = next_wait(&*emitter).await;
        let wake = tokio::select! {
            biased;
            _ = shutdown.wait_for(|v| *v) => break,
            wake = rx.recv() => match wake {
                None => break,
                Some(w) => Some(w),
            },
            _ = tokio::time::sleep(wait) => None,
        };
        if let Some(Wake::Flush(reply)) = wake {
            // An operator asked: a subscription may just have been activated, so look again.
            emitter.request_subscription_refresh().await;
            next_reply = Some(reply);
        }
    }
}

/// How long to sleep until the next retry is due (at most a minute, so clock steps are noticed). With nothing
/// pending, only the cron or a flush wakes the loop.
async fn next_wait<E: Passes>(emitter: &E) -> std::time::Duration {
    let now = emitter.now_secs();
    match emitter.next_due().await {
        Ok(Some(due)) if due > now => std::time::Duration::from_secs(((due - now) as u64).min(60)),
        Ok(Some(_)) => std::time::Duration::from_secs(1),
        Ok(None) => std::time::Duration::from_secs(365 * 86_400),
        Err(_) => std::time::Duration::from_secs(60),
    }
}
