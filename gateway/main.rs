//! The `turnpike` command: parses the command line and hands it to [`turnpike::cli`].

use clap::Parser;
use std::process::ExitCode;

use turnpike::cli::{self, Cli};
use turnpike::logging;

/// Each call allocates many small buffers (headers, JSON, log fields) freed by its end;
/// mimalloc serves those from per-thread pages, without glibc malloc's locks and merging.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = logging::init(cli.log_format.into());
    let outcome = cli::run(cli.command);
    log.flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
