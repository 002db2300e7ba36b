//! The `turnpike` command: serve, check, demo.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use turnpike::logging::BatchedStderr;
use turnpike::{config, demo, server};

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "Authenticating, rate-limiting, metering gateway for agent backends"
)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/turnpike.yaml")]
        config: PathBuf,
    },
    /// Validate a config file and its policies; exits 1 listing every error.
    Check {
        #[arg(long, default_value = "config/turnpike.yaml")]
        config: PathBuf,
    },
    /// Run the gateway on the embedded store with a built-in demo worker.
    Demo,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.log_format);
    let outcome = match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config } => config::load(&config)
            .map_err(|errors| errors.to_string())
            .and_then(|runtime| server::run(runtime, Vec::new())),
        Command::Demo => run_demo(),
    };
    log.flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> Result<(), String> {
    let runtime =
        config::load(path).map_err(|errors| format!("{errors}\n{} error(s)", errors.0.len()))?;
    println!(
        "{}: ok ({} agents, {} upstreams, {} policies, {} keys)",
        path.display(),
        runtime.agents.len(),
        runtime.pools.len(),
        runtime.policies.len(),
        runtime.keys.len()
    );
    Ok(())
}

fn run_demo() -> Result<(), String> {
    let setup = demo::prepare().map_err(|e| format!("preparing the demo: {e}"))?;
    let runtime = config::load(&setup.config_path).map_err(|e| e.to_string())?;
    println!(
        "{}",
        demo::instructions(&setup, &runtime.listen, &runtime.admin.listen)
    );
    server::run(runtime, vec![Box::new(demo::worker_service())])
}

fn init_logging(format: LogFormat) -> &'static BatchedStderr {
    let writer = BatchedStderr::start();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    writer
}
