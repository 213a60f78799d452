//! What went wrong with a marketplace call, as values: [`CallError`] (transient or fatal, ambiguous or not) with the
//! [`RequestIds`] it was sent with, and [`AuthError`] (no token could be had). [`super::client`] and
//! [`super::auth`] build them; the emitter and the CLI act on them.

use std::fmt;
use std::time::Duration;

use uuid::Uuid;

use super::advice::{aadsts_advice, find_aadsts_code};

/// The GUIDs sent with a call; log them, support asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestIds {
    /// `x-ms-requestid`: this HTTP request (the last one, after a 401 retry or for a page).
    pub request_id: Uuid,
    /// `x-ms-correlationid`: the whole operation (all pages of a listing, both tries of a 401 retry).
    pub correlation_id: Uuid,
}

impl RequestIds {
    /// Fresh random ids.
    pub fn new() -> Self {
        Self {
            request_id: Uuid::new_v4(),
            correlation_id: Uuid::new_v4(),
        }
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "x-ms-requestid={} x-ms-correlationid={}",
            self.request_id, self.correlation_id
        )
    }
}

/// What kind of transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientKind {
    /// Could not connect (nothing was sent).
    Connect,
    /// No answer in time.
    Timeout,
    /// Connection dropped or another network failure.
    Network,
    /// 429.
    RateLimited,
    /// 5xx or 408.
    Server,
    /// No token, or 401 after a refresh.
    Auth,
    /// A success answer that could not be parsed.
    Decode,
}

/// What kind of fatal failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalKind {
    /// 400: the body was rejected.
    BadRequest,
    /// 403: this identity may not call the API (see the advice).
    Forbidden,
    /// 404: wrong base URL or unknown resource.
    NotFound,
    /// The service broke the protocol (a `@nextLink` loop, too many pages, a link to a plain-HTTP host).
    Protocol,
    /// Any other answer.
    Other,
}

/// Why a call failed, as the emitter needs it.
#[derive(Debug, Clone)]
pub enum CallError {
    /// Retry later.
    Transient {
        /// What happened.
        kind: TransientKind,
        /// The server asked to wait this long (429/503 `Retry-After`).
        retry_after: Option<Duration>,
        /// The request may have reached the marketplace and been recorded.
        ambiguous: bool,
        /// HTTP status, if there was an answer.
        status: Option<u16>,
        /// Details (never a secret or token).
        message: String,
        /// The ids the call was sent with.
        ids: RequestIds,
    },
    /// Retrying cannot help; alert.
    Fatal {
        /// What happened.
        kind: FatalKind,
        /// HTTP status, if there was an answer.
        status: Option<u16>,
        /// Details, e.g. the 400 body.
        message: String,
        /// What to change, for 401/403.
        advice: Option<String>,
        /// The ids the call was sent with.
        ids: RequestIds,
    },
}

impl CallError {
    /// Retry later?
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// May the request have been recorded?
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            Self::Transient {
                ambiguous: true,
                ..
            }
        )
    }

    /// The server's requested delay.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::Fatal { .. } => None,
        }
    }

    /// The HTTP status, if there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Transient { status, .. } | Self::Fatal { status, .. } => *status,
        }
    }

    /// The ids the call was sent with.
    pub fn ids(&self) -> RequestIds {
        match self {
            Self::Transient { ids, .. } | Self::Fatal { ids, .. } => *ids,
        }
    }

    /// The advice for an operator, if any.
    pub fn advice(&self) -> Option<&str> {
        match self {
            Self::Fatal { advice, .. } => advice.as_deref(),
            Self::Transient { .. } => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient {
                kind,
                retry_after,
                ambiguous,
                status,
                message,
                ids,
            } => {
                write!(f, "transient {kind:?} failure")?;
                if let Some(status) = status {
                    write!(f, " (HTTP {status})")?;
                }
                write!(f, ": {message}")?;
                if let Some(delay) = retry_after {
                    write!(f, "; retry after {}s", delay.as_secs())?;
                }
                if *ambiguous {
                    f.write_str("; the marketplace may have recorded it")?;
                }
                write!(f, " [{ids}]")
            }
            Self::Fatal {
                kind,
                status,
                message,
                advice,
                ids,
            } => {
                write!(f, "{kind:?}")?;
                if let Some(status) = status {
                    write!(f, " (HTTP {status})")?;
                }
                write!(f, ": {message}")?;
                if let Some(advice) = advice {
                    write!(f, ". {advice}")?;
                }
                write!(f, " [{ids}]")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// Why no token could be had. Never holds a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Entra (or the identity endpoint) answered with an OAuth error.
    #[error("token request refused ({status}): {error}: {description}")]
    Entra {
        /// HTTP status.
        status: u16,
        /// OAuth `error`, e.g. `invalid_client`.
        error: String,
        /// `error_description`, with the `AADSTS` code.
        description: String,
    },
    /// Another error answer.
    #[error("token endpoint answered {status}: {body}")]
    Http {
        /// HTTP status.
        status: u16,
        /// An excerpt of the body.
        body: String,
    },
    /// The endpoint could not be reached, or did not answer in time.
    #[error("token endpoint unreachable: {message}")]
    Network {
        /// What failed.
        message: String,
        /// It was a timeout.
        timeout: bool,
    },
    /// A success answer that is not a token response (its body is not repeated: it may hold a token).
    #[error("token response not understood: {reason}")]
    Decode {
        /// What was wrong.
        reason: String,
    },
    /// The configuration cannot work (e.g. an unparsable endpoint URL).
    #[error("authentication misconfigured: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
}

impl AuthError {
    /// Actionable advice for an `AADSTS` code in the answer, if any.
    pub fn advice(&self) -> Option<&'static str> {
        match self {
            Self::Entra { description, .. } => {
                find_aadsts_code(description).and_then(aadsts_advice)
            }
            Self::Http { body, .. } => find_aadsts_code(body).and_then(aadsts_advice),
            _ => None,
        }
    }

    /// The HTTP status of the answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Entra { status, .. } | Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}
