//! Clean shutdown: SIGTERM or Ctrl-C trips one token; every task watches it, finishes or
//! aborts its unit of work (a transaction, a batch), commits, flushes and returns.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A token that trips on SIGTERM or SIGINT.
    pub fn on_signals() -> Shutdown {
        let s = Shutdown::new();
        let trip = s.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
                            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this process cleanly");
                        let _ = ctrl_c.await;
                    }
                }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            trip.trigger();
        });
        s
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn wait(&self) {
        self.token.cancelled().await
    }
}
