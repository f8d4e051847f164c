//! `cairn`: the one binary. No arguments runs the all-in-one default; `run CONFIG` runs any
//! config; `check-config CONFIG` validates one; `bench` is the load generator.

mod bench;
mod check;
mod run;
mod workers;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: large blob buffers come and go at high rates, and
/// glibc's malloc returns them to the kernel, which then zeroes fresh pages for the next one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Remote build cache and remote execution service (REAPI v2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server described by a JSON5 config file.
    Run { config: PathBuf },
    /// Validate a config file and print its resolved store and scheduler trees.
    CheckConfig { config: PathBuf },
    /// Load generator against any REAPI endpoint.
    Bench(bench::BenchArgs),
    /// Print the built-in all-in-one config.
    DefaultConfig,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { config }) => check::check_config(&config),
        Some(Command::DefaultConfig) => {
            print!("{}", run::DEFAULT_CONFIG);
            std::process::ExitCode::SUCCESS
        }
        Some(Command::Bench(args)) => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cairn bench: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match rt.block_on(bench::run(args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cairn bench: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Some(Command::Run { config }) => run::main(Some(&config)),
        None => run::main(None),
    }
}
