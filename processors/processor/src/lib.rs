//! `presence processor`.

pub mod records;
pub mod facilities;
pub mod sessions;

use presence_core::{Config, Shutdown};

pub async fn run(_config: Config, _shutdown: Shutdown) -> anyhow::Result<()> {
    anyhow::bail!("presence processor is not built yet (issue #3); the other subcommands work")
}
