//! `presence sink`: not built yet (issue #5). The crate exists so the workspace shows the
//! final shape: it depends only on `presence-core` and talks to the others through Kafka.

use presence_core::{Config, Shutdown};

/// Runs the sink until `shutdown`.
pub async fn run(_config: Config, _shutdown: Shutdown) -> anyhow::Result<()> {
    anyhow::bail!("presence sink is not built yet (issue #5); the other subcommands work")
}
