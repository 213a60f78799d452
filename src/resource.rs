//! Resource identity (rules layer): the one place that tells a SaaS subscription id from a managed application.
//!
//! A record names its resource one of three ways, and this module alone decides which:
//! - a SaaS subscription id (a GUID): sent as `resourceId`, checked against the SaaS subscription list;
//! - a managed application's ARM id (`/subscriptions/...`): sent as `resourceUri`, never checked;
//! - any other id (a managed app's `resourceUsageId`): sent as `resourceId`, not checked (no list shows it; the
//!   marketplace judges it).

use std::fmt;

/// True for `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex).
pub fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The resource an event is reported for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ResourceRef {
    /// A SaaS subscription id (or a managed app's `resourceUsageId`): sent as `resourceId`.
    SaasId(String),
    /// A managed application's ARM id (`/subscriptions/...`): sent as `resourceUri`.
    ResourceUri(String),
}

impl ResourceRef {
    /// An ARM id (starting `/subscriptions/`, any case) is a `resourceUri`; anything else a `resourceId`.
    pub fn parse(value: &str) -> Self {
        let looks_like_arm = value
            .get(..15)
            .is_some_and(|p| p.eq_ignore_ascii_case("/subscriptions/"));
        if looks_like_arm {
            Self::ResourceUri(value.to_owned())
        } else {
            Self::SaasId(value.to_owned())
        }
    }

    /// The id or URI itself.
    pub fn as_str(&self) -> &str {
        match self {
            Self::SaasId(s) | Self::ResourceUri(s) => s,
        }
    }

    /// The JSON field it is sent as.
    pub fn field_name(&self) -> &'static str {
        match self {
            Self::SaasId(_) => "resourceId",
            Self::ResourceUri(_) => "resourceUri",
        }
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ResourceRef {
    /// True when the SaaS subscription list decides whether this resource is billable (a SaaS GUID).
    pub fn is_saas_subscription(&self) -> bool {
        matches!(self, Self::SaasId(id) if is_guid(id))
    }
}
