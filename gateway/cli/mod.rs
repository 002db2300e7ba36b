//! The `turnpike` command line: what each subcommand takes, and which module runs it.

pub mod admin_client;
pub mod check;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use self::admin_client::{AdminCall, AdminTarget, ClientError};
use crate::server::StartError;
use crate::{config, demo, logging, server};

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "Authenticating, rate-limiting, metering gateway for agent backends"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Demo {
        /// The API's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
        /// The demo worker's address.
        #[arg(long, default_value = "127.0.0.1:8701")]
        worker: String,
    },
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
pub struct AdminArgs {
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Print the admin API's JSON answer.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum KeysAction {
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
pub enum BalanceAction {
    Get { account: String },
    Add { account: String, amount: i64 },
    Set { account: String, amount: i64 },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for logging::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => logging::Format::Text,
            LogFormat::Json => logging::Format::Json,
        }
    }
}

/// Why a command failed; printed as the command's last words.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Check(#[from] check::CheckError),
    #[error("{0}")]
    Admin(#[from] ClientError),
    #[error("preparing the demo: {0}")]
    Demo(std::io::Error),
    #[error("reading the key: {0}")]
    Stdin(std::io::Error),
    #[error("no key given")]
    NoKey,
}

/// Runs one command to its end (for `serve` and `demo`: until a signal stops the gateway).
pub fn run(command: Command) -> Result<(), CommandError> {
    match command {
        Command::Serve { config } => {
            let runtime = config::load(&config).map_err(StartError::from)?;
            Ok(server::run(runtime, Vec::new())?)
        }
        Command::Check {
            config,
            policies,
            against,
        } => Ok(check::check(
            &config,
            policies.as_deref(),
            against.as_deref(),
        )?),
        Command::Demo {
            listen,
            admin,
            worker,
        } => run_demo(demo::DemoAddrs {
            listen,
            admin,
            worker,
        }),
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
    }
}

fn admin_call(admin: &AdminArgs, call: &AdminCall) -> Result<(), CommandError> {
    let target = AdminTarget::from_env(&admin.admin)?;
    println!("{}", admin_client::run(&target, call, admin.json)?);
    Ok(())
}

fn hash_key(key: Option<String>) -> Result<(), CommandError> {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(CommandError::Stdin)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if key.is_empty() {
        return Err(CommandError::NoKey);
    }
    println!("{}", turnpike_core::keys::KeyHash::of(&key).to_hex());
    Ok(())
}

fn run_demo(addrs: demo::DemoAddrs) -> Result<(), CommandError> {
    let setup = demo::prepare(addrs).map_err(CommandError::Demo)?;
    let runtime = config::load(&setup.config_path).map_err(StartError::from)?;
    let welcome = demo::instructions(&setup);
    let addrs = &setup.addrs;
    let listening = vec![
        addrs.listen.clone(),
        addrs.admin.clone(),
        addrs.worker.clone(),
    ];
    Ok(server::run(
        runtime,
        vec![
            Box::new(demo::worker_service(&addrs.worker)),
            demo::announce_when_listening(welcome, listening),
        ],
    )?)
}
