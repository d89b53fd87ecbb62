//! The re-identification store: the only place where pseudonyms meet enrolment ids.
//!
//! A directory of its own (`0700`), never opened by the broker or the bridge (their
//! configurations have no path for it, and the code that reads it lives only here, in
//! the `vitalmq reid` command):
//!
//! - `reid.key`: the 32 random bytes of the pseudonym key (`0600`), written once;
//! - `reid.jsonl`: one `{"pseudonym", "enrolment_id"}` object per enrolment (`0600`),
//!   append-only, each pseudonym at most once;
//! - `authorised.toml`: `identities = ["spiffe://..."]`, who may re-identify;
//! - `audit/operator.jsonl`: the operator audit of every enrolment and lookup (unless
//!   `VITALMQ_OPERATOR_AUDIT` names another log).
//!
//! Opening the store refuses files or the directory readable by anyone but the owner.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use vitalmq_policies::{Pseudonymiser, SpiffeId};
use vitalmq_private_fs::ExposurePolicy;

const KEY_FILE: &str = "reid.key";
const MAP_FILE: &str = "reid.jsonl";
const AUTHORISED_FILE: &str = "authorised.toml";

/// Written beside a new key, so the operator knows where to authorise identities.
const AUTHORISED_TEMPLATE: &str = "\
# Identities allowed to re-identify a pseudonym with `vitalmq reid lookup`.
# identities = [\"spiffe://<trust-domain>/operator/<id>\"]
identities = []
";

/// One line of `reid.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
struct Enrolment {
    pseudonym: String,
    enrolment_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Authorised {
    identities: Vec<String>,
}

/// An opened store (its key loaded).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    pseudonymiser: Pseudonymiser,
}

impl Store {
    /// Whether `dir` holds a store (its key exists).
    pub fn exists(dir: &Path) -> bool {
        dir.join(KEY_FILE).exists()
    }

    /// The default operator audit log of actions on the store in `dir`.
    pub fn operator_audit(dir: &Path) -> PathBuf {
        dir.join("audit").join("operator.jsonl")
    }

    /// Creates a store in `dir` (which must be absent or empty), or opens the one there.
    pub fn create_or_open(dir: &Path) -> anyhow::Result<Self> {
        if !Self::exists(dir) {
            // Another `enrol` creating this store at the same moment leaves only its
            // temporary key here until it links the key in; after that, the key is
            // there before anything else is, so look for it again before refusing.
            let foreign = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries
                    .any(|e| e.map_or(true, |e| !is_key_tmp(&e.file_name().to_string_lossy()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            };
            anyhow::ensure!(
                !foreign || Self::exists(dir),
                "{}: not empty and not a re-identification store (no {KEY_FILE}); refusing to make one here",
                dir.display()
            );
            if !foreign {
                vitalmq_private_fs::create_dir_all(dir)?;
                write_new_key(dir)?;
                write_if_absent(&dir.join(AUTHORISED_FILE), AUTHORISED_TEMPLATE.as_bytes())?;
                tracing::info!(store = %dir.display(), "re-identification store created");
            }
        }
        Self::open(dir)
    }

    /// Opens the store in `dir`; refuses one readable by other local users.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Self::exists(dir),
            "{}: no re-identification store here (no {KEY_FILE}; made by `vitalmq reid enrol`)",
            dir.display()
        );
        let files = [
            dir.to_path_buf(),
            dir.join(KEY_FILE),
            dir.join(MAP_FILE),
            dir.join(AUTHORISED_FILE),
        ];
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        vitalmq_private_fs::check(&refs, ExposurePolicy::Refuse)?;
        let key_path = dir.join(KEY_FILE);
        let bytes =
            std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "{}: a pseudonym key is 32 bytes, this file has {}",
                key_path.display(),
                bytes.len()
            )
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            pseudonymiser: Pseudonymiser::new(key),
        })
    }

    /// The care pseudonym of `enrolment_id`.
    pub fn care_pseudonym(&self, enrolment_id: &str) -> anyhow::Result<String> {
        Ok(self.pseudonymiser.pseudonym(enrolment_id, None)?)
    }

    /// Records `enrolment_id` under its care pseudonym (once) and returns the pseudonym
    /// and whether it was new.
    pub fn enrol(&self, enrolment_id: &str) -> anyhow::Result<(String, bool)> {
        let pseudonym = self.care_pseudonym(enrolment_id)?;
        let path = self.dir.join(MAP_FILE);
        let file = vitalmq_private_fs::create_options()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Exclusive while reading and appending, so two enrolments cannot both add it.
        let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {}", path.display()))?;
        if find(&path, &file, &pseudonym)?.is_some() {
            return Ok((pseudonym, false));
        }
        let mut line = serde_json::to_vec(&Enrolment {
            pseudonym: pseudonym.clone(),
            enrolment_id: enrolment_id.to_owned(),
        })?;
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("appending to {}", path.display()))?;
        Ok((pseudonym, true))
    }

    /// The enrolment id recorded under `pseudonym`, if any.
    pub fn lookup(&self, pseudonym: &str) -> anyhow::Result<Option<String>> {
        let path = self.dir.join(MAP_FILE);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        find(&path, &file, pseudonym)
    }

    /// Whether `identity` is listed in `authorised.toml` (a missing file lists nobody).
    pub fn is_authorised(&self, identity: &SpiffeId) -> anyhow::Result<bool> {
        let path = self.dir.join(AUTHORISED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let listed: Authorised =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut found = false;
        for (i, entry) in listed.identities.iter().enumerate() {
            let id = SpiffeId::parse(entry)
                .with_context(|| format!("{}: identities[{i}]", path.display()))?;
            found |= &id == identity;
        }
        Ok(found)
    }
}

/// The enrolment id under `pseudonym` in the open map file `file`.
fn find(path: &Path, file: &std::fs::File, pseudonym: &str) -> anyhow::Result<Option<String>> {
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Enrolment = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not an enrolment record", path.display(), n + 1))?;
        if entry.pseudonym == pseudonym {
            return Ok(Some(entry.enrolment_id));
        }
    }
    Ok(None)
}

/// Suffix of the temporary file a new key is written to before it is linked in.
const KEY_TMP_SUFFIX: &str = ".tmp";

/// Whether `name` is a key still being written by some `enrol`.
fn is_key_tmp(name: &str) -> bool {
    name.starts_with(KEY_FILE) && name.ends_with(KEY_TMP_SUFFIX)
}

/// Writes 32 fresh random bytes as the store's key, atomically: a concurrent creator
/// either wins (and its key is complete) or loses and this one is used.
fn write_new_key(dir: &Path) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    let tmp = dir.join(format!("{KEY_FILE}.{}{KEY_TMP_SUFFIX}", std::process::id()));
    let result = (|| {
        let mut file = vitalmq_private_fs::create_options()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&key)?;
        file.sync_all()?;
        match std::fs::hard_link(&tmp, dir.join(KEY_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.with_context(|| format!("writing {}", dir.join(KEY_FILE).display()))
}

/// Creates `path` (`0600`) holding `bytes`, unless it exists.
fn write_if_absent(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    match vitalmq_private_fs::create_options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(mut file) => file
            .write_all(bytes)
            .with_context(|| format!("writing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}
