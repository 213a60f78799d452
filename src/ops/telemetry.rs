//! Typed telemetry, in the style of vector's internal events: one value per thing that happened, and one call
//! ([`InternalEvent::emit`]) that logs it, counts it and records its figures, so the log line and the metric can
//! never drift apart. Metric names and labels are the ones `ops::metrics::describe` documents.

/// Something that happened inside meterd, as one value.
pub trait InternalEvent {
    /// Logs, counts and records the event.
    fn emit(self);
}

/// The SaaS subscription list was fetched (it is stored next; that logs on its own).
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionListFetched {
    /// How long the fetch (every page) took.
    pub elapsed: std::time::Duration,
}

impl InternalEvent for SubscriptionListFetched {
    fn emit(self) {
        metrics::counter!("meterd_subscription_refreshes_total", "result" => "ok").increment(1);
        metrics::histogram!("meterd_subscription_refresh_seconds")
            .record(self.elapsed.as_secs_f64());
    }
}

/// The SaaS subscription list could not be fetched; meterd keeps using what it saw last.
#[derive(Clone, Copy)]
pub struct SubscriptionListFailed<'a> {
    /// What went wrong.
    pub error: &'a dyn std::fmt::Display,
    /// What to do about it (401/403), or empty.
    pub advice: &'a str,
}

impl InternalEvent for SubscriptionListFailed<'_> {
    fn emit(self) {
        metrics::counter!("meterd_subscription_refreshes_total", "result" => "error").increment(1);
        tracing::warn!(
            message = "Could not fetch the subscription list; using what meterd saw last.",
            error = %self.error, advice = self.advice
        );
    }
}

/// Events settled by a pass (or one batch), counted per outcome label (`accepted`, ..., `held`, `retry`).
#[derive(Debug, Clone, Copy)]
pub struct EventsSettled<'a> {
    /// The outcome label.
    pub outcome: &'a str,
    /// How many.
    pub count: u64,
}

impl InternalEvent for EventsSettled<'_> {
    fn emit(self) {
        metrics::counter!("meterd_events_total", "outcome" => self.outcome.to_string())
            .increment(self.count);
    }
}
