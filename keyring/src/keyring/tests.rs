use std::sync::Arc;

use super::*;
use crate::LocalKeyFile;

struct Fixture {
    dir: tempfile::TempDir,
    kek: Arc<LocalKeyFile>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let kek = Arc::new(LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek"));
        Self { dir, kek }
    }

    fn keyring(&self) -> Keyring {
        Keyring::open(&self.dir.path().join("keyring.sqlite3"), self.kek.clone()).expect("open")
    }
}

fn pt(name: &str) -> Subject {
    Subject::new(name).expect("subject")
}

#[test]
fn seal_and_unseal_round_trip_and_bind_their_context() {
    let f = Fixture::new();
    let ring = f.keyring();
    let blob = ring
        .seal(&pt("pt-aaaa1111"), b"raw|ev1", b"spo2=97")
        .expect("seal");
    assert!(crate::is_sealed(&blob));
    assert!(
        !blob.windows(7).any(|w| w == b"spo2=97"),
        "plaintext visible"
    );
    assert_eq!(ring.unseal(&blob, b"raw|ev1").expect("open"), b"spo2=97");
    assert!(matches!(
        ring.unseal(&blob, b"raw|ev2"),
        Err(KeyError::Unauthentic { .. })
    ));
    let header = crate::sealed::header(&blob).expect("header");
    assert_eq!(header.subject, pt("pt-aaaa1111"));
    assert_eq!(header.key_version, 1);
}

#[test]
fn a_changed_header_does_not_open() {
    let f = Fixture::new();
    let ring = f.keyring();
    ring.seal(&pt("pt-bbbb2222"), b"c", b"other").expect("seal");
    let blob = ring.seal(&pt("pt-aaaa1111"), b"c", b"mine").expect("seal");
    // Relabel the blob as another patient's (same length name): the open must fail, not
    // decrypt with the other patient's key nor report it as theirs.
    let mut relabelled = blob.clone();
    let at = blob
        .windows(11)
        .position(|w| w == b"pt-aaaa1111")
        .expect("name");
    relabelled[at..at + 11].copy_from_slice(b"pt-bbbb2222");
    assert!(ring.unseal(&relabelled, b"c").is_err());
}

#[test]
fn erasure_makes_every_copy_unreadable_and_leaves_others_alone() {
    let f = Fixture::new();
    let ring = f.keyring();
    let mine = ring.seal(&pt("pt-aaaa1111"), b"c", b"mine").expect("seal");
    let theirs = ring
        .seal(&pt("pt-bbbb2222"), b"c", b"theirs")
        .expect("seal");
    // A copy of the blob elsewhere (a backup) is the same bytes.
    let backup_copy = mine.clone();
    let t = ring
        .erase(&pt("pt-aaaa1111"), "privacy-officer", "GDPR art. 17", 42)
        .expect("erase");
    assert_eq!(t.keys_destroyed, 1);
    assert!(matches!(
        ring.unseal(&backup_copy, b"c"),
        Err(KeyError::Erased {
            erased_at_ms: 42,
            ..
        })
    ));
    assert_eq!(ring.unseal(&theirs, b"c").expect("theirs"), b"theirs");
    // No new key for an erased subject.
    assert!(matches!(
        ring.seal(&pt("pt-aaaa1111"), b"c", b"new"),
        Err(KeyError::Erased { .. })
    ));
    assert!(matches!(
        ring.rotate(&pt("pt-aaaa1111")),
        Err(KeyError::Erased { .. })
    ));
    // Idempotent: a rerun returns the first tombstone.
    let again = ring
        .erase(&pt("pt-aaaa1111"), "someone-else", "again", 99)
        .expect("erase again");
    assert_eq!(again, t);
    assert_eq!(ring.tombstones().expect("tombstones"), vec![t]);
}

#[test]
fn an_erasure_by_another_process_is_seen_by_a_running_one() {
    let f = Fixture::new();
    let bridge = f.keyring();
    let blob = bridge.seal(&pt("pt-aaaa1111"), b"c", b"x").expect("seal");
    assert!(bridge.unseal(&blob, b"c").is_ok()); // cached now
    let admin = f.keyring();
    admin
        .erase(&pt("pt-aaaa1111"), "po", "request", 1)
        .expect("erase");
    assert!(matches!(
        bridge.unseal(&blob, b"c"),
        Err(KeyError::Erased { .. })
    ));
    assert!(matches!(
        bridge.seal(&pt("pt-aaaa1111"), b"c", b"y"),
        Err(KeyError::Erased { .. })
    ));
}

#[test]
fn the_erased_key_bytes_are_gone_from_the_files() {
    let f = Fixture::new();
    let ring = f.keyring();
    ring.seal(&pt("pt-aaaa1111"), b"c", b"x").expect("seal");
    let wrapped: Vec<u8> = {
        let inner = ring.lock().expect("lock");
        inner
            .conn
            .query_row("SELECT wrapped FROM data_keys", [], |r| r.get(0))
            .expect("row")
    };
    ring.erase(&pt("pt-aaaa1111"), "po", "r", 1).expect("erase");
    for name in ["keyring.sqlite3", "keyring.sqlite3-wal"] {
        let path = f.dir.path().join(name);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        assert!(
            !bytes
                .windows(wrapped.len())
                .any(|w| w == wrapped.as_slice()),
            "{name} still holds the wrapped key"
        );
    }
}

#[test]
fn rotation_seals_new_data_under_a_new_version_and_old_data_still_opens() {
    let f = Fixture::new();
    let ring = f.keyring();
    let s = pt("pt-aaaa1111");
    let old = ring.seal(&s, b"c", b"old").expect("seal");
    assert_eq!(ring.rotate(&s).expect("rotate"), 2);
    let new = ring.seal(&s, b"c", b"new").expect("seal");
    assert_eq!(crate::sealed::header(&new).expect("h").key_version, 2);
    assert_eq!(ring.unseal(&old, b"c").expect("old"), b"old");
    assert_eq!(ring.unseal(&new, b"c").expect("new"), b"new");
    // Erasure destroys every version.
    let t = ring.erase(&s, "po", "r", 1).expect("erase");
    assert_eq!(t.keys_destroyed, 2);
}

#[test]
fn kek_rotation_rewraps_data_keys_without_touching_ciphertext() {
    let f = Fixture::new();
    let ring = f.keyring();
    let blob = ring.seal(&pt("pt-aaaa1111"), b"c", b"kept").expect("seal");
    let kek_path = f.dir.path().join("kek.json");
    assert_eq!(LocalKeyFile::rotate(&kek_path).expect("rotate kek"), 2);
    let provider = Arc::new(LocalKeyFile::load(&kek_path).expect("load"));
    let ring2 = Keyring::open(&f.dir.path().join("keyring.sqlite3"), provider).expect("open");
    assert_eq!(ring2.key_counts().expect("counts"), (1, 1));
    assert_eq!(ring2.rewrap_all().expect("rewrap"), 1);
    assert_eq!(ring2.key_counts().expect("counts"), (1, 0));
    assert_eq!(ring2.unseal(&blob, b"c").expect("open"), b"kept");
    // A keyring whose KEK file lost the version it was wrapped under cannot open.
    let other = tempfile::tempdir().expect("dir");
    let stranger = Arc::new(LocalKeyFile::create(&other.path().join("kek.json")).expect("kek"));
    let ring3 = Keyring::open(&f.dir.path().join("keyring.sqlite3"), stranger).expect("open");
    assert!(ring3.unseal(&blob, b"c").is_err());
}

#[test]
fn the_keyring_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fixture::new();
    let ring = f.keyring();
    ring.seal(&pt("pt-aaaa1111"), b"c", b"x").expect("seal");
    let mode = std::fs::metadata(ring.path())
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn two_keyrings_racing_for_a_first_key_agree_on_one() {
    let f = Fixture::new();
    let a = Arc::new(f.keyring());
    let b = Arc::new(f.keyring());
    let s = pt("pt-aaaa1111");
    let handles: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|ring| {
            let s = s.clone();
            std::thread::spawn(move || ring.seal(&s, b"c", b"v").expect("seal"))
        })
        .collect();
    let blobs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    for blob in &blobs {
        assert_eq!(a.unseal(blob, b"c").expect("a"), b"v");
        assert_eq!(b.unseal(blob, b"c").expect("b"), b"v");
    }
    assert_eq!(a.key_counts().expect("counts").0, 1);
}

#[test]
fn an_erasure_says_whether_the_wal_was_checkpointed_and_a_reader_in_the_way_is_reported() {
    let f = Fixture::new();
    let ring = f.keyring();
    ring.seal(&pt("pt-aaaa1111"), b"c", b"x").expect("seal");
    ring.seal(&pt("pt-bbbb2222"), b"c", b"x").expect("seal");
    let done = ring
        .erase_checked(&pt("pt-aaaa1111"), "po", "r", 1)
        .expect("erase");
    assert!(done.wal_checkpointed, "nobody in the way");
    let wal = f.dir.path().join("keyring.sqlite3-wal");
    assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);

    // A reader holding a snapshot from before a write keeps the checkpoint from
    // completing: reported as false within the deadline, not ignored.
    let reader = rusqlite::Connection::open(ring.path()).expect("reader");
    reader.execute_batch("BEGIN").expect("begin");
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM data_keys", [], |r| r.get(0))
        .expect("read");
    ring.seal(&pt("pt-cccc3333"), b"c", b"x")
        .expect("write after the snapshot");
    let started = std::time::Instant::now();
    assert!(
        !ring
            .checkpoint(Duration::from_millis(300))
            .expect("checkpoint"),
        "a reader was in the way"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "bounded");
    reader.execute_batch("COMMIT").expect("end");
    drop(reader);
    assert!(ring.checkpoint(Duration::from_secs(2)).expect("checkpoint"));
}
