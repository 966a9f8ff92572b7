//! The `ringbus` command line: operator tools today, the broker (`serve`) next.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ringbus",
    version,
    about = "A single-machine event log engine and message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a segment's batches (offsets, sizes, timestamps, CRC status) and its index.
    Segdump {
        /// Path to a `<base offset>.log` segment file.
        path: PathBuf,
        /// Also print every record's key, value size and headers.
        #[arg(long)]
        records: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Segdump { path, records } => {
            let text = ringbus::storage::dump::dump_segment(&path, records)?;
            print!("{text}");
        }
    }
    Ok(())
}
