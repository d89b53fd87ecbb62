//! The object-storage sink: batches of the outbox as files in a bucket or a directory.
//!
//! [`ObjectStoreSink`] writes through [`object_store`], so the same code serves S3 and
//! S3-compatible servers ([`ObjectStoreSink::s3`]), a local directory, the default
//! embedded sink ([`ObjectStoreSink::local`]), and memory in tests
//! ([`ObjectStoreSink::in_memory`]).
//!
//! # Layout
//!
//! This is an external format: people read it with `aws s3 cp`, `jq`, `ls` and CBOR tools.
//! The records of one [`Batch`] (outbox positions `first..=last`) are grouped into
//! partitions by `(site, device, date)`, where `date` is the UTC calendar date
//! (`YYYY-MM-DD`) of the record's `received_at_ms`, the bridge's clock at receipt (not the
//! device's `ts`). Each partition of the batch becomes two objects:
//!
//! ```text
//! {prefix}/raw/site={site}/device={device}/date={date}/{first:020}-{last:020}.cborseq
//! {prefix}/normalized/site={site}/device={device}/date={date}/{first:020}-{last:020}.ndjson
//! ```
//!
//! `{prefix}/` is absent when the prefix is empty (always so for [`ObjectStoreSink::local`]).
//! `first` and `last` are the batch's range, zero-padded to 20 digits so that name order
//! is outbox order; every partition of a batch carries the same range, and the ranges of
//! different batches never overlap.
//!
//! * `.ndjson` (`application/x-ndjson`): UTF-8, one line per record, each line the
//!   record's normalized event (one JSON object) followed by `\n`, in outbox order.
//! * `.cborseq` (`application/cbor-seq`, an RFC 8742 CBOR sequence): the `raw` bytes of
//!   the same records, concatenated in the same order, each exactly the COSE_Sign1
//!   message the device published, so its signature still verifies.
//!
//! Line *i* of an `.ndjson` object and item *i* of the `.cborseq` object with the same
//! name stem are the same record. The Content-Type is set where the store keeps one (S3).
//!
//! A sink whose field allow-list does not name `raw` ([`ObjectStoreSink::with_raw`],
//! issue 19) writes no `raw/` objects at all, and its `.ndjson` lines are the minimised
//! events of the records consent let through (a batch's objects may then hold fewer
//! records than its range, or none: a range wholly withheld writes nothing).
//!
//! Object names minimise too ([`ObjectStoreSink::with_fields`], [`PartitionBy`]): a sink
//! whose allow-list does not name `site` has no `site={site}/` level, one that does not
//! name `device` no `device={device}/` level; the `date=` level is always there. So a
//! research sink allowed neither writes
//!
//! ```text
//! {prefix}/normalized/date={date}/{first:020}-{last:020}.ndjson
//! ```
//!
//! one object per reception date of each batch, its records of every site and device
//! together in outbox order. The names still derive only from the batch range and the
//! partition key, so delivery stays idempotent.
//!
//! # Sealed objects
//!
//! A sink with a keyring ([`ObjectStoreSink::with_keyring`], issue 20) writes every
//! object sealed under the data key of its records' patient ([`sealed`]): a partition's
//! records are further grouped by the care `patient_ref` they were attributed to at
//! ingest (unattributed ones by [`sealed::UNATTRIBUTED`]), and each group's objects are
//! named by the batch range and the outbox position of the group's first record, with
//! `.vmqs` after the plain extension:
//!
//! ```text
//! {prefix}/normalized/site={site}/device={device}/date={date}/{first:020}-{last:020}-{at:020}.ndjson.vmqs
//! ```
//!
//! The names never carry the patient. Each object is one `VMQS` blob (the readable
//! header names the subject and key version) of exactly the bytes the plain object
//! would hold; `vitalmq objects open` prints them for an operator (audited). A group
//! whose patient was erased is not written (the outbox skips erased events anyway).
//!
//! # Invariants
//!
//! * Object names derive only from the batch range and the records' partition keys
//!   (and, sealed, the group's first position), and the bytes only from the records, so
//!   a retry of the same batch overwrites the same objects with identical bytes (sealed:
//!   identical plaintext under a fresh nonce) ([`PutMode::Overwrite`]): delivery is
//!   idempotent.
//! * A partition's raw object is written before its normalized object, so a reader that
//!   finds an `.ndjson` object also finds its `.cborseq` (after a failed attempt a batch
//!   may have some objects written; its retry completes it).
//! * [`Sink::deliver`] returns `Ok` only after every object of the batch was written (the
//!   store answered every PUT; on a local directory the files and their directories were
//!   also `fsync`ed).
//! * A batch is checked whole before anything is written; a record that cannot be placed
//!   exactly (a site or device that is not an id, an out-of-range date, a normalized
//!   event that is not one line, `raw` that is not one CBOR item) refuses the batch with
//!   [`SinkError::Refused`] and nothing is written.
//! * Store errors are [`SinkError::Unavailable`] (retryable: network, timeouts, server
//!   errors, permissions, a full disk, a missing bucket), except the ones retrying cannot
//!   fix (an invalid path, an unsupported operation), which are [`SinkError::Refused`].
//!   Messages name the sink and the object path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};
use time::{Date, OffsetDateTime};
use vitalmq_envelope::DeviceId;
use vitalmq_policies::SiteId;

use vitalmq_keyring::{KeyError, Keyring, Subject};

use super::{Batch, OutboxRecord, Sink, SinkError, SinkFailure};
use crate::governance::Fields;

pub mod sealed;

/// How many PUTs of one batch run at once.
pub(crate) const PARALLEL_PUTS: usize = 8;
/// TCP connect timeout for S3: an unreachable endpoint fails fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one HTTP request to S3.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one PUT, retries inside `object_store` included. The drain loop retries
/// with its own backoff, so a slow or hung store must not hold a batch for minutes.
const PUT_DEADLINE: Duration = Duration::from_secs(30);
/// Retries inside `object_store` (each request); few and quick, see [`PUT_DEADLINE`].
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
    }
}

/// The two objects written per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ObjectKind {
    /// `.cborseq` under `raw/`: the COSE_Sign1 bytes as published.
    Raw,
    /// `.ndjson` under `normalized/`: the normalized events.
    Normalized,
}

impl ObjectKind {
    /// The top-level directory under the prefix.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Normalized => "normalized",
        }
    }

    /// The file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Raw => "cborseq",
            Self::Normalized => "ndjson",
        }
    }

    /// The media type (set as Content-Type where the store keeps one).
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Raw => "application/cbor-seq",
            Self::Normalized => "application/x-ndjson",
        }
    }
}

/// Where an S3 (or S3-compatible) sink writes.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Custom endpoint (MinIO, moto, ...), e.g. `http://127.0.0.1:9000`; requests are then
    /// path-style (`{endpoint}/{bucket}/{key}`). `None` means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow a plain `http://` endpoint.
    pub allow_http: bool,
    /// Key prefix under which the layout starts (may be empty).
    pub prefix: String,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"******")
            .field("allow_http", &self.allow_http)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A [`Sink`] writing the layout of the module docs into an [`ObjectStore`].
pub struct ObjectStoreSink {
    name: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// Set for a local directory, whose writes `object_store` does not `fsync`.
    local: Option<LocalRoot>,
    /// Whether the `raw/` objects are written (see [`Self::with_raw`]).
    raw: bool,
    /// Which identifying levels object names carry (see [`Self::with_fields`]).
    partition_by: PartitionBy,
    /// Seals every telemetry object per patient (see [`Self::with_keyring`]).
    keyring: Option<Arc<Keyring>>,
}

/// The local filesystem behind a sink, to `fsync` what it wrote.
#[derive(Debug)]
struct LocalRoot {
    fs: Arc<LocalFileSystem>,
    /// Canonical root directory; directories are synced up to and including it.
    root: std::path::PathBuf,
}

impl fmt::Debug for ObjectStoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The store's Display names backend and bucket; its Debug may show configuration.
        f.debug_struct("ObjectStoreSink")
            .field("name", &self.name)
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix.as_ref())
            .field("sealed", &self.keyring.is_some())
            .finish()
    }
}

impl ObjectStoreSink {
    /// A sink over any store, writing under `prefix` (`a/b`; empty for the store's root).
    pub fn new(
        name: impl Into<String>,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
    ) -> Result<Self, SinkError> {
        let name = name.into();
        let prefix = ObjectPath::parse(prefix)
            .map_err(|e| SinkError::refused(name.clone(), SinkFailure::Prefix(e)))?;
        Ok(Self {
            name,
            store,
            prefix,
            local: None,
            raw: true,
            partition_by: PartitionBy::ALL,
            keyring: None,
        })
    }

    /// A sink writing into the directory `root_dir` (created if missing).
    pub fn local(name: impl Into<String>, root_dir: &std::path::Path) -> Result<Self, SinkError> {
        let name = name.into();
        let unavailable = |detail| SinkError::unavailable(name.clone(), detail);
        let dir = || root_dir.to_path_buf();
        vitalmq_private_fs::create_dir_all(root_dir).map_err(|e| unavailable(e.into()))?;
        let root = std::fs::canonicalize(root_dir)
            .map_err(|source| unavailable(SinkFailure::Resolve { dir: dir(), source }))?;
        let fs = Arc::new(LocalFileSystem::new_with_prefix(&root).map_err(|e| {
            unavailable(SinkFailure::Open {
                dir: dir(),
                source: e,
            })
        })?);
        let mut sink = Self::new(name.clone(), Arc::clone(&fs) as Arc<dyn ObjectStore>, "")?;
        sink.local = Some(LocalRoot { fs, root });
        Ok(sink)
    }

    /// A sink writing into an S3 bucket. Requests time out quickly (connect 2 s, request
    /// 10 s, two quick retries, 30 s per PUT at most): the drain loop does the patient
    /// retrying. The bucket must exist; it is not created.
    pub fn s3(name: impl Into<String>, settings: S3Settings) -> Result<Self, SinkError> {
        let name = name.into();
        let bucket = &settings.bucket;
        if bucket.is_empty() || bucket.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(SinkError::refused(
                name,
                SinkFailure::Bucket(bucket.clone()),
            ));
        }
        let mut client = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(settings.allow_http);
        for kind in [ObjectKind::Raw, ObjectKind::Normalized] {
            client = client.with_content_type_for_suffix(kind.extension(), kind.media_type());
        }
        client = client
            .with_content_type_for_suffix(sealed::SEALED_EXTENSION, sealed::SEALED_MEDIA_TYPE);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_retry(retry_config())
            // Carries allow_http: `with_client_options` replaces the builder's options.
            .with_client_options(client);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let store = builder
            .build()
            .map_err(|e| SinkError::refused(name.clone(), SinkFailure::S3Config(e)))?;
        Self::new(name, Arc::new(store), &settings.prefix)
    }

    /// A sink over an empty in-memory store, for tests.
    pub fn in_memory(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            store: Arc::new(InMemory::new()),
            prefix: ObjectPath::default(),
            local: None,
            raw: true,
            partition_by: PartitionBy::ALL,
            keyring: None,
        }
    }

    /// Whether the sink writes the `raw/` objects (the default). A sink whose field
    /// allow-list does not name `raw` writes only the `normalized/` ones: the signed
    /// bytes carry every payload key and the device id, which minimisation removes
    /// from its events (see `crate::governance::RAW_FIELD`).
    pub fn with_raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        self
    }

    /// The sink as its field allow-list makes it: `raw/` objects only if `fields`
    /// names `raw` ([`Self::with_raw`]), and `site=` and `device=` levels in object
    /// names only if `fields` names `site` and `device` ([`PartitionBy::allowed_by`]).
    pub fn with_fields(mut self, fields: &Fields) -> Self {
        self.raw = fields.allows_raw();
        self.partition_by = PartitionBy::allowed_by(fields);
        self
    }

    /// Seals every telemetry object under its patient's data key in `keyring`
    /// ([`sealed`]): an object then holds the records of one subject (the care
    /// patient, or [`sealed::UNATTRIBUTED`]) and is named
    /// `{first:020}-{last:020}-{at:020}.{ext}.vmqs`, `at` the outbox position of its
    /// first record. Audit segments ([`Self::put_durable`]) stay plain: they hold
    /// hashes and ids, no patient values.
    pub fn with_keyring(mut self, keyring: Arc<Keyring>) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// The store written to (tests and tools read back through it).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The directory of one partition's objects of `kind`, without a trailing `/`:
    /// `{prefix}/{kind}/` and the partition's [`PartitionKey::name`].
    pub(crate) fn partition_prefix(&self, kind: ObjectKind, key: &PartitionKey) -> String {
        let mut name = String::new();
        if !self.prefix.as_ref().is_empty() {
            name.push_str(self.prefix.as_ref());
            name.push('/');
        }
        name.push_str(kind.dir());
        name.push('/');
        name.push_str(&key.name());
        name
    }

    /// Names of all objects under `under` (relative to the sink's prefix; `""` for all),
    /// full names as stored, sorted.
    pub async fn list_objects(&self, under: &str) -> Result<Vec<String>, SinkError> {
        let relative = ObjectPath::parse(under).map_err(|e| {
            SinkError::refused(
                self.name.clone(),
                SinkFailure::ListPrefix {
                    under: under.to_owned(),
                    source: e,
                },
            )
        })?;
        let location: ObjectPath = self.prefix.parts().chain(relative.parts()).collect();
        let mut names: Vec<String> = self
            .store
            .list(Some(&location))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .map_err(|e| self.store_error("LIST", &location, e))?;
        names.sort();
        Ok(names)
    }

    /// Reads the object named `name` (a full name, as [`Self::list_objects`] gives).
    pub async fn read_object(&self, name: &str) -> Result<Bytes, SinkError> {
        let location = ObjectPath::parse(name).map_err(|e| {
            SinkError::refused(
                self.name.clone(),
                SinkFailure::ObjectPath {
                    name: name.to_owned(),
                    source: e,
                },
            )
        })?;
        let got = self
            .store
            .get(&location)
            .await
            .map_err(|e| self.store_error("GET", &location, e))?;
        got.bytes()
            .await
            .map_err(|e| self.store_error("GET", &location, e))
    }

    /// The name of a group's object of `kind`: the batch range, and for a sealing sink
    /// the group's first position (several subjects may share a partition) and the
    /// sealed extension.
    fn object_path(
        &self,
        kind: ObjectKind,
        key: &GroupKey,
        group: &Partition,
        batch: &Batch,
    ) -> Result<ObjectPath, SinkError> {
        let dir = self.partition_prefix(kind, &key.partition);
        let name = if self.keyring.is_some() {
            format!(
                "{dir}/{:020}-{:020}-{:020}.{}.{}",
                batch.first,
                batch.last,
                group.at,
                kind.extension(),
                sealed::SEALED_EXTENSION,
            )
        } else {
            format!(
                "{dir}/{:020}-{:020}.{}",
                batch.first,
                batch.last,
                kind.extension(),
            )
        };
        ObjectPath::parse(&name).map_err(|e| {
            SinkError::refused(
                self.name.clone(),
                SinkFailure::ObjectPath { name, source: e },
            )
        })
    }

    async fn deliver_batch(&self, batch: &Batch) -> Result<(), SinkError> {
        let per_subject = self.keyring.is_some();
        let partitions = partition(batch, self.partition_by, per_subject).map_err(|source| {
            SinkError::refused(
                self.name.clone(),
                SinkFailure::Batch {
                    first: batch.first,
                    last: batch.last,
                    source,
                },
            )
        })?;
        let mut objects = Vec::with_capacity(partitions.len());
        for (key, part) in partitions {
            let raw = self.object_path(ObjectKind::Raw, &key, &part, batch)?;
            let normalized = self.object_path(ObjectKind::Normalized, &key, &part, batch)?;
            objects.push(GroupObjects {
                subject: key.subject,
                raw: self.raw.then(|| (raw, PutPayload::from_iter(part.raw))),
                normalized: (normalized, PutPayload::from(part.ndjson)),
                records: part.records,
            });
        }
        if let Some(keyring) = &self.keyring {
            objects = self.seal(keyring, objects, batch).await?;
        }
        let mut puts = Vec::with_capacity(objects.len());
        for group in objects {
            puts.push(async move {
                let mut written = Vec::with_capacity(2);
                // Raw first: an .ndjson object is never visible without its .cborseq.
                if let Some((raw, body)) = group.raw {
                    self.put(&raw, body).await?;
                    written.push(raw);
                }
                let (normalized, body) = group.normalized;
                self.put(&normalized, body).await?;
                written.push(normalized);
                Ok::<_, SinkError>(written)
            });
        }
        // Every put of the attempt settles before this returns, also after a failure:
        // a local put runs on a blocking thread that dropping its future does not stop,
        // so returning at the first error would leave writes going on behind the
        // caller (and behind its retry of the same objects).
        let settled: Vec<Result<Vec<ObjectPath>, SinkError>> = futures::stream::iter(puts)
            .buffer_unordered(PARALLEL_PUTS)
            .collect()
            .await;
        let written: Vec<Vec<ObjectPath>> = settled.into_iter().collect::<Result<_, _>>()?;
        if let Some(local) = &self.local {
            self.sync_local(local, written.into_iter().flatten().collect())
                .await?;
        }
        tracing::debug!(
            sink = %self.name,
            batch.first = batch.first,
            batch.last = batch.last,
            records = batch.records.len(),
            "batch written"
        );
        Ok(())
    }

    /// Seals each group's objects for its subject, on a blocking thread (the keyring is
    /// SQLite). A group whose subject was erased is left out, never written plain: the
    /// store's outbox skips erased events, so this is only a record read just before
    /// the erasure; it is counted and the rest of the batch goes on.
    async fn seal(
        &self,
        keyring: &Arc<Keyring>,
        objects: Vec<GroupObjects>,
        batch: &Batch,
    ) -> Result<Vec<GroupObjects>, SinkError> {
        let keyring = Arc::clone(keyring);
        let sealed = tokio::task::spawn_blocking(move || seal_groups(&keyring, objects)).await;
        let (objects, erased) = match sealed {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(SinkError::unavailable(
                    self.name.clone(),
                    SinkFailure::Seal(e),
                ));
            }
            Err(e) => {
                return Err(SinkError::unavailable(
                    self.name.clone(),
                    SinkFailure::SealTask(e),
                ));
            }
        };
        if erased > 0 {
            metrics::counter!("vitalmq_bridge_sink_erased_skipped_total", "sink" => self.name.clone())
                .increment(erased as u64);
            tracing::debug!(
                sink = %self.name,
                batch.first = batch.first,
                batch.last = batch.last,
                records = erased,
                "records of erased subjects left out of the objects"
            );
        }
        Ok(objects)
    }

    /// Writes one object at `{prefix}/{key}` durably (idempotent: same key, same bytes);
    /// for other planes than telemetry, such as audit segments.
    pub async fn put_durable(&self, key: &str, bytes: bytes::Bytes) -> Result<(), SinkError> {
        let full = if self.prefix.as_ref().is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix.as_ref())
        };
        let location = ObjectPath::parse(&full).map_err(|e| {
            SinkError::refused(
                self.name.clone(),
                SinkFailure::ObjectPath {
                    name: full,
                    source: e,
                },
            )
        })?;
        self.put(&location, bytes.into()).await?;
        if let Some(local) = &self.local {
            self.sync_local(local, vec![location]).await?;
        }
        Ok(())
    }

    async fn put(&self, location: &ObjectPath, payload: PutPayload) -> Result<(), SinkError> {
        let options = PutOptions {
            mode: PutMode::Overwrite,
            ..PutOptions::default()
        };
        match tokio::time::timeout(
            PUT_DEADLINE,
            self.store.put_opts(location, payload, options),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.store_error("PUT", location, e)),
            Err(_) => Err(SinkError::unavailable(
                self.name.clone(),
                SinkFailure::PutTimeout {
                    location: location.clone(),
                    deadline: PUT_DEADLINE,
                },
            )),
        }
    }

    /// `fsync`s the written files, then every directory from theirs up to the root, so
    /// that the files and their names survive a power loss.
    async fn sync_local(
        &self,
        local: &LocalRoot,
        written: Vec<ObjectPath>,
    ) -> Result<(), SinkError> {
        let mut files = Vec::with_capacity(written.len());
        for location in &written {
            let file = local
                .fs
                .path_to_filesystem(location)
                .map_err(|e| self.store_error("SYNC", location, e))?;
            files.push(file);
        }
        let root = local.root.clone();
        let sink = self.name.clone();
        let synced = tokio::task::spawn_blocking(move || {
            let sync = |path: &std::path::Path| {
                std::fs::File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| SinkFailure::Fsync {
                        path: path.to_path_buf(),
                        source,
                    })
            };
            let mut dirs = BTreeSet::new();
            for file in &files {
                sync(file)?;
                dirs.extend(
                    file.ancestors()
                        .skip(1)
                        .take_while(|dir| dir.starts_with(&root))
                        .map(std::path::Path::to_path_buf),
                );
            }
            dirs.iter().try_for_each(|dir| sync(dir))
        })
        .await;
        match synced {
            Ok(Ok(())) => Ok(()),
            Ok(Err(detail)) => Err(SinkError::unavailable(sink, detail)),
            Err(e) => Err(SinkError::unavailable(sink, SinkFailure::FsyncTask(e))),
        }
    }

    /// Classifies an `object_store` error: only what a retry cannot fix is `Refused`.
    fn store_error(
        &self,
        op: &'static str,
        location: &ObjectPath,
        e: object_store::Error,
    ) -> SinkError {
        let sink = self.name.clone();
        let retryable = !matches!(
            e,
            object_store::Error::InvalidPath { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented
                | object_store::Error::UnknownConfigurationKey { .. }
        );
        let detail = SinkFailure::Store {
            op,
            location: location.clone(),
            source: e,
        };
        // Network, timeouts, 5xx, permissions, a full disk, a missing bucket: an
        // operator or time can fix these; the records wait in the outbox.
        if retryable {
            SinkError::unavailable(sink, detail)
        } else {
            SinkError::refused(sink, detail)
        }
    }
}

impl Sink for ObjectStoreSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.deliver_batch(batch))
    }
}

/// Which partition a record belongs to: the one place that names partitions (the sink
/// writes them, `vitalmq trace` cites them). Holding one proves the site and device are
/// ids that stay inside their path segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionKey {
    /// `None`: the sink does not partition by site (see [`PartitionBy`]).
    site: Option<SiteId>,
    /// `None`: the sink does not partition by device.
    device: Option<DeviceId>,
    date: Date,
}

/// Which identifying levels a sink's object names carry. A sink whose field allow-list
/// does not name `site` (or `device`) gets no `site=` (or `device=`) level, so its
/// object names never tell what its events do not (issue 19, minimisation); the date
/// level is always there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionBy {
    pub site: bool,
    pub device: bool,
}

impl PartitionBy {
    /// Both levels: a sink receiving whole events.
    pub const ALL: Self = Self {
        site: true,
        device: true,
    };

    /// The levels `fields` allows.
    pub fn allowed_by(fields: &Fields) -> Self {
        Self {
            site: fields.allows("site"),
            device: fields.allows("device"),
        }
    }
}

impl PartitionKey {
    /// The partition of an event of `device` at `site` received at `received_at_ms`
    /// (the UTC date of reception).
    pub fn new(site: &str, device: &str, received_at_ms: u64) -> Result<Self, BadRecord> {
        // The id grammar `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` already excludes '/', '=' and
        // the empty string; ".." is refused on top so no segment can look like a parent.
        let site = SiteId::new(site)
            .ok()
            .filter(|_| !site.contains(".."))
            .ok_or(BadRecord::Site)?;
        let device = DeviceId::new(device)
            .ok()
            .filter(|_| !device.contains(".."))
            .ok_or(BadRecord::Device)?;
        let nanos = i128::from(received_at_ms) * 1_000_000;
        let date = OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .map_err(|_| BadRecord::Time)?
            .date();
        Ok(Self {
            site: Some(site),
            device: Some(device),
            date,
        })
    }

    /// The partition of `record` in a sink partitioning `by` (site and device are
    /// checked whether or not they name a level).
    fn of(record: &OutboxRecord, by: PartitionBy) -> Result<Self, BadRecord> {
        Ok(Self::new(&record.site, &record.device, record.received_at_ms)?.within(by))
    }

    /// The key as a sink partitioning `by` names it (without the levels it leaves out).
    pub fn within(mut self, by: PartitionBy) -> Self {
        if !by.site {
            self.site = None;
        }
        if !by.device {
            self.device = None;
        }
        self
    }

    /// `site={site}/device={device}/date={YYYY-MM-DD}`, without the levels the sink
    /// does not partition by.
    pub fn name(&self) -> String {
        // The id grammar keeps site and device inside one `key=value` segment (no '/',
        // '=', control characters; never empty or "."/".."). The date of a record's
        // u64 milliseconds is in 1970..=9999 (`PartitionKey::new`), so `{:04}` is exact.
        let mut name = String::new();
        if let Some(site) = &self.site {
            name.push_str(&format!("site={}/", site.as_str()));
        }
        if let Some(device) = &self.device {
            name.push_str(&format!("device={}/", device.as_str()));
        }
        name.push_str(&format!(
            "date={:04}-{:02}-{:02}",
            self.date.year(),
            u8::from(self.date.month()),
            self.date.day(),
        ));
        name
    }
}

/// A batch that cannot be written as it is. Names the record (position and event id)
/// and the rule, not its values.
#[derive(Debug, thiserror::Error)]
pub enum BadBatch {
    #[error("not a range of outbox positions")]
    NotARange,
    #[error("record at position {position} (event {event_id}): {why}")]
    Record {
        position: i64,
        event_id: String,
        #[source]
        why: BadRecord,
    },
}

/// The rule a record of a batch breaks.
#[derive(Debug, thiserror::Error)]
pub enum BadRecord {
    #[error("outside the range or out of order")]
    Order,
    #[error("site is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, no \"..\")")]
    Site,
    #[error("device is not an id ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}}, no \"..\")")]
    Device,
    #[error("received_at_ms is past year 9999")]
    Time,
    #[error("patient_ref cannot name a data key (1 to 64 of [0-9A-Za-z._:-])")]
    Subject,
    #[error("normalized event is not one non-empty line")]
    Normalized,
    #[error("raw is not one CBOR item: {0}")]
    Raw(#[source] vitalmq_envelope::cbor::CborError),
}

/// Which objects a record goes to: its partition and, in a sealing sink, its subject
/// (`None` in a plain sink, where a partition's records share their objects).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    partition: PartitionKey,
    subject: Option<Subject>,
}

/// The bodies of one group's two objects.
#[derive(Debug)]
struct Partition {
    /// Outbox position of the group's first record (names a sealed group's objects).
    at: i64,
    /// The records' `raw` bytes in order; concatenated they are the CBOR sequence.
    raw: Vec<Bytes>,
    ndjson: Vec<u8>,
    records: usize,
}

/// One group's objects, named, ready to write.
struct GroupObjects {
    subject: Option<Subject>,
    raw: Option<(ObjectPath, PutPayload)>,
    normalized: (ObjectPath, PutPayload),
    records: usize,
}

/// The groups with their bodies sealed (see [`ObjectStoreSink::seal`]), and how many
/// records were left out because their subject was erased.
fn seal_groups(
    keyring: &Keyring,
    objects: Vec<GroupObjects>,
) -> Result<(Vec<GroupObjects>, usize), KeyError> {
    let seal_one = |subject: &Subject, (path, body): (ObjectPath, PutPayload)| {
        let mut plain = Vec::with_capacity(body.content_length());
        body.iter().for_each(|chunk| plain.extend_from_slice(chunk));
        let context = sealed::context(path.as_ref()).map_err(|e| match e {
            sealed::OpenError::Key(k) => k,
            other => KeyError::Malformed(other.to_string()),
        })?;
        let blob = keyring.seal(subject, &context, &plain)?;
        Ok::<_, KeyError>((path, PutPayload::from(blob)))
    };
    let mut out = Vec::with_capacity(objects.len());
    let mut erased = 0;
    for group in objects {
        let subject = match &group.subject {
            Some(s) => s.clone(),
            None => Subject::new(sealed::UNATTRIBUTED)?,
        };
        let sealed = (|| {
            let raw = group.raw.map(|raw| seal_one(&subject, raw)).transpose()?;
            Ok((raw, seal_one(&subject, group.normalized)?))
        })();
        match sealed {
            Ok((raw, normalized)) => out.push(GroupObjects {
                subject: Some(subject),
                raw,
                normalized,
                records: group.records,
            }),
            Err(KeyError::Erased { .. }) => erased += group.records,
            Err(e) => return Err(e),
        }
    }
    Ok((out, erased))
}

/// Checks the batch and groups its records into partitions (and, `per_subject`, by
/// subject within each), keeping outbox order within each. Errors name the record
/// (position and event id) and the rule, not its values.
fn partition(
    batch: &Batch,
    by: PartitionBy,
    per_subject: bool,
) -> Result<BTreeMap<GroupKey, Partition>, BadBatch> {
    if batch.first < 0 || batch.first > batch.last {
        return Err(BadBatch::NotARange);
    }
    let mut partitions: BTreeMap<GroupKey, Partition> = BTreeMap::new();
    let mut previous = None;
    for record in &batch.records {
        let at = |why| BadBatch::Record {
            position: record.position,
            event_id: record.event_id.clone(),
            why,
        };
        if record.position < batch.first
            || record.position > batch.last
            || previous.is_some_and(|p| record.position <= p)
        {
            return Err(at(BadRecord::Order));
        }
        previous = Some(record.position);
        let partition = PartitionKey::of(record, by).map_err(at)?;
        let subject = if per_subject {
            let name = record.subject();
            let name = name.as_deref().unwrap_or(sealed::UNATTRIBUTED);
            Some(Subject::new(name).map_err(|_| at(BadRecord::Subject))?)
        } else {
            None
        };
        let key = GroupKey { partition, subject };
        if record.normalized_json.is_empty() || record.normalized_json.contains('\n') {
            return Err(at(BadRecord::Normalized));
        }
        vitalmq_envelope::cbor::check_single_item(&record.raw)
            .map_err(|e| at(BadRecord::Raw(e)))?;
        let part = partitions.entry(key).or_insert_with(|| Partition {
            at: record.position,
            raw: Vec::new(),
            ndjson: Vec::new(),
            records: 0,
        });
        part.records += 1;
        part.raw.push(record.raw.clone());
        part.ndjson
            .extend_from_slice(record.normalized_json.as_bytes());
        part.ndjson.push(b'\n');
    }
    Ok(partitions)
}

#[cfg(test)]
mod sealed_tests;
#[cfg(test)]
mod tests;
