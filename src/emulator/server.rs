//! The accept loop. It exists (instead of `axum::serve`) so a fault can close a connection without any answer:
//! each connection gets a [`ConnectionKill`] in its requests' extensions, and its task drops the socket when a
//! handler fires it.

use super::faults::ConnectionKill;
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Serves `router` on `listener` until `shutdown` completes; open connections finish on their own.
pub(super) async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(message = "Accept failed.", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let kill = ConnectionKill::default();
        let service = TowerToHyperService::new(router.clone().layer(Extension(kill.clone())));
        tokio::spawn(async move {
            let builder = Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        debug!(message = "Connection ended with an error.", %peer, %error);
                    }
                }
                () = kill.0.notified() => {
                    debug!(message = "Connection dropped by fault injection.", %peer);
                }
            }
        });
    }
}
