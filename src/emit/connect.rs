//! Building the marketplace client (and its token provider) from the settings.

use crate::clock::SharedClock;
use crate::config::{AuthKind, EndpointVersion, MarketplaceMode, Settings};
use crate::marketplace::auth::{AuthConfig, CachedTokenProvider, TokenProvider};
use crate::marketplace::client::MarketplaceClient;
use anyhow::Context;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Builds the token provider for the configured auth kind, loading the secret.
pub fn token_provider(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: SharedClock,
) -> anyhow::Result<Arc<dyn TokenProvider>> {
    let a = &settings.marketplace.auth;
    let config = match a.kind {
        AuthKind::StaticToken => {
            let token = crate::secret::load_secret(
                a.static_token_file.as_deref(),
                "static-token",
                "METERD_MARKETPLACE__AUTH__STATIC_TOKEN",
                env,
            )?;
            let token = match (token, settings.marketplace.mode) {
                (Some(t), _) => t,
                (None, MarketplaceMode::Emulator) => {
                    crate::secret::Secret::new(crate::config::EMULATOR_STATIC_TOKEN)
                }
                (None, MarketplaceMode::Azure) => anyhow::bail!(
                    "marketplace.auth.kind = \"static_token\" needs a token: set static_token_file, \
                     $CREDENTIALS_DIRECTORY/static-token or METERD_MARKETPLACE__AUTH__STATIC_TOKEN"
                ),
            };
            AuthConfig::StaticToken { token }
        }
        AuthKind::ClientSecret => {
            let secret = crate::secret::load_secret(a.client_secret_file.as_deref(), "client-secret", "METERD_MARKETPLACE__AUTH__CLIENT_SECRET", env)?
                .context(
                    "no client secret: set marketplace.auth.client_secret_file, pass it as the systemd credential \
                     `client-secret` (LoadCredential=client-secret:/path), or set METERD_MARKETPLACE__AUTH__CLIENT_SECRET; \
                     to try meterd without credentials run `meterd run --emulator`",
                )?;
            AuthConfig::ClientSecret {
                tenant_id: a.tenant_id.clone(),
                client_id: a.client_id.clone(),
                secret,
                token_url: a.token_url.clone(),
                version: match a.endpoint_version {
                    EndpointVersion::V1 => crate::marketplace::auth::EndpointVersion::V1,
                    EndpointVersion::V2 => crate::marketplace::auth::EndpointVersion::V2,
                },
            }
        }
        AuthKind::ManagedIdentity => {
            let client_id = Some(a.client_id.clone()).filter(|c| !c.is_empty());
            match &a.identity_endpoint {
                Some(e) => AuthConfig::ManagedIdentity {
                    endpoint: Some(e.clone()),
                    client_id,
                    identity_header: env
                        .get("IDENTITY_HEADER")
                        .map(|h| crate::secret::Secret::new(h.clone())),
                },
                None => AuthConfig::managed_identity_from_env(client_id),
            }
        }
    };
    Ok(Arc::new(CachedTokenProvider::new(config, clock)?))
}

/// Builds the marketplace client from the settings.
pub fn client(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: SharedClock,
) -> anyhow::Result<MarketplaceClient> {
    let auth = token_provider(settings, env, clock.clone())?;
    let timeout = settings
        .marketplace
        .timeout
        .to_std()
        .unwrap_or(std::time::Duration::from_secs(30));
    Ok(MarketplaceClient::new(
        settings.marketplace.base_url.clone(),
        auth,
        clock,
        timeout,
    )?)
}
