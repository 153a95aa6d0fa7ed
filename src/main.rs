//! The `fencegate` command: a thin front over the library's entry points.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fencegate::config::{self, FilterArgs, LogArgs};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "fencegate", version, about = "Fencing tokens for stores that have none", long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run in front of a store: refuse writes whose fencing token is stale.
    Filter(FilterArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    config::init_logging(&cli.log);
    match cli.cmd {
        Cmd::Filter(args) => {
            let cfg = args.config().map_err(anyhow::Error::msg)?;
            let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
            let admin = match args.admin_listen {
                Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("binding {a}"))?),
                None => None,
            };
            fencegate::filter::run(cfg, listener, admin, fencegate::proxy::shutdown_signal())
                .await
                .context("the filter could not start")?;
        }
    }
    Ok(())
}
