//! `concord state …`: offline operations on the state file, run while the daemon is
//! stopped (the daemon holds redb's file lock; these commands say so and stop).
//!
//! - `rotate-key`: a new data key, every sealed value re-sealed with it, optionally a
//!   new key-encryption key (the configuration must name it before the next start).
//! - `forget`: erase one subject everywhere in the state, with an audit entry.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{self, Config, SecretRef};
use crate::model::GlobalId;
use crate::state::{Kek, RotateOptions, StateStore};

/// Values re-sealed per transaction: large enough that commits do not dominate, small
/// enough that one transaction's dirty pages stay well inside memory.
const DEFAULT_ROTATE_CHUNK: usize = 10_000;

#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Start a new data key and re-seal every encrypted value with it; optionally wrap
    /// the data keys under a new key-encryption key. Resumes an interrupted rotation.
    RotateKey {
        #[arg(long, short)]
        config: PathBuf,
        /// systemd credential holding the new key-encryption key (64 hex characters).
        #[arg(long, conflicts_with = "new_key_file")]
        new_key_credential: Option<String>,
        /// File holding the new key-encryption key (64 hex characters).
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        /// Values re-sealed per transaction.
        #[arg(long, default_value_t = DEFAULT_ROTATE_CHUNK)]
        chunk: usize,
        /// Stop after re-sealing this many values; the next run resumes.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Erase one record (a data subject) from every table of the state store.
    Forget {
        #[arg(long, short)]
        config: PathBuf,
        /// Entity name, e.g. contact.
        #[arg(long)]
        entity: String,
        /// Global id, or `system:local_id`.
        #[arg(long)]
        id: String,
        /// Skip compacting the file afterwards (compaction rewrites it without the free
        /// pages that may still hold the erased values).
        #[arg(long)]
        no_compact: bool,
    },
}

/// Runs one `concord state` command, printing its outcome on stdout.
pub fn run(command: StateCommand) -> anyhow::Result<()> {
    match command {
        StateCommand::RotateKey {
            config,
            new_key_credential,
            new_key_file,
            chunk,
            limit,
        } => {
            let cfg = load(&config)?;
            let kek = state_key(&cfg)?.context("[state] encryption is not configured; there is no key to rotate")?;
            let new_ref = match (new_key_credential, new_key_file) {
                (Some(name), _) => Some(SecretRef::Credential(name)),
                (None, Some(path)) => Some(SecretRef::File(path)),
                (None, None) => None,
            };
            let new_kek = match new_ref {
                Some(r) => Some(kek_from(&r, Path::new("."))?),
                None => None,
            };
            let rekeyed = new_kek.is_some();
            let mut store = open_store(&cfg)?;
            let report = store
                .rotate_key(&kek, RotateOptions { new_kek, chunk, limit })
                .context("rotating the state key")?;
            println!(
                "data key {}: {} value(s) re-sealed; retired key(s): {:?}; {}",
                report.key_id,
                report.resealed,
                report.retired,
                if report.complete {
                    "rotation complete"
                } else {
                    "rotation incomplete, run again to finish"
                }
            );
            if rekeyed {
                println!(
                    "data keys are now wrapped by the new key: point [state] encryption at it before starting concord"
                );
            }
            Ok(())
        }
        StateCommand::Forget {
            config,
            entity,
            id,
            no_compact,
        } => {
            let cfg = load(&config)?;
            if !cfg.entities.contains_key(&entity) {
                anyhow::bail!("unknown entity {entity}");
            }
            let store = open_store(&cfg)?;
            let global_id = resolve_id(&store, &entity, &id)?;
            let report = store.forget(&entity, global_id, "cli").context("erasing the record")?;
            println!(
                "forgot {entity}/{global_id}: {} record, {} identity, {} match-key, {} outbox, {} dead-letter, {} decision, {} write-log row(s)",
                report.records,
                report.identities,
                report.match_keys,
                report.outbox,
                report.dead_letters,
                report.decisions,
                report.write_log
            );
            if !no_compact {
                store.compact().context("compacting the state file")?;
            }
            Ok(())
        }
    }
}

/// The key-encryption key named by `[state] encryption`, resolved now; `None` when
/// encryption is not configured. `concord run` passes it to [`StateStore::open_with`].
pub fn state_key(cfg: &Config) -> anyhow::Result<Option<Kek>> {
    match &cfg.state.encryption {
        Some(enc) => Ok(Some(kek_from(&enc.key, &cfg.base_dir)?)),
        None => Ok(None),
    }
}

/// Opens the configured state store, encrypted or not.
pub fn open_store(cfg: &Config) -> anyhow::Result<StateStore> {
    let kek = state_key(cfg)?;
    StateStore::open_with(&cfg.base_dir.join(&cfg.state.dir), cfg.state.cache_mb, kek.as_ref())
        .context("opening the state store")
}

fn kek_from(secret: &SecretRef, base_dir: &Path) -> anyhow::Result<Kek> {
    let value = secret
        .resolve(base_dir)
        .with_context(|| format!("reading the state key ({})", secret.describe()))?;
    Kek::from_secret(&value).with_context(|| format!("state key from {}", secret.describe()))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    let cfg = config::load(path).with_context(|| format!("loading {}", path.display()))?;
    let problems = config::validate(&cfg);
    if let Some(first) = problems.first() {
        anyhow::bail!(
            "{} problem(s) in {}, the first: {first}",
            problems.len(),
            path.display()
        );
    }
    Ok(cfg)
}

/// A global id, or `system:local_id` looked up in the identity map.
fn resolve_id(store: &StateStore, entity: &str, id: &str) -> anyhow::Result<GlobalId> {
    if let Some((system, local)) = id.split_once(':') {
        return store
            .read()?
            .identity(entity, system, local)?
            .with_context(|| format!("no {entity} with local id {local} in system {system}"));
    }
    let uuid = uuid::Uuid::parse_str(id).context("--id is neither a global id nor system:local_id")?;
    Ok(GlobalId(uuid))
}
