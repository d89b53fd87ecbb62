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
