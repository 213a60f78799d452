//! The local Azure Marketplace emulator (being built on the `emulator` branch).

/// Arguments of `meterd emulator`.
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: String,
}

/// Runs the emulator.
pub async fn run_cli(_args: EmulatorArgs) -> anyhow::Result<()> {
    anyhow::bail!("the emulator is not merged yet")
}
/// Placeholder until the emulator branch lands.
pub const DEFAULT_STATIC_TOKEN: &str = "emulator-token";
/// Placeholder.
#[derive(Default)]
pub struct EmulatorConfig;
/// Placeholder.
pub struct Emulator;
impl Emulator {
    /// Placeholder.
    pub async fn spawn_local(
        _c: EmulatorConfig,
    ) -> std::io::Result<(std::net::SocketAddr, Emulator, tokio::task::JoinHandle<()>)> {
        Err(std::io::Error::other("emulator not merged"))
    }
}
