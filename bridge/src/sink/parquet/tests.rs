use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::watch;
use vitalmq_policies::Purpose;

use super::*;
use crate::drain::SinkGovernance;
use crate::drain::tests::{JAN_2026, registry};
use crate::governance::PurposePseudonym;

fn record(position: i64, device: &str, patient: &str, observed_at_ms: u64) -> OutboxRecord {
    OutboxRecord {
        position,
        event_id: format!("ev-{position}"),
        device: device.into(),
        site: "north".into(),
        epoch: 1,
        seq: position as u64,
        observed_at_ms,
        received_at_ms: observed_at_ms + 10,
        topic: format!("devices/{device}/telemetry"),
        raw: Bytes::from_static(&[0xf6]),
        normalized_json: format!(
            r#"{{"format":"vitalmq-event/v1","event_id":"ev-{position}","device":"{device}","site":"north","patient_ref":"{patient}","type":"vitals","m":{{"spo2":97,"pulse":60}},"fw":"1.0.0","extra":{{"secret":"x"}}}}"#
        ),
        ingest_patient: None,
    }
}

async fn read_back(sink: &ParquetSink) -> Vec<(String, arrow_array::RecordBatch)> {
    let mut out = Vec::new();
    for name in sink.files().list_objects("").await.expect("list") {
        let bytes = sink.files().read_object(&name).await.expect("read");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("parquet")
            .build()
            .expect("reader");
        for batch in reader {
            out.push((name.clone(), batch.expect("batch")));
        }
    }
    out
}

/// Consent decides, the subject is the surveillance pseudonym, and a redelivery of the
/// same batch rewrites the same files.
#[tokio::test]
async fn governed_events_become_weekly_files_with_pseudonyms_only() {
    // dev-1 (pt-a) granted research only: surveillance is not granted for anyone in
    // the shared test registry, so grant it here.
    let text = registry(None)
        .to_toml()
        .replace("purpose = \"research\"", "purpose = \"surveillance\"");
    let reg =
        Arc::new(DeviceRegistry::parse(&text, std::path::Path::new("r.toml")).expect("registry"));
    let (_tx, rx) = watch::channel(reg);
    let mut gov = SinkGovernance::new(Purpose::Surveillance, fields(), rx.clone());
    gov.pseudonym = Some(PurposePseudonym::new([9; 32], Purpose::Surveillance));
    let week = 7 * 86_400_000;
    let batch = Batch {
        first: 10,
        last: 14,
        records: vec![
            record(10, "dev-1", "pt-a", JAN_2026 + 1_000),
            record(11, "dev-1", "pt-a", JAN_2026 + week),
            record(12, "dev-2", "pt-b", JAN_2026 + 1_000), // no consent
            record(13, "dev-1", "pt-a", JAN_2026 - 1),     // before the grant
            record(14, "dev-1", "pt-a", JAN_2026 + 2_000),
        ],
    };
    let (sent, withheld) = gov.apply(&batch).expect("govern");
    assert_eq!(withheld.counts(), [("no_consent", 2)]);
    let sink = ParquetSink::new(ObjectStoreSink::in_memory("surveil"), rx);
    sink.deliver(&sent).await.expect("deliver");
    sink.deliver(&sent).await.expect("redeliver");
    let files = read_back(&sink).await;
    let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "events/week=2026-W01/part-10-14.parquet",
            "events/week=2026-W02/part-10-14.parquet"
        ]
    );
    let rows: usize = files.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(rows, 3, "each governed record once, after a redelivery");
    let expected = PurposePseudonym::new([9; 32], Purpose::Surveillance).of("pt-a");
    for (_, batch) in &files {
        assert_eq!(
            batch.schema(),
            crate::surveillance::rows::schema(Table::Events)
        );
        let subject = batch
            .column_by_name("subject")
            .expect("subject")
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .expect("strings");
        for s in subject.iter() {
            assert_eq!(s.map(str::to_owned), expected, "the pseudonym, not pt-a");
        }
    }
}

/// A record no governance rewrote (its `patient_ref` is the care reference) gets no
/// subject.
#[test]
fn a_care_reference_is_never_a_subject() {
    let (_tx, rx) = watch::channel(registry(None));
    let sink = ParquetSink::new(ObjectStoreSink::in_memory("surveil"), rx);
    let batch = Batch {
        first: 1,
        last: 1,
        records: vec![record(1, "dev-1", "pt-a", JAN_2026)],
    };
    let files = sink.files_of(&batch).expect("files");
    assert_eq!(files.len(), 1);
    let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(files[0].1.clone()))
        .expect("parquet")
        .build()
        .expect("reader");
    for batch in reader {
        let batch = batch.expect("batch");
        let subject = batch.column_by_name("subject").expect("subject");
        assert_eq!(subject.null_count(), batch.num_rows());
    }
}

mod follow {
    use std::sync::Mutex;

    use super::*;
    use crate::gaps::{Gap, GapState};
    use crate::store::{Commit, NewAlert, Quarantined, Store, lock};
    use crate::surveillance::Table;
    use vitalmq_envelope::DeviceId;

    fn surveillance_registry() -> Arc<DeviceRegistry> {
        let text = registry(None)
            .to_toml()
            .replace("purpose = \"research\"", "purpose = \"surveillance\"");
        Arc::new(DeviceRegistry::parse(&text, std::path::Path::new("r.toml")).expect("registry"))
    }

    fn refusal(at: u64) -> Quarantined {
        Quarantined {
            received_at_ms: at,
            topic: "devices/dev-1/telemetry".into(),
            device: Some("dev-1".into()),
            reason: "bad_signature".into(),
            detail: "x".into(),
            sha256_hex: "00".into(),
            raw: Bytes::from_static(b"x"),
        }
    }

    fn alert(id: &str, device: &str, patient: &str, at: u64) -> NewAlert {
        NewAlert {
            alert_id: id.into(),
            state: "open".into(),
            kind: "clinical".into(),
            topic: format!("alerts/north/{id}"),
            device: Some(device.into()),
            rule: Some("spo2-low".into()),
            created_at_ms: at,
            body: format!(
                r#"{{"alert_id":"{id}","rule":"spo2-low","rule_version":"3","severity":"high","device":"{device}","site":"north","patient_ref":"{patient}","fw":"1.0.0"}}"#
            ),
            level: 0,
        }
    }

    async fn rows_of(sink: &ParquetSink, table: Table) -> (Vec<String>, usize) {
        let files = read_back(sink).await;
        let prefix = format!("{}/", table.dir());
        let mine: Vec<_> = files
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        let mut names: Vec<String> = mine.iter().map(|(n, _)| n.clone()).collect();
        names.dedup();
        (names, mine.iter().map(|(_, b)| b.num_rows()).sum())
    }

    /// Alerts are governed (consent, pseudonym, withheld counted), refusals and gaps
    /// flow; a batch planned before a crash is rewritten under the same name.
    #[tokio::test]
    async fn side_tables_follow_the_store_with_cursors_and_consent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(Store::open(dir.path()).expect("store")));
        let at = JAN_2026 + 60_000;
        {
            let mut s = lock(&store);
            s.commit(&Commit {
                quarantine: vec![refusal(at), refusal(at + 1)],
                gaps: vec![(
                    DeviceId::new("dev-1").expect("id"),
                    Gap {
                        epoch: 1,
                        first: 5,
                        last: 7,
                        filled: 0,
                        state: GapState::Open,
                        opened_at_ms: at,
                    },
                )],
                alerts: vec![
                    // Delivered by a canary rule set (the engine names it).
                    NewAlert {
                        body: alert("al-1", "dev-1", "pt-a", at).body.replacen(
                            "{",
                            r#"{"rule_set_version":"2026-01-01.2","role":"canary","#,
                            1,
                        ),
                        ..alert("al-1", "dev-1", "pt-a", at)
                    },
                    alert("al-2", "dev-2", "pt-b", at), // no surveillance consent
                ],
                now_ms: at,
                ..Commit::default()
            })
            .expect("commit");
            // A crash after planning refusals 1..=2 and before the cursor moved.
            s.alert_delivered(
                &format!("{}:pending", cursor_name("surveil", Table::Refusals)),
                2,
            )
            .expect("pending");
            s.commit(&Commit {
                quarantine: vec![refusal(at + 2)],
                now_ms: at,
                ..Commit::default()
            })
            .expect("commit");
        }
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let (_tx, rx) = watch::channel(surveillance_registry());
        let sink = Arc::new(ParquetSink::new(
            ObjectStoreSink::in_memory("surveil"),
            rx.clone(),
        ));
        let follower = Follower {
            sink: Arc::clone(&sink),
            store: Arc::clone(&store),
            registry: rx,
            pseudonym: Some(PurposePseudonym::new([9; 32], Purpose::Surveillance)),
            auditor: audit.auditor(),
            batch_max: 100,
        };
        // Alerts 1 (al-1 sent), refusals 2 (the pending range), gaps 1.
        assert_eq!(follower.pass().await.expect("pass"), 4);
        // The refusal after the pending range, then nothing.
        assert_eq!(follower.pass().await.expect("pass"), 1);
        assert_eq!(follower.pass().await.expect("pass"), 0);

        let (names, rows) = rows_of(&sink, Table::Refusals).await;
        assert_eq!(
            names,
            [
                "refusals/week=2026-W01/part-1-2.parquet",
                "refusals/week=2026-W01/part-3-3.parquet"
            ]
        );
        assert_eq!(rows, 3, "each refusal once");
        assert_eq!(rows_of(&sink, Table::Gaps).await.1, 1);
        let (names, rows) = rows_of(&sink, Table::Alerts).await;
        assert_eq!(names, ["alerts/week=2026-W01/part-1-2.parquet"]);
        assert_eq!(rows, 1, "al-2 withheld: no consent");
        let alerts: Vec<_> = read_back(&sink)
            .await
            .into_iter()
            .filter(|(n, _)| n.starts_with("alerts/week=2026-W01/"))
            .collect();
        assert_eq!(
            (
                strings(&alerts[0].1, "rule_set_version"),
                strings(&alerts[0].1, "role")
            ),
            (
                vec![Some("2026-01-01.2".into())],
                vec![Some("canary".into())]
            ),
            "the body's rule set version passes the sink's allow-list"
        );
        let expected = PurposePseudonym::new([9; 32], Purpose::Surveillance).of("pt-a");
        for (name, batch) in read_back(&sink).await {
            if let Some(subject) = batch.column_by_name("subject") {
                let subject = subject
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .expect("strings");
                for s in subject.iter() {
                    assert_eq!(s.map(str::to_owned), expected, "{name}: the pseudonym");
                }
            }
        }
        let s = lock(&store);
        for (table, through) in [(Table::Alerts, 2), (Table::Refusals, 3), (Table::Gaps, 1)] {
            assert_eq!(
                s.handler_cursor(&cursor_name("surveil", table))
                    .expect("cursor"),
                through,
                "{table:?}"
            );
        }
    }

    /// `dev-00001` (patient `pt-s`) with surveillance granted; `dev-00002` assigned to
    /// the same patient, no grant.
    fn consent_registry() -> Arc<DeviceRegistry> {
        let key = vitalmq_envelope::SigningKey::generate(vitalmq_envelope::Algorithm::EdDsa)
            .expect("key")
            .verifying_key()
            .to_hex();
        let text = format!(
            "format = \"vitalmq-registry/v2\"\ntrust_domain = \"t.vitalmq\"\n\
             [[devices]]\nid = \"dev-00001\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             [[devices.assignments]]\nvalid_from = \"1970-01-01T00:00:00Z\"\npatient_ref = \"pt-s\"\nsite = \"site-01\"\n\
             consent = [{{ purpose = \"surveillance\", valid_from = \"1970-01-01T00:00:00Z\" }}]\n\
             [[devices]]\nid = \"dev-00002\"\nalg = \"EdDSA\"\npublic_key = \"{key}\"\n\
             [[devices.assignments]]\nvalid_from = \"1970-01-01T00:00:00Z\"\npatient_ref = \"pt-s\"\nsite = \"site-01\"\n"
        );
        Arc::new(DeviceRegistry::parse(&text, std::path::Path::new("r.toml")).expect("registry"))
    }

    fn score_of(n: u32, device: &str, inputs: &[&str], at: u64) -> crate::score::NewScore {
        let score_id = format!("sc-{n}");
        let inputs: Vec<serde_json::Value> = inputs
            .iter()
            .map(|id| {
                serde_json::json!({"metric": "spo2", "value": 97, "event_id": id,
                "observed_at": "1970-01-01T00:00:00.001Z"})
            })
            .collect();
        crate::score::NewScore {
            score_id: score_id.clone(),
            patient_ref: "pt-s".into(),
            site: "site-01".into(),
            device: device.into(),
            model: "news2".into(),
            version: "1.0.0".into(),
            config_sha256: "ab".repeat(32),
            role: "live".into(),
            observed_at_ms: at,
            created_at_ms: at,
            payload: serde_json::json!({"format": "vitalmq-score/v1", "score_id": score_id,
                "model": "news2", "version": "1.0.0", "config_sha256": "ab".repeat(32),
                "role": "live", "patient_ref": "pt-s", "site": "site-01", "aggregate": 1,
                "risk": "low", "complete": true, "red": false, "missing": [],
                "inputs": inputs})
            .to_string(),
        }
    }

    fn strings(batch: &arrow_array::RecordBatch, column: &str) -> Vec<Option<String>> {
        batch
            .column_by_name(column)
            .expect("column")
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .expect("strings")
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect()
    }

    /// Gaps and refusals take the firmware the device last reported at or before their
    /// time and follow its consent (a device without a surveillance grant is withheld,
    /// counted); a score flows only if every input's device and time was consented.
    #[tokio::test]
    async fn firmware_and_consent_of_device_rows_and_score_inputs() {
        use crate::store::test_events::event;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(Store::open(dir.path()).expect("store")));
        let ok = event("dev-00001", 1, 1);
        let other = event("dev-00002", 1, 1);
        let at = JAN_2026;
        let gap = |device: &str| {
            (
                DeviceId::new(device).expect("id"),
                Gap {
                    epoch: 1,
                    first: 5,
                    last: 7,
                    filled: 0,
                    state: GapState::Open,
                    opened_at_ms: at,
                },
            )
        };
        let mut no_device = refusal(at);
        no_device.device = None;
        let mut refused_other = refusal(at);
        refused_other.device = Some("dev-00002".into());
        let mut refused_ok = refusal(at);
        refused_ok.device = Some("dev-00001".into());
        lock(&store)
            .commit(&Commit {
                events: vec![ok.clone(), other.clone()],
                quarantine: vec![refused_ok, refused_other, no_device],
                gaps: vec![gap("dev-00001"), gap("dev-00002")],
                scores: vec![
                    score_of(1, "dev-00001", &[ok.event_id()], at),
                    score_of(2, "dev-00001", &[ok.event_id(), other.event_id()], at),
                    score_of(3, "dev-00001", &["ev-not-stored"], at),
                ],
                now_ms: at,
                ..Commit::default()
            })
            .expect("commit");
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let (_tx, rx) = watch::channel(consent_registry());
        let sink = Arc::new(ParquetSink::new(
            ObjectStoreSink::in_memory("surveil"),
            rx.clone(),
        ));
        let follower = Follower {
            sink: Arc::clone(&sink),
            store: Arc::clone(&store),
            registry: rx,
            pseudonym: None,
            auditor: audit.auditor(),
            batch_max: 100,
        };
        // Refusals: dev-00001's and the device-less one; gaps: dev-00001's; scores: 1.
        assert_eq!(follower.pass().await.expect("pass"), 4);
        let files = read_back(&sink).await;
        let of = |prefix: &str| -> Vec<&arrow_array::RecordBatch> {
            files
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, b)| b)
                .collect()
        };
        let gaps = of("gaps/");
        assert_eq!(gaps.len(), 1);
        assert_eq!(strings(gaps[0], "device"), [Some("dev-00001".to_owned())]);
        assert_eq!(strings(gaps[0], "fw"), [Some("1.0.0".to_owned())]);
        let refusals = of("refusals/");
        let mut fw: Vec<_> = refusals
            .iter()
            .flat_map(|b| strings(b, "device").into_iter().zip(strings(b, "fw")))
            .collect();
        fw.sort();
        assert_eq!(
            fw,
            [
                (None, None),
                (Some("dev-00001".into()), Some("1.0.0".into()))
            ]
        );
        let scores = of("scores/");
        let ids: Vec<_> = scores.iter().flat_map(|b| strings(b, "score_id")).collect();
        assert_eq!(
            ids,
            [Some("sc-1".to_owned())],
            "an input of a device without a grant, or not stored, withholds the score"
        );
        let s = lock(&store);
        for (table, through) in [(Table::Refusals, 3), (Table::Gaps, 2), (Table::Scores, 3)] {
            assert_eq!(
                s.handler_cursor(&cursor_name("surveil", table))
                    .expect("cursor"),
                through,
                "{table:?}: withheld rows are passed"
            );
        }
        drop(s);
        // The same rule the command attributes by.
        assert_eq!(
            lock(&store)
                .reported_at("dev-00001", at)
                .expect("reported")
                .fw
                .as_deref(),
            Some("1.0.0")
        );
        assert_eq!(
            lock(&store).reported_at("dev-00001", 0).expect("reported"),
            crate::store::Reported::default(),
            "nothing reported before its first event"
        );
    }

    /// Every table has a zero-row file with its schema from the start, so readers bind
    /// all five before each has rows.
    #[tokio::test]
    async fn each_table_starts_with_an_empty_file_of_its_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Mutex::new(Store::open(dir.path()).expect("store")));
        let audit =
            vitalmq_audit::AuditLog::open(&dir.path().join("audit.jsonl"), 64).expect("audit");
        let (_tx, rx) = watch::channel(surveillance_registry());
        let sink = Arc::new(ParquetSink::new(
            ObjectStoreSink::in_memory("surveil"),
            rx.clone(),
        ));
        let follower = Follower {
            sink: Arc::clone(&sink),
            store,
            registry: rx,
            pseudonym: None,
            auditor: audit.auditor(),
            batch_max: 100,
        };
        follower.write_schemas().await.expect("schemas");
        follower.write_schemas().await.expect("again, same names");
        let mut names = sink.files().list_objects("").await.expect("list");
        names.sort();
        let mut expected: Vec<String> = Table::ALL
            .iter()
            .map(|t| crate::surveillance::file_name(*t, EMPTY_WEEK, 0, 0))
            .collect();
        expected.sort();
        assert_eq!(names, expected);
        for table in Table::ALL {
            let name = crate::surveillance::file_name(table, EMPTY_WEEK, 0, 0);
            let bytes = sink.files().read_object(&name).await.expect("read");
            let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("parquet");
            assert_eq!(
                builder.schema().fields(),
                crate::surveillance::rows::schema(table).fields(),
                "{name}"
            );
            assert_eq!(builder.metadata().file_metadata().num_rows(), 0, "{name}");
        }
    }
}
