//! How meterd authenticates to Entra ID: [`AuthConfig`] (client secret, managed identity, static token), its checks
//! and the token endpoint it implies. [`super::auth`] fetches and caches the tokens.

use super::error::AuthError;
use crate::secret::Secret;

/// The default IMDS token endpoint (VMs, managed applications).
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// Which Entra token endpoint a client secret is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointVersion {
    /// `/oauth2/token` with `resource=`; numbers come back as strings.
    V1,
    /// `/oauth2/v2.0/token` with `scope=<resource>/.default`.
    #[default]
    V2,
}

/// How meterd authenticates. `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// An Entra app registration with a client secret (the app registered on the offer in Partner Center).
    ClientSecret {
        /// The tenant that owns the app (its id, not `common`).
        tenant_id: String,
        /// The app (client) id.
        client_id: String,
        /// The secret's value.
        secret: Secret,
        /// Overrides the endpoint (default from `tenant_id` and `version`).
        token_url: Option<String>,
        /// v1 or v2 endpoint.
        version: EndpointVersion,
    },
    /// A managed identity: IMDS, or App Service style when `identity_header` is set.
    ManagedIdentity {
        /// Overrides the endpoint (default [`IMDS_ENDPOINT`], or `$IDENTITY_ENDPOINT`).
        endpoint: Option<String>,
        /// A user-assigned identity's client id.
        client_id: Option<String>,
        /// `$IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER` (App Service style).
        identity_header: Option<Secret>,
    },
    /// A fixed token (tests, the emulator).
    StaticToken {
        /// The token.
        token: Secret,
    },
}

impl AuthConfig {
    /// A managed identity configuration that uses `$IDENTITY_ENDPOINT` and `$IDENTITY_HEADER` when both are set
    /// (App Service, Container Apps), else IMDS.
    pub fn managed_identity_from_env(client_id: Option<String>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (var("IDENTITY_ENDPOINT"), var("IDENTITY_HEADER")) {
            (Some(endpoint), Some(header)) => Self::ManagedIdentity {
                endpoint: Some(endpoint),
                client_id,
                identity_header: Some(Secret::new(header)),
            },
            _ => Self::ManagedIdentity {
                endpoint: None,
                client_id,
                identity_header: None,
            },
        }
    }

    /// Rejects configurations that cannot work, with a message that says what to change.
    pub fn validate(&self) -> Result<(), AuthError> {
        let reason = match self {
            Self::ClientSecret {
                tenant_id,
                client_id,
                token_url,
                ..
            } => {
                let tenant = tenant_id.trim().to_ascii_lowercase();
                if token_url.as_deref().is_some_and(|u| !u.is_empty()) {
                    None
                } else if tenant.is_empty() {
                    Some("tenant_id is empty".to_owned())
                } else if ["common", "organizations", "consumers"].contains(&tenant.as_str()) {
                    Some(format!(
                        "tenant_id {tenant_id:?} cannot issue app tokens: use the id of the tenant that owns the \
                         app registered on the offer in Partner Center"
                    ))
                } else if client_id.trim().is_empty() {
                    Some("client_id is empty".to_owned())
                } else {
                    None
                }
            }
            Self::ManagedIdentity { .. } => None,
            Self::StaticToken { token } => token
                .expose()
                .is_empty()
                .then(|| "the static token is empty".to_owned()),
        };
        match reason {
            Some(reason) => Err(AuthError::Config { reason }),
            None => Ok(()),
        }
    }

    /// The URL tokens are fetched from (`None` for a static token).
    pub fn token_url(&self) -> Option<String> {
        match self {
            Self::ClientSecret {
                tenant_id,
                token_url,
                version,
                ..
            } => Some(token_url.clone().filter(|u| !u.is_empty()).unwrap_or_else(
                || match version {
                    EndpointVersion::V1 => {
                        format!("https://login.microsoftonline.com/{tenant_id}/oauth2/token")
                    }
                    EndpointVersion::V2 => {
                        format!("https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token")
                    }
                },
            )),
            Self::ManagedIdentity { endpoint, .. } => Some(
                endpoint
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| IMDS_ENDPOINT.to_owned()),
            ),
            Self::StaticToken { .. } => None,
        }
    }
}
