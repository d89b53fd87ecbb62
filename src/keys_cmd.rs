//! `vitalmq keys`: the key-encryption keys and the keyring of encryption at rest
//! (issue 20). Every subcommand is an operator-audited action (log beside the key
//! file, or `VITALMQ_OPERATOR_AUDIT`).
//!
//! - `init --key-file F`: a new `vitalmq-kek/v1` key file (KEK version 1), owner-only;
//!   refuses to overwrite one.
//! - `rotate --key-file F --keyring K --subject S`: a new data-key version for one
//!   subject; new data is sealed under it, old data still opens.
//! - `rotate-kek --key-file F --keyring K`: a new KEK version in the key file, then
//!   every data key re-wrapped under it (ciphertext untouched).
//! - `status --key-file F --keyring K`: key counts and tombstones (stdout only).
//! - `seal-file --key-file F --input KEY.pem --output KEY.pem.sealed`: a service private
//!   key sealed under the KEK (`vitalmq_keyring::secret_file`); the services read either
//!   form from the same configured path.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};

use crate::operator_audit::{self, Action};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new key file (KEK version 1).
    Init {
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Start a new data-key version for one subject (`pt-...` or `sys:...`).
    Rotate {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
        #[arg(long)]
        subject: String,
    },
    /// Add a KEK version and re-wrap every data key under it.
    RotateKek {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
    },
    /// Seal a service private key (PEM) under the KEK: point the configuration at the
    /// output and remove the plaintext input.
    SealFile {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// Data-key counts and erasure tombstones, as JSON on stdout.
    Status {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
    },
}

fn log_for(key_file: &Path) -> PathBuf {
    let dir = key_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    operator_audit::log_path(dir.join("operator-audit.jsonl"))
}

fn open(key_file: &Path, keyring: &Path) -> anyhow::Result<Keyring> {
    let provider = LocalKeyFile::load(key_file)?;
    Ok(Keyring::open(keyring, Arc::new(provider))?)
}

impl KeysCommand {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Self::Init { key_file } => {
                Action::new("keys.init", log_for(&key_file))
                    .detail("key_file", operator_audit::absolute(&key_file))
                    .run(|| {
                        LocalKeyFile::create(&key_file)?;
                        Ok(((), Map::new()))
                    })?;
                println!("{}", json!({"key_file": key_file, "kek_version": 1}));
            }
            Self::Rotate {
                key_file,
                keyring,
                subject,
            } => {
                let version = Action::new("keys.rotate", log_for(&key_file))
                    .resource(Some(subject.clone()))
                    .detail("keyring", operator_audit::absolute(&keyring))
                    .run(|| {
                        let subject = Subject::new(&subject)?;
                        let version = open(&key_file, &keyring)?.rotate(&subject)?;
                        let mut d = Map::new();
                        d.insert("version".into(), version.into());
                        Ok((version, d))
                    })?;
                println!("{}", json!({"subject": subject, "version": version}));
            }
            Self::RotateKek { key_file, keyring } => {
                let (kek, moved) = Action::new("keys.rotate_kek", log_for(&key_file))
                    .detail("key_file", operator_audit::absolute(&key_file))
                    .detail("keyring", operator_audit::absolute(&keyring))
                    .run(|| {
                        let kek = LocalKeyFile::rotate(&key_file)?;
                        let moved = open(&key_file, &keyring)?.rewrap_all()?;
                        let mut d = Map::new();
                        d.insert("kek_version".into(), kek.into());
                        d.insert("rewrapped".into(), moved.into());
                        Ok(((kek, moved), d))
                    })?;
                println!("{}", json!({"kek_version": kek, "rewrapped": moved}));
            }
            Self::SealFile {
                key_file,
                input,
                output,
            } => {
                Action::new("keys.seal_file", log_for(&key_file))
                    .detail("key_file", operator_audit::absolute(&key_file))
                    .detail("input", operator_audit::absolute(&input))
                    .detail("output", operator_audit::absolute(&output))
                    .run(|| {
                        let kek = LocalKeyFile::load(&key_file)?;
                        vitalmq_keyring::seal_file(&kek, &input, &output)?;
                        Ok(((), Map::new()))
                    })?;
                println!("{}", json!({"sealed": output, "from": input}));
            }
            Self::Status { key_file, keyring } => {
                let status = Action::new("keys.status", log_for(&key_file))
                    .detail("keyring", operator_audit::absolute(&keyring))
                    .run(|| {
                        let k = open(&key_file, &keyring)?;
                        let (keys, old_kek) = k.key_counts()?;
                        let tombstones = k.tombstones()?;
                        let mut d = Map::new();
                        d.insert("data_keys".into(), keys.into());
                        d.insert("tombstones".into(), tombstones.len().into());
                        let status = json!({
                            "kek_version": vitalmq_keyring::KeyProvider::current_version(k.provider()),
                            "data_keys": keys,
                            "data_keys_under_older_kek": old_kek,
                            "tombstones": tombstones,
                        });
                        Ok((status, d))
                    })?;
                let status: Value = status;
                println!("{status}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
