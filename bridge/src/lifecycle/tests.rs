use std::path::Path;

use vitalmq_policies::{Hold, PrincipalId};

use super::*;
use crate::store::test_events::event;
use crate::store::{Commit, NewAlert, Quarantined, RetainedEvent, StoreAct};

const DAY: u64 = plan::DAY_MS;
/// A Monday, 00:00 UTC (2026-01-05).
const T0: u64 = 1_767_571_200_000;

const POLICY: &str = r#"
format = "vitalmq-retention/v1"
[planes.raw]
keep_for = "1day"
action = "delete"
[planes.normalized]
keep_for = "2days"
action = "anonymize"
[planes.normalized.purposes.research]
keep_for = "1day"
action = "archive"
archive_to = "archive/research/"
[planes.clinical]
keep_for = "1day"
action = "delete"
[planes.quarantine]
keep_for = "1day"
action = "delete"
[planes."audit:broker"]
keep_for = "1day"
action = "delete"
[planes."audit:bridge"]
keep_for = "1day"
action = "delete"
[planes."audit:admin"]
keep_for = "1day"
action = "archive"
archive_to = "archive/audit/"
[planes."audit:operator"]
keep_for = "1day"
action = "anonymize"
"#;

fn policy() -> RetentionPolicy {
    RetentionPolicy::parse(POLICY, Path::new("retention.toml")).expect("policy")
}

fn hold(id: &str, patient: Option<&str>, device: Option<&str>, during: Option<(u64, u64)>) -> Hold {
    Hold {
        id: id.into(),
        reason: "test".into(),
        placed_by: PrincipalId::new("tester").expect("id"),
        placed_at: 0,
        patient_ref: patient.map(str::to_owned),
        device: device.map(|d| vitalmq_envelope::DeviceId::new(d).expect("device")),
        during: during.and_then(|(from, to)| vitalmq_policies::Period::new(from, Some(to))),
    }
}

fn ctx<'a>(policy: &'a RetentionPolicy, holds: &'a LegalHolds, now: u64) -> Context<'a> {
    Context {
        policy,
        holds,
        now,
        sinks_through: None,
        archived_through: None,
        handlers_through: None,
    }
}

fn row(position: i64, observed: u64, received: u64) -> RetainedEvent {
    RetainedEvent {
        position,
        raw_id: position,
        device: "dev-00001".into(),
        observed_at_ms: observed,
        received_at_ms: received,
        normalized: Some(
            r#"{"format":"vitalmq-event/v1","device":"dev-00001","patient_ref":"pt-7f3a","m":{"spo2":97}}"#
                .into(),
        ),
        patient_ref: Some("pt-7f3a".into()),
        erased: false,
        anonymized: false,
        raw_present: true,
    }
}

#[test]
fn an_event_is_due_exactly_at_keep_for_and_raw_before_normalized() {
    let (policy, holds) = (policy(), LegalHolds::none());
    let r = row(1, T0, T0);
    let mut report = Report::default();
    // Just before a day: nothing.
    assert_eq!(
        plan::event(&ctx(&policy, &holds, T0 + DAY - 1), &r, &mut report),
        None
    );
    // Exactly a day: the raw bytes go, the event stays.
    assert_eq!(
        plan::event(&ctx(&policy, &holds, T0 + DAY), &r, &mut report),
        Some(StoreAct::PurgeRaw { raw_id: 1 })
    );
    let purged = RetainedEvent {
        raw_present: false,
        ..r.clone()
    };
    assert_eq!(
        plan::event(
            &ctx(&policy, &holds, T0 + 2 * DAY - 1),
            &purged,
            &mut report
        ),
        None
    );
    // Exactly two days: anonymized.
    match plan::event(&ctx(&policy, &holds, T0 + 2 * DAY), &purged, &mut report) {
        Some(StoreAct::AnonymizeEvent {
            position: 1,
            hour_ms,
            json,
            ..
        }) => {
            assert_eq!(hour_ms, T0);
            assert!(
                !json.contains("pt-7f3a") && !json.contains("dev-00001"),
                "{json}"
            );
        }
        other => panic!("expected anonymize, got {other:?}"),
    }
    assert_eq!(report.count("raw", "delete"), 1);
    assert_eq!(report.count("normalized", "anonymize"), 1);
    // An anonymized event is left alone from then on.
    let done = RetainedEvent {
        anonymized: true,
        ..purged
    };
    assert_eq!(
        plan::event(&ctx(&policy, &holds, T0 + 100 * DAY), &done, &mut report),
        None
    );
}

#[test]
fn holds_keep_the_whole_row_and_are_reported() {
    let policy = policy();
    let now = T0 + 10 * DAY;
    let r = row(1, T0, T0);
    for (holds, id) in [
        (
            LegalHolds::from_holds(vec![hold("by-patient", Some("pt-7f3a"), None, None)]),
            "by-patient",
        ),
        (
            LegalHolds::from_holds(vec![hold("by-device", None, Some("dev-00001"), None)]),
            "by-device",
        ),
        (
            LegalHolds::from_holds(vec![hold("by-range", None, None, Some((T0, T0 + 1)))]),
            "by-range",
        ),
    ] {
        let mut report = Report::default();
        assert_eq!(
            plan::event(&ctx(&policy, &holds, now), &r, &mut report),
            None,
            "{id}"
        );
        assert!(report.holds_kept.contains(id), "{id}");
        assert!(report.acted.is_empty());
    }
    // Another patient's hold, another device's, a range elsewhere: due as usual.
    let holds = LegalHolds::from_holds(vec![
        hold("a", Some("pt-other"), None, None),
        hold("b", None, Some("dev-00002"), None),
        hold("c", None, None, Some((T0 + 1, T0 + 2))),
    ]);
    let mut report = Report::default();
    assert!(plan::event(&ctx(&policy, &holds, now), &r, &mut report).is_some());
}

#[test]
fn unconfirmed_rows_wait_and_archive_needs_the_copy() {
    let policy = policy();
    let holds = LegalHolds::none();
    let now = T0 + 10 * DAY;
    let mut c = ctx(&policy, &holds, now);
    c.sinks_through = Some(4);
    let mut report = Report::default();
    assert_eq!(plan::event(&c, &row(5, T0, T0), &mut report), None);
    assert_eq!(
        report.skipped[&("normalized".into(), "unconfirmed".into())],
        1
    );
    assert!(plan::event(&c, &row(4, T0, T0), &mut report).is_some());

    // Alerts wait for their handlers.
    c.handlers_through = Some(1);
    let alert = crate::store::RetainedAlert {
        position: 2,
        alert_id: "al-1".into(),
        state: "open".into(),
        topic: "alerts/site-01/high/dev-00001".into(),
        device: Some("dev-00001".into()),
        created_at_ms: T0,
        body: r#"{"patient_ref":"pt-7f3a"}"#.into(),
        patient_ref: Some("pt-7f3a".into()),
        erased: false,
        anonymized: false,
    };
    assert_eq!(
        plan::alert(&c, std::slice::from_ref(&alert), &mut report),
        vec![]
    );
    c.handlers_through = Some(2);
    assert_eq!(
        plan::alert(&c, std::slice::from_ref(&alert), &mut report),
        vec![StoreAct::DeleteAlert { position: 2 }]
    );
}

#[test]
fn objects_follow_their_day_purpose_and_holds() {
    let policy = policy();
    let holds = LegalHolds::none();
    let name = |n: &str| ObjectName::parse(n).expect(n);
    let raw = name(
        "pfx/raw/site=s1/device=dev-00001/date=2026-01-05/00000000000000000001-00000000000000000002.cborseq",
    );
    assert_eq!(raw.prefix, "pfx/");
    assert_eq!(raw.day_ms, T0);
    let mut report = Report::default();
    // The day's end is the instant: due a day after it, not a day after its start.
    assert_eq!(
        plan::object(
            &ctx(&policy, &holds, T0 + DAY),
            &raw,
            Purpose::Care,
            &mut report
        ),
        None
    );
    assert_eq!(
        plan::object(
            &ctx(&policy, &holds, T0 + 2 * DAY - 1),
            &raw,
            Purpose::Care,
            &mut report
        ),
        Some(ObjectAct::Delete)
    );
    // A research sink's normalized objects are archived after a day; a care sink's
    // would be anonymized after two, which objects do not support: reported.
    let research =
        name("normalized/date=2026-01-05/00000000000000000001-00000000000000000002.ndjson");
    let now = T0 + 3 * DAY;
    assert_eq!(
        plan::object(&ctx(&policy, &holds, now), &research, Purpose::Research, &mut report),
        Some(ObjectAct::Move(
            "archive/research/normalized/date=2026-01-05/00000000000000000001-00000000000000000002.ndjson".into()
        ))
    );
    assert_eq!(
        plan::object(
            &ctx(&policy, &holds, now),
            &research,
            Purpose::Care,
            &mut report
        ),
        None
    );
    assert_eq!(
        report.skipped[&("normalized".into(), "anonymize_unsupported".into())],
        1
    );
    assert!(plan::archived(&policy, "archive/research/normalized/x"));
    assert!(!plan::archived(&policy, "normalized/x"));
    // Holds: the device's partition, a day overlapping the range, any object for a
    // patient hold; another device's partition is not held.
    for h in [
        hold("d", None, Some("dev-00001"), None),
        hold("r", None, None, Some((T0 + DAY - 1, T0 + DAY))),
        hold("p", Some("pt-7f3a"), None, None),
    ] {
        let holds = LegalHolds::from_holds(vec![h]);
        assert_eq!(
            plan::object(&ctx(&policy, &holds, now), &raw, Purpose::Care, &mut report),
            None
        );
    }
    let holds = LegalHolds::from_holds(vec![hold("d", None, Some("dev-00002"), None)]);
    assert!(plan::object(&ctx(&policy, &holds, now), &raw, Purpose::Care, &mut report).is_some());
    // Audit segments: their component's plane.
    let admin = name(
        "audit/retention=x/component=admin/date=2026-01-05/00000000000000000001-00000000000000000002.jsonl",
    );
    assert_eq!(
        admin.plane,
        vitalmq_policies::Plane::Audit(vitalmq_policies::AuditLog::Admin)
    );
    assert!(matches!(
        plan::object(&ctx(&policy, &LegalHolds::none(), now), &admin, Purpose::Care, &mut report),
        Some(ObjectAct::Move(to)) if to.starts_with("archive/audit/audit/")
    ));
    assert!(
        ObjectName::parse("audit/retention=x/component=other/date=2026-01-05/a.jsonl").is_none()
    );
    assert!(ObjectName::parse("raw/site=s/device=d/no-date.cborseq").is_none());
}

/// A store with four events of dev-00001 and one of dev-00002 (positions 1..=5), an
/// alert and a quarantined message, aged as the test says.
fn store_with_events(dir: &Path) -> Store {
    let mut store = Store::open(dir).expect("open");
    store
        .commit(&Commit {
            events: vec![
                event("dev-00001", 1, 1),
                event("dev-00001", 1, 2),
                event("dev-00001", 1, 3),
                event("dev-00001", 1, 4),
                event("dev-00002", 1, 1),
            ],
            quarantine: vec![Quarantined {
                received_at_ms: T0,
                topic: "devices/dev-00001/telemetry".into(),
                device: Some("dev-00001".into()),
                reason: "bad_signature".into(),
                detail: String::new(),
                sha256_hex: String::new(),
                raw: bytes::Bytes::from_static(b"x"),
            }],
            alerts: vec![NewAlert {
                alert_id: "al-1".into(),
                state: "open".into(),
                kind: "clinical".into(),
                topic: "alerts/site-01/dev-00001".into(),
                device: Some("dev-00001".into()),
                rule: None,
                created_at_ms: T0,
                body: r#"{"alert_id":"al-1","patient_ref":"pt-7f3a","device":"dev-00001"}"#.into(),
                level: 0,
            }],
            ..Commit::default()
        })
        .expect("commit");
    store
}

fn job(dir: &Path, sinks: &[&str]) -> Job {
    Job {
        retention: dir.join("retention.toml"),
        holds: None,
        batch: 2,
        data_dir: dir.to_path_buf(),
        sinks: sinks.iter().map(|s| (*s).to_owned()).collect(),
        care_objects: Vec::new(),
        handlers: Vec::new(),
        objects: Vec::new(),
        keyring: None,
    }
}

/// With `[encryption]`: an anonymized event is sealed under no patient's key, so it
/// stays readable after the patient's erasure, and holds no plaintext at rest; an
/// erased patient's events that fall due for anonymization are deleted (nothing
/// readable is left to keep).
#[test]
fn anonymized_events_outlive_the_erasure_and_erased_ones_are_deleted_when_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kek = std::sync::Arc::new(
        vitalmq_keyring::LocalKeyFile::create(&dir.path().join("kek.json")).expect("kek"),
    );
    let keyring = std::sync::Arc::new(
        vitalmq_keyring::Keyring::open(&dir.path().join("keyring.sqlite3"), kek).expect("ring"),
    );
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(std::sync::Arc::clone(&keyring));
    store
        .commit(&Commit {
            events: vec![event("dev-00001", 1, 1), event("dev-00001", 1, 2)],
            ..Commit::default()
        })
        .expect("commit");
    let now = T0 + 10 * DAY;
    store.retime_event(1, now - 3 * DAY, now - 3 * DAY);
    store.retime_event(2, now, now);
    store.register_sink("objects").expect("sink");
    store.batch_delivered("objects", 2).expect("cursor");
    let (policy, holds) = (policy(), LegalHolds::none());
    let mut job = job(dir.path(), &["objects"]);
    job.keyring = Some(std::sync::Arc::clone(&keyring));
    run_store(&job, &mut store, &policy, &holds, now, false, None).expect("run");
    let one = store.retention_events(0, 10).expect("events")[0].clone();
    assert!(one.anonymized && one.patient_ref.is_none(), "{one:?}");

    keyring
        .erase(
            &vitalmq_keyring::Subject::new("pt-7f3a").expect("s"),
            "po",
            "test",
            1,
        )
        .expect("erase");
    let events = store.retention_events(0, 10).expect("events");
    assert!(
        events[0]
            .normalized
            .as_deref()
            .is_some_and(|j| j.contains("\"spo2\":97")),
        "the anonymized event is no longer the patient's: {:?}",
        events[0]
    );
    assert!(events[1].erased && events[1].normalized.is_none());
    let file = std::fs::read(dir.path().join(crate::store::DB_FILE)).expect("db");
    assert!(
        !file.windows(6).any(|w| w == b"\"spo2\""),
        "no plaintext reading at rest"
    );

    // Later, event 2 falls due for anonymization: it is erased, so it goes.
    let report = run_store(
        &job,
        &mut store,
        &policy,
        &holds,
        now + 3 * DAY,
        false,
        None,
    )
    .expect("run");
    assert_eq!(store.retention_events(0, 10).expect("events").len(), 1);
    assert_eq!(
        report.acted[&("normalized".into(), "delete_erased".into())].count,
        1,
        "{report:?}"
    );
}

#[test]
fn the_store_loses_what_is_due_and_keeps_what_is_held_or_unconfirmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = store_with_events(dir.path());
    // 1: three days old (anonymized); 2: 1.5 days (raw purged); 3: new (kept);
    // 4: three days old but past the sink's cursor (waits); 5: three days, held device.
    let now = T0 + DAY;
    for (position, age) in [
        (1, 3 * DAY),
        (2, DAY + DAY / 2),
        (3, 0),
        (4, 3 * DAY),
        (5, 3 * DAY),
    ] {
        store.retime_event(position, now - age, now - age);
    }
    store.register_sink("objects").expect("sink");
    store.batch_delivered("objects", 3).expect("cursor");
    let (policy, holds) = (
        policy(),
        LegalHolds::from_holds(vec![hold("lh-dev2", None, Some("dev-00002"), None)]),
    );
    let job = job(dir.path(), &["objects"]);
    let report = run_store(&job, &mut store, &policy, &holds, now, false, None).expect("run");

    let events = store.retention_events(0, 100).expect("events");
    let by_pos = |p: i64| events.iter().find(|e| e.position == p).expect("row");
    let one = by_pos(1);
    assert!(one.anonymized && one.device == crate::store::ANONYMIZED_DEVICE);
    let json = one.normalized.as_deref().expect("json");
    assert!(
        json.contains("\"spo2\":97") && !json.contains("pt-7f3a"),
        "{json}"
    );
    // Nothing of the message is left: not its bytes, nor who sent it, where, through
    // which broker, nor its hash (a lookup key back to device, epoch and seq).
    assert_eq!(
        store.raw_of(1),
        Some((
            0,
            String::new(),
            String::new(),
            String::new(),
            String::new()
        ))
    );
    let (bytes, publisher, topic, broker, sha256) = store.raw_of(2).expect("raw row");
    assert!(
        bytes == 0 && !publisher.is_empty() && !topic.is_empty(),
        "a purged raw row keeps its receipt metadata"
    );
    assert!(!broker.is_empty() && sha256.len() == 64);
    assert_eq!(
        store
            .event_detail(&crate::normalize::event_id(
                &vitalmq_envelope::DeviceId::new("dev-00001").expect("id"),
                1,
                1
            ))
            .expect("lookup"),
        None,
        "the old id no longer finds it"
    );
    let two = by_pos(2);
    assert!(
        !two.anonymized && !two.raw_present,
        "raw purged, event kept"
    );
    assert!(by_pos(3).raw_present && by_pos(4).raw_present && by_pos(5).raw_present);
    assert_eq!(
        report.skipped[&("normalized".into(), "unconfirmed".into())],
        1
    );
    assert_eq!(report.held["normalized"], 1);
    assert!(report.holds_kept.contains("lh-dev2"));
    // The alert and the quarantined message were a day old: deleted.
    assert_eq!(store.rows_in("alerts"), 0);
    assert_eq!(store.rows_in("quarantine"), 0);

    // A second run finds nothing more to do.
    let again = run_store(&job, &mut store, &policy, &holds, now, false, None).expect("rerun");
    assert!(again.acted.is_empty(), "{:?}", again.acted);
}

#[test]
fn a_run_stopped_after_a_batch_is_finished_by_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (policy, holds) = (policy(), LegalHolds::none());
    let tables = |store: &Store| {
        (
            store.rows_in("events"),
            store.rows_in("raw_messages"),
            store.retention_events(0, 100).expect("events"),
        )
    };
    let mut whole = {
        let d = dir.path().join("whole");
        let mut store = store_with_events(&d);
        for p in 1..=5 {
            store.retime_event(p, T0 - 3 * DAY, T0 - 3 * DAY);
        }
        run_store(&job(&d, &[]), &mut store, &policy, &holds, T0, false, None).expect("run");
        tables(&store)
    };
    let d = dir.path().join("stopped");
    let mut store = store_with_events(&d);
    for p in 1..=5 {
        store.retime_event(p, T0 - 3 * DAY, T0 - 3 * DAY);
    }
    // The hook panics after the first transaction, as a kill would stop the run.
    let hook: BatchHook = Arc::new(|n| assert!(n < 1, "stopped after batch {n}"));
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_store(
            &job(&d, &[]),
            &mut store,
            &policy,
            &holds,
            T0,
            false,
            Some(&hook),
        )
    }));
    assert!(stopped.is_err(), "the hook stopped the run");
    let half = store.retention_events(0, 100).expect("events");
    assert_eq!(
        half.iter().filter(|e| e.anonymized).count(),
        2,
        "one batch of two done"
    );
    run_store(&job(&d, &[]), &mut store, &policy, &holds, T0, false, None).expect("rerun");
    let mut finished = tables(&store);
    // Same rows (the anonymized ids are positions, so they compare equal).
    whole.2.iter_mut().for_each(|e| e.raw_id = 0);
    finished.2.iter_mut().for_each(|e| e.raw_id = 0);
    assert_eq!(finished, whole);
}

#[test]
fn a_dry_run_changes_nothing_and_reports_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = store_with_events(dir.path());
    for p in 1..=5 {
        store.retime_event(p, T0 - 3 * DAY, T0 - 3 * DAY);
    }
    let (policy, holds) = (policy(), LegalHolds::none());
    let before = store.retention_events(0, 100).expect("events");
    let dry = run_store(
        &job(dir.path(), &[]),
        &mut store,
        &policy,
        &holds,
        T0,
        true,
        None,
    )
    .expect("dry");
    assert_eq!(store.retention_events(0, 100).expect("events"), before);
    let real = run_store(
        &job(dir.path(), &[]),
        &mut store,
        &policy,
        &holds,
        T0,
        false,
        None,
    )
    .expect("run");
    assert_eq!(dry, real);
    assert_eq!(real.count("normalized", "anonymize"), 5);
}

const STEM: &str = "00000000000000000001-00000000000000000002";

#[tokio::test]
async fn objects_are_deleted_moved_or_kept_and_a_rerun_finishes_a_half_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = dir.path().join("objects");
    let sink = Arc::new(ObjectStoreSink::local("objects", &objects).expect("sink"));
    let old = "date=2026-01-01";
    let new = "date=2026-01-05";
    let names = [
        format!("raw/site=s1/device=dev-00001/{old}/{STEM}.cborseq"),
        format!("raw/site=s1/device=dev-00002/{old}/{STEM}.cborseq"),
        format!("raw/site=s1/device=dev-00001/{new}/{STEM}.cborseq"),
        // The day before: outside the hold's range (a hold keeps the audit segments of
        // its range, whoever they name).
        format!("audit/retention=x/component=admin/date=2025-12-31/{STEM}.jsonl"),
        format!("audit/retention=x/component=bridge/date=2025-12-31/{STEM}.jsonl"),
    ];
    for n in &names {
        sink.put_durable(n, bytes::Bytes::from(n.clone()))
            .await
            .expect("put");
    }
    // A half move from an earlier run: the copy is there, the original too.
    sink.put_durable(
        &format!("archive/audit/{}", names[3]),
        bytes::Bytes::from(names[3].clone()),
    )
    .await
    .expect("put");
    std::fs::write(dir.path().join("retention.toml"), POLICY).expect("policy");
    std::fs::write(
        dir.path().join("holds.toml"),
        "format = \"vitalmq-holds/v1\"\n[[holds]]\nid = \"lh-2\"\nreason = \"recall\"\n\
         placed_by = \"po-1\"\nplaced_at = \"2026-01-01T00:00:00Z\"\ndevice = \"dev-00002\"\n\
         from = \"2026-01-01T12:00:00Z\"\nto = \"2026-01-01T13:00:00Z\"\n",
    )
    .expect("holds");
    let mut job = job(dir.path(), &[]);
    job.holds = Some(dir.path().join("holds.toml"));
    job.objects = vec![ObjectsTarget {
        sink: Arc::clone(&sink),
        purpose: Purpose::Care,
    }];
    Store::open(dir.path()).expect("store");

    let dry = run_once(&job, T0 + DAY, true, None).await.expect("dry run");
    assert_eq!(
        sink.list_objects("").await.expect("list").len(),
        names.len() + 1,
        "dry: untouched"
    );
    let outcome = run_once(&job, T0 + DAY, false, None).await.expect("run");
    assert_eq!(dry.report, outcome.report);
    let left = sink.list_objects("").await.expect("list");
    assert_eq!(
        left,
        vec![
            format!("archive/audit/{}", names[3]),
            names[2].clone(),
            names[1].clone(),
        ],
        "old raw of dev-00001 and the bridge segment deleted, the admin segment moved, \
         the held device and the new day kept"
    );
    let r = &outcome.report;
    assert_eq!(r.count("raw", "delete"), 1);
    assert_eq!(r.count("audit:bridge", "delete"), 1);
    assert_eq!(r.count("audit:admin", "archive"), 1);
    assert_eq!(r.held["raw"], 1);
    assert!(r.holds_kept.contains("lh-2"));
    assert_eq!(r.objects.len(), 3);
    let record = outcome.record();
    assert_eq!(record.event, vitalmq_audit::Event::RetentionRun);
    assert_eq!(record.details["objects"]["count"], serde_json::json!(3));
    assert_eq!(record.details["dry_run"], serde_json::json!(false));
    assert_eq!(
        record.policy_sha256.as_deref(),
        Some(outcome.policy_sha256.as_str())
    );
    assert!(!outcome.holds_sha256.is_empty());
    // Nothing left to do.
    let again = run_once(&job, T0 + DAY, false, None).await.expect("rerun");
    assert!(again.report.acted.is_empty() && again.report.objects.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_schedule_runs_every_period_on_the_injected_clock_and_audits_each_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("retention.toml"), POLICY).expect("policy");
    let store = store_with_events(dir.path());
    for p in 1..=5 {
        store.retime_event(p, T0 - 3 * DAY, T0 - 3 * DAY);
    }
    drop(store);
    let log_path = dir.path().join("audit.jsonl");
    let log = vitalmq_audit::AuditLog::open(&log_path, 64).expect("audit log");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&runs);
    let clock = move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        T0
    };
    let task = tokio::spawn(schedule(
        job(dir.path(), &[]),
        Duration::from_secs(3600),
        clock,
        log.auditor(),
        stop_rx,
    ));
    let records = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"retention_run\""))
            .count()
    };
    // The first run at once, the next an hour later (the paused clock jumps there).
    for want in 1..=2 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600 + 60);
        while runs.load(std::sync::atomic::Ordering::SeqCst) < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {want} did not happen"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    stop_tx.send(true).expect("stop");
    task.await.expect("schedule ends");
    log.close().expect("close");
    assert!(records() >= 2, "each run audited");
    let store = Store::open(dir.path()).expect("open");
    assert_eq!(
        store
            .retention_events(0, 100)
            .expect("events")
            .iter()
            .filter(|e| e.anonymized)
            .count(),
        5
    );
}

/// [`POLICY`] with the clinical plane anonymized after a day.
fn anonymizing_alerts() -> RetentionPolicy {
    let text = POLICY.replace(
        "[planes.clinical]\nkeep_for = \"1day\"\naction = \"delete\"",
        "[planes.clinical]\nkeep_for = \"1day\"\naction = \"anonymize\"",
    );
    assert_ne!(text, POLICY);
    RetentionPolicy::parse(&text, Path::new("retention.toml")).expect("policy")
}

/// One state change of a clinical alert of `patient` on dev-00001.
fn clinical(alert_id: &str, state: &str, patient: &str, at: u64) -> NewAlert {
    let body = serde_json::json!({
        "alert_id": alert_id, "kind": "clinical", "state": state, "severity": "high",
        "rule": "spo2-low", "rule_version": "1", "policy_sha256": "ab",
        "device": "dev-00001", "site": "site-01", "patient_ref": patient,
        "metric": "spo2", "value": 84, "threshold": 85, "window_s": 30,
        "evidence": ["ev1-0011"], "fw": "1.0.0", "model": "w1",
        "raised_at": crate::normalize::rfc3339_ms(at).expect("time"),
        "measure": "value", "measured": 84
    });
    NewAlert {
        alert_id: alert_id.into(),
        state: state.into(),
        kind: "clinical".into(),
        topic: "alerts/site-01/high/dev-00001".into(),
        device: Some("dev-00001".into()),
        rule: Some("spo2-low".into()),
        created_at_ms: at,
        body: body.to_string(),
        level: 0,
    }
}

fn keyring_in(dir: &Path) -> Arc<vitalmq_keyring::Keyring> {
    let kek = Arc::new(vitalmq_keyring::LocalKeyFile::create(&dir.join("kek.json")).expect("kek"));
    Arc::new(vitalmq_keyring::Keyring::open(&dir.join("keyring.sqlite3"), kek).expect("ring"))
}

/// All states of an alert are anonymized together, once the last is due and none is
/// held, under one new id (sealed under that id, so readers open it), with the topic's
/// device level, the device and patient columns, the exact times and the device
/// details gone; an erased patient's alert is deleted when it falls due.
#[test]
fn an_alert_is_anonymized_whole_once_its_last_state_is_due_and_an_erased_one_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keyring = keyring_in(dir.path());
    let mut store = Store::open(dir.path())
        .expect("open")
        .with_keyring(Arc::clone(&keyring));
    let (p, erased) = ("pt-7f3a", "pt-9e9e");
    let min = 60_000;
    store
        .commit(&Commit {
            alerts: vec![
                clinical("al-1", "open", p, T0 + 10 * min + 123),
                clinical("al-2", "open", p, T0 + 5 * min),
                clinical("al-1", "escalated", p, T0 + 125 * min),
                clinical("al-3", "open", erased, T0),
                clinical("al-3", "resolved", erased, T0 + min),
                clinical("al-1", "resolved", p, T0 + DAY),
                clinical("al-2", "resolved", p, T0 + 6 * min),
                // Still open: its later states would carry its old id; it waits.
                clinical("al-4", "open", p, T0),
            ],
            ..Commit::default()
        })
        .expect("commit");
    keyring
        .erase(
            &vitalmq_keyring::Subject::new(erased).expect("s"),
            "po",
            "test",
            1,
        )
        .expect("erase");
    let policy = anonymizing_alerts();
    let job = job(dir.path(), &[]);
    let none = LegalHolds::none();
    let alerts = |store: &Store| store.list_alerts().expect("alerts");

    // al-1's first states are due, its last is not: it waits whole. al-2 is anonymized,
    // al-3 (erased) deleted.
    let report = run_store(
        &job,
        &mut store,
        &policy,
        &none,
        T0 + DAY + DAY / 2,
        false,
        None,
    )
    .expect("run");
    assert_eq!(report.count("clinical", "anonymize"), 2, "{report:?}");
    assert_eq!(report.count("clinical", "delete_erased"), 2, "{report:?}");
    assert_eq!(
        report.skipped[&("clinical".into(), "open".into())],
        1,
        "{report:?}"
    );
    let rows = alerts(&store);
    let ids: Vec<&str> = rows.iter().map(|a| a.alert_id.as_str()).collect();
    assert_eq!(ids, ["al-1", "anon-a2", "al-1", "al-1", "anon-a2", "al-4"]);
    assert!(rows[0].body.contains(p), "al-1 untouched");

    // A hold on the escalation's instant keeps the whole alert.
    let held = LegalHolds::from_holds(vec![hold(
        "lh-t",
        None,
        None,
        Some((T0 + 125 * min, T0 + 126 * min)),
    )]);
    let now = T0 + 2 * DAY;
    let report = run_store(&job, &mut store, &policy, &held, now, false, None).expect("run");
    assert!(report.acted.is_empty(), "{report:?}");
    assert_eq!(report.held["clinical"], 1);
    assert_eq!(alerts(&store)[0].alert_id, "al-1");

    // Without it, all three states go at once, under the first state's position.
    let report = run_store(&job, &mut store, &policy, &none, now, false, None).expect("run");
    assert_eq!(report.count("clinical", "anonymize"), 3, "{report:?}");
    let rows = alerts(&store);
    let al1: Vec<_> = rows.iter().filter(|a| a.alert_id == "anon-a1").collect();
    assert_eq!(al1.len(), 3, "{rows:?}");
    assert_eq!(
        al1.iter().map(|a| a.created_at_ms).collect::<Vec<_>>(),
        [T0, T0 + 2 * 60 * min, T0 + DAY],
        "creation times to the hour"
    );
    for a in &al1 {
        assert_eq!(a.topic, "alerts/site-01/high");
        assert!(a.device.is_none());
        let body: serde_json::Value =
            serde_json::from_str(&a.body).expect("opens under its new id");
        assert_eq!(body["alert_id"], "anon-a1");
        assert_eq!(body["value"], 84);
        for gone in ["patient_ref", "device", "evidence", "fw", "model"] {
            assert!(body.get(gone).is_none(), "{gone}: {body}");
        }
        assert!(
            !a.body.contains("al-1") && !a.body.contains(p),
            "{}",
            a.body
        );
    }
    let raised: Vec<_> = al1
        .iter()
        .map(|a| {
            serde_json::from_str::<serde_json::Value>(&a.body).expect("json")["raised_at"].clone()
        })
        .collect();
    assert_eq!(
        raised,
        [
            "2026-01-05T00:00:00Z",
            "2026-01-05T02:00:00Z",
            "2026-01-06T00:00:00Z"
        ]
    );
    let retained = store.retention_alerts(0, 100).expect("page");
    assert!(
        retained
            .alerts
            .iter()
            .flatten()
            .filter(|a| a.alert_id != "al-4")
            .all(|a| a.anonymized && a.patient_ref.is_none() && !a.erased),
        "{retained:?}"
    );
    // Nothing left to do, and the anonymized alerts outlive the patient's erasure.
    keyring
        .erase(
            &vitalmq_keyring::Subject::new(p).expect("s"),
            "po",
            "test",
            2,
        )
        .expect("erase");
    let again = run_store(
        &job,
        &mut store,
        &policy,
        &none,
        now + 100 * DAY,
        false,
        None,
    )
    .expect("rerun");
    // Only the open al-4, now its patient's erased husk, goes.
    assert_eq!(again.acted.len(), 1, "{again:?}");
    assert_eq!(again.count("clinical", "delete_erased"), 1, "{again:?}");
    assert!(alerts(&store).iter().all(|a| !a.body.is_empty()));
}

/// With `secure_delete`, what retention deletes is not left in the file's free pages.
#[test]
fn deleted_rows_leave_nothing_in_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = b"QUARANTINED-SECRET-0123456789";
    let raw: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(20 * marker.len())
        .collect();
    let mut store = Store::open(dir.path()).expect("open");
    store
        .commit(&Commit {
            quarantine: vec![Quarantined {
                received_at_ms: T0,
                topic: "devices/dev-00001/telemetry".into(),
                device: Some("dev-00001".into()),
                reason: "bad_signature".into(),
                detail: String::new(),
                sha256_hex: String::new(),
                raw: bytes::Bytes::from(raw),
            }],
            ..Commit::default()
        })
        .expect("commit");
    let in_file = |dir: &Path| {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(crate::store::DB_FILE)
            })
            .any(|e| {
                std::fs::read(e.path())
                    .unwrap_or_default()
                    .windows(marker.len())
                    .any(|w| w == marker)
            })
    };
    drop(store);
    assert!(in_file(dir.path()), "the marker is in the file before");
    let mut store = Store::open(dir.path()).expect("open");
    let report = run_store(
        &job(dir.path(), &[]),
        &mut store,
        &policy(),
        &LegalHolds::none(),
        T0 + 2 * DAY,
        false,
        None,
    )
    .expect("run");
    assert_eq!(report.count("quarantine", "delete"), 1);
    drop(store);
    assert!(
        !in_file(dir.path()),
        "the deleted row left its bytes in the file"
    );
}

/// A patient hold without a range keeps every object; the run says how many.
#[test]
fn objects_kept_only_by_a_patient_hold_without_range_are_counted() {
    let policy = policy();
    let raw = ObjectName::parse(&format!(
        "raw/site=s1/device=dev-00001/date=2026-01-05/{STEM}.cborseq"
    ))
    .expect("name");
    let now = T0 + 10 * DAY;
    let patient = hold("p", Some("pt-7f3a"), None, None);
    let mut report = Report::default();
    let holds = LegalHolds::from_holds(vec![patient.clone()]);
    assert_eq!(
        plan::object(&ctx(&policy, &holds, now), &raw, Purpose::Care, &mut report),
        None
    );
    assert_eq!(report.patient_hold_without_range, 1);
    assert_eq!(
        report.details("", now, false)["held_by_patient_hold_without_range"],
        serde_json::json!(1)
    );
    // Kept by a device hold as well: that one is named, not counted.
    let holds = LegalHolds::from_holds(vec![patient, hold("d", None, Some("dev-00001"), None)]);
    let mut report = Report::default();
    assert_eq!(
        plan::object(&ctx(&policy, &holds, now), &raw, Purpose::Care, &mut report),
        None
    );
    assert_eq!(report.patient_hold_without_range, 0);
    assert!(report.holds_kept.contains("d"));
    // A patient hold with a range keeps only the objects of its range: not counted.
    let holds = LegalHolds::from_holds(vec![hold("pr", Some("pt-7f3a"), None, Some((T0, T0 + 1)))]);
    let mut report = Report::default();
    plan::object(&ctx(&policy, &holds, now), &raw, Purpose::Care, &mut report);
    assert_eq!(report.patient_hold_without_range, 0);
    assert_eq!(report.held["raw"], 1);
}

/// A named holds file that does not exist yet is made, holding no hold (a missing one
/// fails closed: no run, no erasure); an existing one is left as it is.
#[test]
fn a_missing_holds_file_is_made_empty_and_an_existing_one_kept() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("governance").join("holds.toml");
    super::create_empty_holds(&path).expect("made");
    let holds = LegalHolds::load(&path).expect("loads");
    assert!(holds.holds().is_empty());
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::write(&path, "format = \"vitalmq-holds/v1\"\n# kept\n").expect("write");
    super::create_empty_holds(&path).expect("kept");
    assert!(
        std::fs::read_to_string(&path)
            .expect("read")
            .contains("# kept")
    );
}

/// Object names are read from their last kind segment, as the sealing context is: a
/// sink prefix holding one (`vm/raw`) does not shift the name.
#[test]
fn an_object_name_under_a_prefix_naming_a_kind_parses_from_the_last_kind() {
    let name = plan::ObjectName::parse(
        "vm/raw/normalized/site=site-01/device=dev-00001/date=2026-01-05/00000000000000000001-00000000000000000002-00000000000000000001.ndjson.vmqs",
    )
    .expect("parses");
    assert_eq!(name.prefix, "vm/raw/");
    assert!(
        name.relative.starts_with("normalized/site=site-01/"),
        "{}",
        name.relative
    );
}
