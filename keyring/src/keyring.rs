//! The keyring: wrapped data keys per subject and erasure tombstones, in their own
//! SQLite file.
//!
//! Tables: `data_keys (subject, version, kek_version, wrapped, created_at_ms)` and
//! `erased (subject, erased_at_ms, erased_by, reason, keys_destroyed)`. An erasure
//! deletes every data key of the subject and writes its tombstone in one transaction,
//! so after a crash either both happened or neither; a subject with a tombstone never
//! gets a key again. `secure_delete` is on and the WAL is truncated after an erasure,
//! so the wrapped key does not linger in free pages or the log.
//!
//! Several processes share one keyring (the bridge seals and reads, `vitalmq erase` and
//! the admin service erase): each caches unwrapped keys and drops its cache whenever
//! another connection committed (`PRAGMA data_version`), so an erasure elsewhere is
//! seen at the next seal or open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};

use crate::provider::{DataKey, KeyProvider, WrappedKey};
use crate::sealed::{self, NONCE_LEN};
use crate::{KeyError, Subject};

const SCHEMA_V1: &str = "
CREATE TABLE data_keys (
    subject         TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    kek_version     INTEGER NOT NULL,
    wrapped         BLOB    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (subject, version)
);
CREATE TABLE erased (
    subject         TEXT    PRIMARY KEY,
    erased_at_ms    INTEGER NOT NULL,
    erased_by       TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    keys_destroyed  INTEGER NOT NULL
);
";

static MIGRATIONS: std::sync::LazyLock<Migrations<'static>> =
    std::sync::LazyLock::new(|| Migrations::new(vec![M::up(SCHEMA_V1)]));

/// The record that a subject was erased.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tombstone {
    pub subject: String,
    pub erased_at_ms: u64,
    pub erased_by: String,
    pub reason: String,
    /// How many data-key versions the erasure destroyed.
    pub keys_destroyed: u64,
}

/// What [`Keyring::erase_checked`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub tombstone: Tombstone,
    /// Whether the WAL was checkpointed and truncated afterwards, so no old page image
    /// with the destroyed wrapped keys is left in it.
    pub wal_checkpointed: bool,
}

/// How long an erasure retries its WAL checkpoint while readers hold the WAL.
pub const CHECKPOINT_WITHIN: Duration = Duration::from_secs(5);

/// `PRAGMA wal_checkpoint(TRUNCATE)` on `conn`, retried with a short pause while it
/// reports busy (a reader or writer of another connection in the way), for at most
/// `within`. True when a pass completed: every WAL frame is in the database file and
/// the WAL is truncated to zero bytes. SQLite reports an incomplete checkpoint in a
/// result row, not as an error, so it must be read. The connection's busy timeout is
/// shortened meanwhile so one pass cannot outlast `within`, then restored to
/// `restore_busy`.
pub fn checkpoint_wal_with(
    conn: &Connection,
    within: Duration,
    restore_busy: Duration,
) -> rusqlite::Result<bool> {
    let deadline = std::time::Instant::now() + within;
    conn.busy_timeout(Duration::from_millis(50).min(within))?;
    let done = (|| loop {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    })();
    conn.busy_timeout(restore_busy)?;
    done
}

fn checkpoint_wal(conn: &Connection, within: Duration) -> rusqlite::Result<bool> {
    checkpoint_wal_with(conn, within, BUSY_TIMEOUT)
}

/// How long a keyring connection waits for another one's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-subject data keys, wrapped by a [`KeyProvider`]; see the module docs.
pub struct Keyring {
    path: PathBuf,
    provider: Arc<dyn KeyProvider>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("provider", &self.provider.describe())
            .finish_non_exhaustive()
    }
}

struct Inner {
    conn: Connection,
    /// `PRAGMA data_version` when the cache was last known valid.
    data_version: i64,
    cache: HashMap<Subject, CachedSubject>,
}

#[derive(Default)]
struct CachedSubject {
    /// The version new seals use, once known.
    current: Option<u32>,
    keys: HashMap<u32, Arc<RandomizedNonceKey>>,
}

fn context(subject: &Subject, version: u32) -> Vec<u8> {
    format!("{subject}|{version}").into_bytes()
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Keyring {
    /// Opens (creating, owner-only, and migrating) the keyring at `path`.
    pub fn open(path: &Path, provider: Arc<dyn KeyProvider>) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        vitalmq_private_fs::create_parent(path).map_err(io)?;
        // Create the file owner-only before SQLite opens it (SQLite would use the umask).
        vitalmq_private_fs::create_options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let sql = |source| KeyError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sql)?;
        MIGRATIONS
            .to_latest(&mut conn)
            .map_err(|e| KeyError::Migration {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        let data_version = data_version(&conn).map_err(sql)?;
        Ok(Self {
            path: path.to_path_buf(),
            provider,
            inner: Mutex::new(Inner {
                conn,
                data_version,
                cache: HashMap::new(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn provider(&self) -> &dyn KeyProvider {
        self.provider.as_ref()
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> KeyError + '_ {
        |source| KeyError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The inner state, its cache dropped if another connection committed since.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, KeyError> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = data_version(&inner.conn).map_err(self.sql())?;
        if now != inner.data_version {
            inner.cache.clear();
            inner.data_version = now;
        }
        Ok(inner)
    }

    /// Seals `plaintext` for `subject` under its current data key (made on first use),
    /// bound to `context` (which the open must repeat). Refused for an erased subject.
    pub fn seal(
        &self,
        subject: &Subject,
        context_bytes: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        let (version, key) = self.current_key(subject)?;
        let mut out = sealed::header_bytes(subject, version);
        let aad = sealed::aad(&out, context_bytes);
        let mut in_out = plaintext.to_vec();
        let nonce = key
            .seal_in_place_append_tag(Aad::from(aad), &mut in_out)
            .map_err(|_| KeyError::Crypto("seal"))?;
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&in_out);
        Ok(out)
    }

    /// Opens a sealed blob made by [`Keyring::seal`] with the same `context`.
    /// [`KeyError::Erased`] when its subject was erased.
    pub fn unseal(&self, blob: &[u8], context_bytes: &[u8]) -> Result<Vec<u8>, KeyError> {
        let parsed = sealed::parse(blob)?;
        let key = self.key_version(&parsed.header.subject, parsed.header.key_version)?;
        let nonce = Nonce::try_assume_unique_for_key(&parsed.nonce[..NONCE_LEN])
            .map_err(|_| KeyError::Malformed("nonce".into()))?;
        let mut in_out = parsed.ciphertext_and_tag.to_vec();
        let plain = key
            .open_in_place(
                nonce,
                Aad::from(sealed::aad(parsed.header_bytes, context_bytes)),
                &mut in_out,
            )
            .map_err(|_| KeyError::Unauthentic {
                what: "sealed payload",
            })?;
        let len = plain.len();
        in_out.truncate(len);
        Ok(in_out)
    }

    fn current_key(&self, subject: &Subject) -> Result<(u32, Arc<RandomizedNonceKey>), KeyError> {
        let mut inner = self.lock()?;
        if let Some(cached) = inner.cache.get(subject)
            && let Some(version) = cached.current
            && let Some(key) = cached.keys.get(&version)
        {
            return Ok((version, Arc::clone(key)));
        }
        let (version, wrapped) = self.current_or_new(&mut inner.conn, subject)?;
        let key = self.unwrap_key(subject, version, &wrapped)?;
        let cached = inner.cache.entry(subject.clone()).or_default();
        cached.current = Some(version);
        cached.keys.insert(version, Arc::clone(&key));
        Ok((version, key))
    }

    /// The subject's newest data key, made (version 1) if it has none; in one immediate
    /// transaction so two processes never both make one, and never after an erasure.
    fn current_or_new(
        &self,
        conn: &mut Connection,
        subject: &Subject,
    ) -> Result<(u32, WrappedKey), KeyError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        if let Some(t) = tombstone(&tx, subject).map_err(self.sql())? {
            return Err(KeyError::Erased {
                subject: t.subject,
                erased_at_ms: t.erased_at_ms,
            });
        }
        let newest: Option<(u32, u32, Vec<u8>)> = tx
            .query_row(
                "SELECT version, kek_version, wrapped FROM data_keys WHERE subject = ?1
                 ORDER BY version DESC LIMIT 1",
                params![subject.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql())?;
        let found = match newest {
            Some((version, kek_version, bytes)) => (version, WrappedKey { kek_version, bytes }),
            None => {
                let wrapped = self.insert_new(&tx, subject, 1)?;
                (1, wrapped)
            }
        };
        tx.commit().map_err(self.sql())?;
        Ok(found)
    }

    fn insert_new(
        &self,
        tx: &rusqlite::Transaction<'_>,
        subject: &Subject,
        version: u32,
    ) -> Result<WrappedKey, KeyError> {
        let dek = DataKey::generate()?;
        let wrapped = self
            .provider
            .wrap(&context(subject, version), dek.as_bytes())?;
        tx.execute(
            "INSERT INTO data_keys (subject, version, kek_version, wrapped, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                subject.as_str(),
                version,
                wrapped.kek_version,
                wrapped.bytes,
                now_ms()
            ],
        )
        .map_err(self.sql())?;
        tracing::debug!(version, "data key made");
        Ok(wrapped)
    }

    fn key_version(
        &self,
        subject: &Subject,
        version: u32,
    ) -> Result<Arc<RandomizedNonceKey>, KeyError> {
        let mut inner = self.lock()?;
        if let Some(key) = inner.cache.get(subject).and_then(|c| c.keys.get(&version)) {
            return Ok(Arc::clone(key));
        }
        let row: Option<(u32, Vec<u8>)> = inner
            .conn
            .query_row(
                "SELECT kek_version, wrapped FROM data_keys WHERE subject = ?1 AND version = ?2",
                params![subject.as_str(), version],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql())?;
        let Some((kek_version, bytes)) = row else {
            return Err(match tombstone(&inner.conn, subject).map_err(self.sql())? {
                Some(t) => KeyError::Erased {
                    subject: t.subject,
                    erased_at_ms: t.erased_at_ms,
                },
                None => KeyError::UnknownKey {
                    subject: subject.to_string(),
                    version,
                },
            });
        };
        let key = self.unwrap_key(subject, version, &WrappedKey { kek_version, bytes })?;
        inner
            .cache
            .entry(subject.clone())
            .or_default()
            .keys
            .insert(version, Arc::clone(&key));
        Ok(key)
    }

    fn unwrap_key(
        &self,
        subject: &Subject,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<Arc<RandomizedNonceKey>, KeyError> {
        let bytes = self.provider.unwrap(&context(subject, version), wrapped)?;
        RandomizedNonceKey::new(&AES_256_GCM, &bytes)
            .map(Arc::new)
            .map_err(|_| KeyError::Crypto("data key"))
    }

    /// Starts a new data-key version for `subject`: later seals use it, blobs sealed
    /// under older versions still open. Returns the new version.
    pub fn rotate(&self, subject: &Subject) -> Result<u32, KeyError> {
        let mut inner = self.lock()?;
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        if let Some(t) = tombstone(&tx, subject).map_err(self.sql())? {
            return Err(KeyError::Erased {
                subject: t.subject,
                erased_at_ms: t.erased_at_ms,
            });
        }
        let newest: Option<u32> = tx
            .query_row(
                "SELECT MAX(version) FROM data_keys WHERE subject = ?1",
                params![subject.as_str()],
                |r| r.get(0),
            )
            .map_err(self.sql())?;
        let next = newest.unwrap_or(0) + 1;
        self.insert_new(&tx, subject, next)?;
        tx.commit().map_err(self.sql())?;
        inner.cache.remove(subject);
        Ok(next)
    }

    /// Destroys every data key of `subject` and records its tombstone, in one
    /// transaction; idempotent (a second call returns the first tombstone). From here
    /// on nothing sealed for the subject opens, anywhere it was copied. See
    /// [`Self::erase_checked`] for whether the WAL was checkpointed after it.
    pub fn erase(
        &self,
        subject: &Subject,
        erased_by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<Tombstone, KeyError> {
        self.erase_checked(subject, erased_by, reason, now_ms)
            .map(|e| e.tombstone)
    }

    /// [`Self::erase`], then a WAL checkpoint (retried for up to [`CHECKPOINT_WITHIN`]
    /// while a reader holds the WAL), and says whether it completed.
    pub fn erase_checked(
        &self,
        subject: &Subject,
        erased_by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<Erasure, KeyError> {
        let mut inner = self.lock()?;
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let existing = tombstone(&tx, subject).map_err(self.sql())?;
        let destroyed = tx
            .execute(
                "DELETE FROM data_keys WHERE subject = ?1",
                params![subject.as_str()],
            )
            .map_err(self.sql())?;
        let t = match existing {
            Some(t) => t,
            None => {
                let t = Tombstone {
                    subject: subject.to_string(),
                    erased_at_ms: now_ms,
                    erased_by: erased_by.to_owned(),
                    reason: reason.to_owned(),
                    keys_destroyed: destroyed as u64,
                };
                tx.execute(
                    "INSERT INTO erased (subject, erased_at_ms, erased_by, reason, keys_destroyed)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        t.subject,
                        i64::try_from(t.erased_at_ms).unwrap_or(i64::MAX),
                        t.erased_by,
                        t.reason,
                        i64::try_from(t.keys_destroyed).unwrap_or(i64::MAX)
                    ],
                )
                .map_err(self.sql())?;
                t
            }
        };
        tx.commit().map_err(self.sql())?;
        inner.cache.remove(subject);
        // Old page images with the wrapped key sit in the WAL until a checkpoint.
        let wal_checkpointed =
            checkpoint_wal(&inner.conn, CHECKPOINT_WITHIN).map_err(self.sql())?;
        if !wal_checkpointed {
            tracing::warn!(
                keyring = %self.path.display(),
                "keyring WAL not checkpointed after an erasure (a reader held it): old page images may still hold the destroyed key until the next checkpoint"
            );
        }
        inner.data_version = data_version(&inner.conn).map_err(self.sql())?;
        Ok(Erasure {
            tombstone: t,
            wal_checkpointed,
        })
    }

    /// Checkpoints the keyring's WAL into the file and truncates it, retrying while a
    /// reader holds it, for at most `within`; false when it could not complete (old
    /// page images, such as a destroyed key, are then still in the WAL).
    pub fn checkpoint(&self, within: Duration) -> Result<bool, KeyError> {
        let inner = self.lock()?;
        checkpoint_wal(&inner.conn, within).map_err(self.sql())
    }

    /// Whether the keyring holds data-key `version` of `subject` (without unwrapping it).
    pub fn has_key(&self, subject: &Subject, version: u32) -> Result<bool, KeyError> {
        let inner = self.lock()?;
        inner
            .conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM data_keys WHERE subject = ?1 AND version = ?2)",
                params![subject.as_str(), version],
                |r| r.get(0),
            )
            .map_err(self.sql())
    }

    /// The tombstone of `subject`, if it was erased.
    pub fn erased(&self, subject: &Subject) -> Result<Option<Tombstone>, KeyError> {
        let inner = self.lock()?;
        tombstone(&inner.conn, subject).map_err(self.sql())
    }

    /// Every tombstone, oldest first.
    pub fn tombstones(&self) -> Result<Vec<Tombstone>, KeyError> {
        let inner = self.lock()?;
        let mut stmt = inner
            .conn
            .prepare(
                "SELECT subject, erased_at_ms, erased_by, reason, keys_destroyed FROM erased
                 ORDER BY erased_at_ms, subject",
            )
            .map_err(self.sql())?;
        let rows: Result<Vec<_>, _> = stmt
            .query_map([], tombstone_row)
            .map_err(self.sql())?
            .collect();
        rows.map_err(self.sql())
    }

    /// How many data keys the keyring holds, and how many of them are wrapped under an
    /// older KEK version than the provider's current one.
    pub fn key_counts(&self) -> Result<(u64, u64), KeyError> {
        let inner = self.lock()?;
        let current = self.provider.current_version();
        inner
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(kek_version <> ?1), 0) FROM data_keys",
                params![current],
                |r| Ok((u64_of(r.get(0)?), u64_of(r.get(1)?))),
            )
            .map_err(self.sql())
    }

    /// Re-wraps every data key not under the provider's current KEK version (after a
    /// KEK rotation), in one transaction; returns how many moved. Ciphertext is not
    /// touched: data keys do not change, only their wrapping.
    pub fn rewrap_all(&self) -> Result<u64, KeyError> {
        let mut inner = self.lock()?;
        let current = self.provider.current_version();
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql())?;
        let old: Vec<(String, u32, u32, Vec<u8>)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT subject, version, kek_version, wrapped FROM data_keys
                     WHERE kek_version <> ?1",
                )
                .map_err(self.sql())?;
            stmt.query_map(params![current], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?
        };
        let mut moved = 0u64;
        for (subject, version, kek_version, bytes) in old {
            let subject = Subject::new(&subject)?;
            let ctx = context(&subject, version);
            let dek = self
                .provider
                .unwrap(&ctx, &WrappedKey { kek_version, bytes })?;
            let wrapped = self.provider.wrap(&ctx, &dek)?;
            tx.execute(
                "UPDATE data_keys SET kek_version = ?1, wrapped = ?2
                 WHERE subject = ?3 AND version = ?4",
                params![
                    wrapped.kek_version,
                    wrapped.bytes,
                    subject.as_str(),
                    version
                ],
            )
            .map_err(self.sql())?;
            moved += 1;
        }
        tx.commit().map_err(self.sql())?;
        inner.cache.clear();
        Ok(moved)
    }
}

/// Asked at every seal and open (twice per stored event): the statement is prepared
/// once per connection, not parsed each time.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

fn tombstone_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Tombstone> {
    Ok(Tombstone {
        subject: r.get(0)?,
        erased_at_ms: u64_of(r.get(1)?),
        erased_by: r.get(2)?,
        reason: r.get(3)?,
        keys_destroyed: u64_of(r.get(4)?),
    })
}

fn tombstone(conn: &Connection, subject: &Subject) -> rusqlite::Result<Option<Tombstone>> {
    conn.query_row(
        "SELECT subject, erased_at_ms, erased_by, reason, keys_destroyed FROM erased
         WHERE subject = ?1",
        params![subject.as_str()],
        tombstone_row,
    )
    .optional()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
