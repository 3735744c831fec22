//! `presence gateway`: not built yet (issue #4). The crate exists so the workspace shows the
//! final shape: it depends only on `presence-core` and talks to the others through Kafka.

use presence_core::{Config, Shutdown};

/// Runs the gateway until `shutdown`.
pub async fn run(_config: Config, _shutdown: Shutdown) -> anyhow::Result<()> {
    anyhow::bail!("presence gateway is not built yet (issue #4); the other subcommands work")
}
