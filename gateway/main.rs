//! The `turnpike` command: serve, check, demo.

use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use turnpike::cli::{self, AdminCall, AdminTarget};
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
    /// Validate a config file and its policies; exits 1 listing every error. With
    /// --policies, validates that directory instead and prints what it would change.
    Check {
        #[arg(long, default_value = "config/turnpike.yaml")]
        config: PathBuf,
        /// A proposed policy directory, checked in place of the config's own.
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Compare with the set in force on this running gateway's admin API (token from
        /// TURNPIKE_ADMIN_TOKEN) instead of the config's own policy directory.
        #[arg(long, value_name = "ADMIN_URL")]
        against: Option<String>,
    },
    /// Run the gateway on the embedded store with a built-in demo worker.
    Demo,
    /// Issue, show and revoke API keys (admin API).
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Read and change account balances (admin API).
    Balance {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: BalanceAction,
    },
    /// Usage totals over everything metered, optionally narrowed (admin API).
    Usage {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Print the SHA-256 of a key (or admin token) for the config file; reads stdin without KEY.
    HashKey { key: Option<String> },
}

/// Where the admin API is; the token comes from `TURNPIKE_ADMIN_TOKEN`.
#[derive(clap::Args)]
struct AdminArgs {
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Print the admin API's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Issue a key; prints the secret once.
    Create {
        #[arg(long)]
        account: String,
        /// Agent ids the key may call, or "*" (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        agents: Vec<String>,
        #[arg(long)]
        policy: String,
        /// RFC 3339 time after which the key is refused.
        #[arg(long)]
        expires_at: Option<String>,
        /// Public id; generated when left out.
        #[arg(long)]
        id: Option<String>,
    },
    Show {
        id: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum BalanceAction {
    Get { account: String },
    Add { account: String, amount: i64 },
    Set { account: String, amount: i64 },
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
        Command::Check {
            config,
            policies,
            against,
        } => check(&config, policies.as_deref(), against.as_deref()),
        Command::Serve { config } => config::load(&config)
            .map_err(|errors| errors.to_string())
            .and_then(|runtime| server::run(runtime, Vec::new())),
        Command::Demo => run_demo(),
        Command::HashKey { key } => hash_key(key),
        Command::Keys { admin, action } => {
            let call = match action {
                KeysAction::Create {
                    account,
                    agents,
                    policy,
                    expires_at,
                    id,
                } => AdminCall::CreateKey {
                    account,
                    agents,
                    policy,
                    expires_at,
                    id,
                },
                KeysAction::Show { id } => AdminCall::ShowKey(id),
                KeysAction::Revoke { id } => AdminCall::RevokeKey(id),
            };
            admin_call(&admin, &call)
        }
        Command::Balance { admin, action } => {
            let call = match action {
                BalanceAction::Get { account } => AdminCall::GetBalance(account),
                BalanceAction::Add { account, amount } => AdminCall::AddBalance(account, amount),
                BalanceAction::Set { account, amount } => AdminCall::SetBalance(account, amount),
            };
            admin_call(&admin, &call)
        }
        Command::Usage {
            admin,
            account,
            key,
            agent,
        } => admin_call(
            &admin,
            &AdminCall::Usage {
                account,
                key,
                agent,
            },
        ),
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

fn admin_call(admin: &AdminArgs, call: &AdminCall) -> Result<(), String> {
    let token = std::env::var("TURNPIKE_ADMIN_TOKEN")
        .map_err(|_| "set TURNPIKE_ADMIN_TOKEN to the admin token".to_string())?;
    let target = AdminTarget {
        url: admin.admin.clone(),
        token,
    };
    println!("{}", cli::run(&target, call, admin.json)?);
    Ok(())
}

fn hash_key(key: Option<String>) -> Result<(), String> {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if key.is_empty() {
        return Err("no key given".into());
    }
    println!("{}", turnpike::auth::KeyHash::of(&key).to_hex());
    Ok(())
}

fn check(
    path: &std::path::Path,
    proposed: Option<&std::path::Path>,
    against: Option<&str>,
) -> Result<(), String> {
    let listed = |errors: config::ConfigErrors| format!("{errors}\n{} error(s)", errors.0.len());
    let runtime = match proposed {
        Some(dir) => config::load_with_policies(path, dir),
        None => config::load(path),
    }
    .map_err(listed)?;
    println!(
        "{}: ok ({} agents, {} upstreams, {} policies, {} keys)",
        path.display(),
        runtime.agents.len(),
        runtime.pools.len(),
        runtime.policies.len(),
        runtime.keys.len()
    );
    if proposed.is_none() && against.is_none() {
        return Ok(());
    }
    use turnpike::policy_diff::{diff, set_json};
    let new = set_json(runtime.policies.iter().map(|(n, p)| (n, p.as_ref())));
    let (old, baseline) = match against {
        Some(url) => {
            let target = AdminTarget {
                url: url.to_owned(),
                token: std::env::var("TURNPIKE_ADMIN_TOKEN").unwrap_or_default(),
            };
            let running = cli::running_policies(&target)?;
            (running, format!("the set in force at {url}"))
        }
        None => {
            let current = config::load(path).map_err(listed)?;
            let old = set_json(current.policies.iter().map(|(n, p)| (n, p.as_ref())));
            (old, current.policies_dir.display().to_string())
        }
    };
    let changes = diff(&old, &new);
    println!("{} change(s) against {baseline}", changes.len());
    for change in changes {
        println!("{change}");
    }
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
