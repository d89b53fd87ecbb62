//! `vitalmq objects open`: the plaintext of one sealed telemetry object (issue 20) for
//! an operator, from a local sink's directory or from S3, printed to stdout.
//!
//! The object is opened with the keyring (`keyring.sqlite3`, made by the bridge) and
//! the key-encryption key file that wraps its data keys; the sealing context is the
//! object's name from its `raw/` or `normalized/` level on
//! (`vitalmq_bridge::sink::object::sealed`), so the name given must be the object's
//! own. An object of an erased patient does not open: the command fails saying so.
//!
//! Reading an object is a read of patient-linked data: every run is an operator action
//! (`operator_audit`), logged by default in `operator-audit/operator.jsonl` beside the
//! keyring (the bridge data directory), or in `$VITALMQ_OPERATOR_AUDIT`. The record
//! names the object and the outcome, never the patient the object belongs to.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Map;
use vitalmq_bridge::sink::object::sealed::{self, OpenError};
use vitalmq_bridge::sink::object::{ObjectStoreSink, S3Settings};
use vitalmq_keyring::{KeyError, Keyring, LocalKeyFile};

use crate::operator_audit;

#[derive(Debug, Subcommand)]
pub enum ObjectsCommand {
    /// Print the plaintext of one sealed object (`.vmqs`) to stdout (audited).
    Open(OpenArgs),
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// The key-encryption key file wrapping the keyring's data keys.
    #[arg(long)]
    key_file: PathBuf,
    /// The keyring (`keyring.sqlite3` in the bridge data directory).
    #[arg(long)]
    keyring: PathBuf,
    /// A sealed object in a local objects sink's directory.
    #[arg(required_unless_present = "s3", conflicts_with = "s3")]
    file: Option<PathBuf>,
    /// A sealed object in S3, `s3://BUCKET/KEY`; credentials from `AWS_ACCESS_KEY_ID`
    /// and `AWS_SECRET_ACCESS_KEY`.
    #[arg(long)]
    s3: Option<String>,
    /// S3-compatible endpoint (MinIO, ...), e.g. `http://127.0.0.1:9000`.
    #[arg(long, requires = "s3")]
    endpoint: Option<String>,
    #[arg(long, requires = "s3", default_value = "us-east-1")]
    region: String,
    /// Allow a plain `http://` endpoint.
    #[arg(long, requires = "s3")]
    allow_http: bool,
}

impl ObjectsCommand {
    pub fn run(self) -> anyhow::Result<std::process::ExitCode> {
        match self {
            Self::Open(args) => open(&args),
        }
    }
}

/// Where the object is: its name (for the sealing context and the record) and how to
/// read it.
enum Source {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

impl Source {
    fn of(args: &OpenArgs) -> anyhow::Result<Self> {
        match (&args.file, &args.s3) {
            (Some(file), None) => Ok(Self::File(file.clone())),
            (None, Some(url)) => {
                let (bucket, key) = url
                    .strip_prefix("s3://")
                    .and_then(|rest| rest.split_once('/'))
                    .filter(|(b, k)| !b.is_empty() && !k.is_empty())
                    .with_context(|| format!("{url:?}: expected s3://BUCKET/KEY"))?;
                Ok(Self::S3 {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                })
            }
            _ => anyhow::bail!("name one object: a FILE or --s3 s3://BUCKET/KEY"),
        }
    }

    fn name(&self) -> String {
        match self {
            Self::File(path) => operator_audit::absolute(path),
            Self::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The name the object was sealed under (its context is taken from it).
    fn object_name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::S3 { key, .. } => key.clone(),
        }
    }

    fn read(&self, args: &OpenArgs) -> anyhow::Result<Vec<u8>> {
        match self {
            Self::File(path) => {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            }
            Self::S3 { bucket, key } => {
                let env = |var: &str| {
                    std::env::var(var).with_context(|| format!("{var} is not set (S3 credentials)"))
                };
                let sink = ObjectStoreSink::s3(
                    "objects-open",
                    S3Settings {
                        bucket: bucket.clone(),
                        endpoint: args.endpoint.clone(),
                        region: args.region.clone(),
                        access_key_id: env("AWS_ACCESS_KEY_ID")?,
                        secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
                        allow_http: args.allow_http,
                        prefix: String::new(),
                    },
                )?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                Ok(runtime.block_on(sink.read_object(key))?.to_vec())
            }
        }
    }
}

fn open(args: &OpenArgs) -> anyhow::Result<std::process::ExitCode> {
    let source = Source::of(args)?;
    let data_dir = args
        .keyring
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Nothing to open without a keyring: do not make an empty one (or an audit log)
    // in a mistyped place.
    anyhow::ensure!(
        args.keyring.is_file(),
        "{}: no keyring here (the bridge makes keyring.sqlite3 in its data directory)",
        args.keyring.display()
    );
    let plain = operator_audit::Action::new(
        "objects.open",
        operator_audit::log_path(operator_audit::data_dir_log(data_dir)),
    )
    .resource(Some(source.name()))
    .detail("keyring", operator_audit::absolute(&args.keyring))
    .run(|| {
        let provider = LocalKeyFile::load(&args.key_file)?;
        let keyring = Keyring::open(&args.keyring, std::sync::Arc::new(provider))?;
        let bytes = source.read(args)?;
        let key_version = sealed::header(&bytes).map_err(explain)?.key_version;
        let plain = sealed::open(&keyring, &source.object_name(), &bytes).map_err(|e| match e {
            OpenError::Key(k) => explain(k),
            other => anyhow::Error::new(other),
        })?;
        let mut done = Map::new();
        done.insert("bytes".into(), plain.len().into());
        done.insert("key_version".into(), key_version.into());
        Ok((plain, done))
    })?;
    let mut out = std::io::stdout().lock();
    out.write_all(&plain).context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A key error as the operator (and the audit record) sees it: without the subject,
/// which is the patient's pseudonym.
fn explain(e: KeyError) -> anyhow::Error {
    match e {
        KeyError::Erased { erased_at_ms, .. } => anyhow::anyhow!(
            "the object is erased: its patient's data keys were destroyed at {} (crypto-shredded); it cannot be opened",
            vitalmq_policies::format_rfc3339(erased_at_ms)
        ),
        KeyError::UnknownKey { version, .. } => anyhow::anyhow!(
            "this keyring has no data key version {version} for the object's subject: is it the keyring of the bridge that wrote it?"
        ),
        other => anyhow::Error::new(other),
    }
}
