//! `ember keys create|list|revoke`: the API keys a server checks. The keys
//! file is the one `ember serve` reads (`[auth] keys_file` of the config,
//! else `EMBER_KEYS`, else `/var/lib/ember/keys.json`); a running server sees
//! a change within a second or two.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ember_service::keys;
use ember_service::quotas::Quotas;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it, once: only its hash is kept.
    Create(CreateArgs),
    /// Every key: name, admin, quotas, created, last used (never a secret).
    List(ListArgs),
    /// Remove a key; requests carrying it are refused from then on.
    Revoke(RevokeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// The configuration file `ember serve` reads (its `[auth] keys_file`).
    #[arg(long, env = "EMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The keys file itself (overrides the config's).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
}

impl FileArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.keys_file {
            return Ok(p.clone());
        }
        if let Some(c) = &self.config {
            let raw = crate::config::RawConfig::load(c)
                .map_err(|p| anyhow::anyhow!("{}: {}", c.display(), p.join("; ")))?;
            if let Some(p) = raw.auth.keys_file {
                return Ok(p);
            }
        }
        Ok(crate::config::default_keys_file())
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The key's name, which is its tenant: lowercase letters, digits, '-', '_'.
    pub name: String,
    /// An admin key sees and does everything (the pool, metrics, every
    /// tenant's sessions).
    #[arg(long)]
    pub admin: bool,
    #[command(flatten)]
    pub file: FileArgs,
    /// Calls running at once.
    #[arg(long)]
    pub concurrent_calls: Option<u32>,
    /// Sessions, running or paused.
    #[arg(long)]
    pub sessions: Option<u32>,
    /// Paused sessions.
    #[arg(long)]
    pub paused_sessions: Option<u32>,
    /// Guest memory (MiB) its running sessions may hold.
    #[arg(long)]
    pub session_memory_mb: Option<u64>,
    /// Calls started per second, on average.
    #[arg(long)]
    pub calls_per_second: Option<f64>,
    /// Calls that may start at once before the rate applies.
    #[arg(long)]
    pub burst: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// One JSON object per key instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    pub name: String,
    #[command(flatten)]
    pub file: FileArgs,
}

pub fn run(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let refuse = |e: keys::KeyError| {
        eprintln!("ember keys: {e}");
        Ok(ExitCode::from(64))
    };
    match cmd {
        KeysCommand::Create(a) => {
            let quotas = Quotas {
                concurrent_calls: a.concurrent_calls,
                sessions: a.sessions,
                paused_sessions: a.paused_sessions,
                session_memory_mb: a.session_memory_mb,
                calls_per_second: a.calls_per_second,
                burst: a.burst,
            };
            let path = a.file.path()?;
            match keys::create(&path, &a.name, a.admin, quotas) {
                Ok(secret) => {
                    println!("{secret}");
                    eprintln!(
                        "ember keys: created {}key {:?} in {}; the key above is shown only now",
                        if a.admin { "admin " } else { "" },
                        a.name,
                        path.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refuse(e),
            }
        }
        KeysCommand::List(a) => {
            let path = a.file.path()?;
            let file = match keys::read(&path) {
                Ok(f) => f,
                Err(e) => return refuse(e),
            };
            let used = keys::last_used(&path);
            for k in &file.keys {
                let last = used.get(&k.name).map_or("never", String::as_str);
                if a.json {
                    let line = serde_json::json!({
                        "name": k.name, "admin": k.admin, "quotas": k.quotas,
                        "created": k.created, "last_used": used.get(&k.name),
                    });
                    println!("{line}");
                } else {
                    let quotas = serde_json::to_string(&k.quotas).unwrap_or_default();
                    let role = if k.admin { "admin" } else { "tenant" };
                    println!(
                        "{:<24} {role:<7} created {}  last used {last:<20}  quotas {quotas}",
                        k.name, k.created
                    );
                }
            }
            if file.keys.is_empty() && !a.json {
                eprintln!("ember keys: no keys in {}: the server needs none (loopback only)", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Revoke(a) => {
            let path = a.file.path()?;
            match keys::revoke(&path, &a.name) {
                Ok(()) => {
                    eprintln!("ember keys: revoked {:?}", a.name);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refuse(e),
            }
        }
    }
}
