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

// mimalloc's own API (the `mimalloc` crate's bindings declare it only with a feature that
// brings one more crate).
extern "C" {
    fn mi_collect(force: bool);
}

/// Returns every page mimalloc holds free to the kernel (after an index load: see
/// `cairn_core::memory`).
fn release_freed_pages() {
    // SAFETY: mi_collect takes a flag and only walks mimalloc's own structures; it is safe to
    // call from any thread at any time.
    unsafe { mi_collect(true) }
}

/// Turns transparent huge pages off for this process, before any thread starts.
///
/// Blob buffers are allocated and freed at hundreds of MB/s. With THP the kernel zeroes a whole
/// 2 MiB page on each first touch and mimalloc's purges return those pages, so a 1 GiB
/// ByteStream write zeroed about 2.7 GiB (1,356 huge-page faults) and spent 60% of the server's
/// CPU in the kernel; with 4 KiB pages it zeroes the 1 GiB it stores, and the write ran 1.6x
/// faster (BENCHMARKS.md).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes only integer arguments and reads or writes no memory of
    // this process; failure (an old kernel) leaves THP as it was, which is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

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
    Bench(Box<bench::BenchArgs>),
    /// Print the built-in all-in-one config.
    DefaultConfig,
}

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    cairn_core::memory::set_release_freed(release_freed_pages);
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
            match rt.block_on(bench::run(*args)) {
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
