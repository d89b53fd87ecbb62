//! A sealing sink: one object pair per (partition, patient), deterministic names, the
//! seal bound to the name, erased patients left out, and the care patient kept as the
//! subject when governance minimises or pseudonymises the events.

use std::collections::BTreeMap;

use vitalmq_keyring::LocalKeyFile;

use super::tests::{NAME, record, snapshot};
use super::*;

const RANGE: &str = "00000000000000000100-00000000000000000110";
const DIR: &str = "site=north/device=dev-a/date=2025-03-01";
/// 2025-03-01T12:00:00Z.
const NOON: u64 = 1_740_830_400_000;

struct Ring {
    _dir: tempfile::TempDir,
    keyring: Arc<Keyring>,
}

fn ring() -> Ring {
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek");
    let keyring =
        Keyring::open(&dir.path().join("keyring.sqlite3"), Arc::new(kek)).expect("keyring");
    Ring {
        _dir: dir,
        keyring: Arc::new(keyring),
    }
}

/// A record of `dev-a` at `north` attributed to `patient` (none: unattributed).
fn of(patient: Option<&str>, position: i64) -> OutboxRecord {
    let mut r = record(
        position,
        "north",
        "dev-a",
        NOON + u64::try_from(position).expect("+"),
    );
    let mut event: serde_json::Value = serde_json::from_str(&r.normalized_json).expect("json");
    if let Some(p) = patient {
        event["patient_ref"] = p.into();
    }
    r.normalized_json = event.to_string();
    r
}

/// One partition shared by two patients (the device was reassigned within the day)
/// and an unattributed record.
fn shared_partition() -> Batch {
    Batch {
        first: 100,
        last: 110,
        records: vec![
            of(Some("pt-aaaa1111"), 100),
            of(Some("pt-bbbb2222"), 101),
            of(Some("pt-aaaa1111"), 102),
            of(None, 105),
        ],
    }
}

fn name(kind: &str, at: i64) -> String {
    let ext = if kind == "raw" { "cborseq" } else { "ndjson" };
    format!("{kind}/{DIR}/{RANGE}-{at:020}.{ext}.vmqs")
}

fn ndjson(batch: &Batch, positions: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in batch
        .records
        .iter()
        .filter(|r| positions.contains(&r.position))
    {
        out.extend_from_slice(r.normalized_json.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Subject and plaintext of every object.
fn opened(
    ring: &Keyring,
    objects: &BTreeMap<String, Bytes>,
) -> BTreeMap<String, (String, Vec<u8>)> {
    objects
        .iter()
        .map(|(name, bytes)| {
            let subject = sealed::header(bytes).expect("header").subject.to_string();
            let plain = sealed::open(ring, name, bytes).expect("opens");
            (name.clone(), (subject, plain))
        })
        .collect()
}

#[tokio::test]
async fn a_partition_shared_by_patients_becomes_one_sealed_pair_per_patient() {
    let ring = ring();
    let sink = ObjectStoreSink::in_memory(NAME).with_keyring(Arc::clone(&ring.keyring));
    let batch = shared_partition();
    sink.deliver(&batch).await.expect("delivered");
    let objects = snapshot(&sink).await;
    let expected: Vec<String> = [100, 101, 105]
        .iter()
        .flat_map(|at| [name("normalized", *at), name("raw", *at)])
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(objects.keys().cloned().collect::<Vec<_>>(), expected);
    for (name, bytes) in &objects {
        assert!(bytes.starts_with(b"VMQS"), "{name} is not sealed");
        assert!(
            !bytes.windows(6).any(|w| w == b"dev-a\""),
            "{name} holds plaintext"
        );
    }

    let opened = opened(&ring.keyring, &objects);
    let subject_and_lines = |at: i64, positions: &[i64]| {
        let (subject, plain) = &opened[&name("normalized", at)];
        assert_eq!(
            plain,
            &ndjson(&batch, positions),
            "lines of the group at {at}"
        );
        subject.clone()
    };
    assert_eq!(subject_and_lines(100, &[100, 102]), "pt-aaaa1111");
    assert_eq!(subject_and_lines(101, &[101]), "pt-bbbb2222");
    assert_eq!(subject_and_lines(105, &[105]), sealed::UNATTRIBUTED);
    let (_, raw) = &opened[&name("raw", 100)];
    let items = super::tests::cbor_items(raw);
    assert_eq!(
        items,
        vec![batch.records[0].raw.to_vec(), batch.records[2].raw.to_vec()]
    );

    // A retry writes the same names (fresh nonces, the same plaintext).
    sink.deliver(&batch).await.expect("delivered again");
    let again = snapshot(&sink).await;
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        objects.keys().collect::<Vec<_>>()
    );
    let reopened = super::sealed_tests::opened(&ring.keyring, &again);
    assert_eq!(reopened, opened);
}

#[tokio::test]
async fn a_sealed_object_does_not_open_under_another_name() {
    let ring = ring();
    let sink = ObjectStoreSink::in_memory(NAME).with_keyring(Arc::clone(&ring.keyring));
    sink.deliver(&shared_partition()).await.expect("delivered");
    let objects = snapshot(&sink).await;
    let a = &objects[&name("normalized", 100)];
    for other in [
        name("normalized", 101),
        name("raw", 100),
        format!("normalized/{DIR}/{RANGE}-{:020}.ndjson.vmqs", 102),
        format!(
            "normalized/site=north/device=dev-a/date=2025-03-02/{RANGE}-{:020}.ndjson.vmqs",
            100
        ),
    ] {
        assert!(
            matches!(
                sealed::open(&ring.keyring, &other, a),
                Err(sealed::OpenError::Key(KeyError::Unauthentic { .. }))
            ),
            "A's object opened as {other}"
        );
    }
    // Archived under another prefix, the same name from the kind level on still opens.
    let archived = format!("archive/2025/{}", name("normalized", 100));
    assert!(sealed::open(&ring.keyring, &archived, a).is_ok());
    // A plain name is not opened at all.
    assert!(matches!(
        sealed::open(
            &ring.keyring,
            &name("normalized", 100).replace(".vmqs", ""),
            a
        ),
        Err(sealed::OpenError::NotSealedName(_))
    ));
}

#[tokio::test]
async fn an_erased_patient_is_left_out_and_their_objects_no_longer_open() {
    let ring = ring();
    let sink = ObjectStoreSink::in_memory(NAME).with_keyring(Arc::clone(&ring.keyring));
    let batch = shared_partition();
    sink.deliver(&batch).await.expect("delivered");
    let before = snapshot(&sink).await;

    let a = Subject::new("pt-aaaa1111").expect("subject");
    ring.keyring
        .erase(&a, "test", "erasure request", 1)
        .expect("erase");
    for (name, bytes) in &before {
        let opened = sealed::open(&ring.keyring, name, bytes);
        if name.contains(&format!("{:020}.", 100)) {
            assert!(
                matches!(opened, Err(sealed::OpenError::Key(KeyError::Erased { .. }))),
                "{name}: {opened:?}"
            );
        } else {
            assert!(opened.is_ok(), "{name} of another subject must still open");
        }
    }

    // A batch read just before the erasure: A's records are not written (never in
    // plaintext), the others are, and the delivery succeeds.
    let next = Batch {
        first: 200,
        last: 202,
        records: vec![
            of(Some("pt-aaaa1111"), 200),
            of(Some("pt-bbbb2222"), 201),
            of(Some("pt-aaaa1111"), 202),
        ],
    };
    sink.deliver(&next).await.expect("delivered without A");
    let written: Vec<String> = snapshot(&sink)
        .await
        .into_keys()
        .filter(|n| !before.contains_key(n))
        .collect();
    let range = "00000000000000000200-00000000000000000202";
    assert_eq!(
        written,
        vec![
            format!("normalized/{DIR}/{range}-{:020}.ndjson.vmqs", 201),
            format!("raw/{DIR}/{range}-{:020}.cborseq.vmqs", 201),
        ]
    );
}

#[tokio::test]
async fn a_minimised_sink_seals_under_the_care_patient_and_names_no_patient() {
    use crate::governance::{Flow, PurposePseudonym, govern};
    use vitalmq_policies::Purpose;

    let ring = ring();
    let fields = Fields::Only(["m", "patient_ref"].map(String::from).into());
    let sink = ObjectStoreSink::in_memory(NAME)
        .with_fields(&fields)
        .with_keyring(Arc::clone(&ring.keyring));
    let batch = shared_partition();
    let research = PurposePseudonym::new([7; 32], Purpose::Research);
    let of_care = |care: &str| research.of(care);
    let (records, _) =
        govern(&batch.records, |_| Flow::Send, &fields, Some(&of_care)).expect("govern");
    assert_eq!(
        records[0].subject().as_deref(),
        Some("pt-aaaa1111"),
        "the care patient survives the pseudonym"
    );
    assert!(!records[0].normalized_json.contains("pt-aaaa1111"));
    let governed = Batch {
        first: batch.first,
        last: batch.last,
        records,
    };
    sink.deliver(&governed).await.expect("delivered");
    let objects = snapshot(&sink).await;
    let range_dir = "normalized/date=2025-03-01";
    let names: Vec<&String> = objects.keys().collect();
    assert_eq!(
        names,
        [100, 101, 105]
            .map(|at| format!("{range_dir}/{RANGE}-{at:020}.ndjson.vmqs"))
            .iter()
            .collect::<Vec<_>>(),
        "no raw/, no site or device level, no patient in the names"
    );
    let opened = opened(&ring.keyring, &objects);
    let (subject, plain) = &opened[&format!("{range_dir}/{RANGE}-{:020}.ndjson.vmqs", 100)];
    assert_eq!(subject, "pt-aaaa1111");
    let pseudonym = research.of("pt-aaaa1111").expect("pseudonym");
    assert!(String::from_utf8_lossy(plain).contains(&pseudonym));
}
