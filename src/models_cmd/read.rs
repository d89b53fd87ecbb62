//! What `vitalmq models compare` reads from the store: the score rows of the model's
//! two versions and its score alerts in the period, selected in SQL before any payload
//! is opened (only what is compared is opened). Rows of an erased patient are counted
//! and left out; a sealed row this process cannot open stops the comparison: read as
//! "unknown" it would pair as agreement, and its alerts would go uncounted.

use anyhow::Context as _;
use serde_json::Value as Json;
use vitalmq_bridge::store::{Payload, Store, StoredScore};

use super::compare::{AlertIn, ScoreIn};

/// The alert rules a score raises (`bridge/src/score/alert.rs`).
const SCORE_RULES: [&str; 2] = ["news2-medium", "news2-high"];

const LOCKED: &str = "score or alert payloads in the period are sealed and no key here \
    opens them: give the [encryption] key file of the bridge that wrote them";

#[derive(Debug, Default)]
pub struct Read {
    pub scores: Vec<ScoreIn>,
    pub alerts: Vec<AlertIn>,
    /// Score rows of an erased patient (not compared).
    pub erased_rows: u64,
    /// Alert rows of an erased patient (not counted).
    pub erased_alert_rows: u64,
}

/// The rows of `model` at `versions` recorded (bridge clock) in `[since, until)`.
pub fn rows(
    store: &Store,
    model: &str,
    versions: [&str; 2],
    period: (Option<u64>, Option<u64>),
) -> anyhow::Result<Read> {
    let mut out = Read::default();
    let mut after = 0;
    loop {
        let page = store.scores_of(model, versions, period, after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for s in page {
            let p: Json = match &s.payload {
                Payload::Plain(b) => serde_json::from_slice(b)
                    .with_context(|| format!("score {}: payload is not JSON", s.score_id))?,
                Payload::Erased { .. } => {
                    out.erased_rows += 1;
                    continue;
                }
                Payload::Locked => anyhow::bail!(LOCKED),
            };
            out.scores.push(score_in(s, &p));
        }
    }
    for a in store.alerts_of_rules(&SCORE_RULES, period.0, period.1)? {
        if a.marks.sealed {
            anyhow::bail!(LOCKED);
        }
        if a.marks.erased {
            out.erased_alert_rows += 1;
            continue;
        }
        let b: Json = serde_json::from_str(&a.body)
            .with_context(|| format!("alert {}: body is not JSON", a.alert_id))?;
        let text = |k: &str| b.get(k).and_then(Json::as_str).map(str::to_owned);
        if text("source").as_deref() != Some("score") || text("metric").as_deref() != Some(model) {
            continue;
        }
        let Some(version) = text("rule_version") else {
            continue;
        };
        if !versions.contains(&version.as_str()) {
            continue;
        }
        out.alerts.push(AlertIn {
            alert_id: a.alert_id,
            state: a.state,
            rule: a.rule.unwrap_or_default(),
            version,
            patient: text("patient_ref"),
            reason: text("reason"),
            score_id: text("score_id"),
            created_at_ms: a.created_at_ms,
        });
    }
    Ok(out)
}

/// A score row as compare takes it; `p` is its opened payload.
fn score_in(s: StoredScore, p: &Json) -> ScoreIn {
    let text = |v: &Json, k: &str| v.get(k).and_then(Json::as_str).map(str::to_owned);
    let shadow_alert = p.get("alert").and_then(|a| {
        Some((
            text(a, "rule")?,
            text(a, "transition")?,
            text(a, "replaces"),
        ))
    });
    // The trigger's readings: the inputs observed at the score's own time (one
    // formatter writes both, so equal instants are equal strings).
    let at = text(p, "observed_at");
    let mut trigger_inputs: Vec<String> = p
        .get("inputs")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|i| at.is_some() && text(i, "observed_at") == at)
        .filter_map(|i| text(i, "event_id"))
        .collect();
    trigger_inputs.sort_unstable();
    trigger_inputs.dedup();
    ScoreIn {
        score_id: s.score_id,
        patient: s.patient_ref,
        device: s.device,
        version: s.version,
        role: s.role,
        observed_at_ms: s.observed_at_ms,
        trigger_inputs,
        risk: text(p, "risk"),
        shadow_alert,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use vitalmq_bridge::NewScore;
    use vitalmq_bridge::store::{Commit, NewAlert};
    use vitalmq_keyring::{Keyring, LocalKeyFile, Subject};

    use super::*;

    const T0: u64 = 1_794_787_200_000;

    fn score(n: u64, patient: &str, version: &str, created: u64) -> NewScore {
        let score_id = format!("sc-{version}-{patient}-{n}");
        NewScore {
            score_id: score_id.clone(),
            patient_ref: patient.into(),
            site: "site-01".into(),
            device: "dev-a".into(),
            model: "news2".into(),
            version: version.into(),
            config_sha256: "ab".repeat(32),
            role: "live".into(),
            observed_at_ms: T0 + n,
            created_at_ms: created,
            payload: json!({"format": "vitalmq-score/v1", "score_id": score_id,
                "patient_ref": patient, "observed_at": "2026-11-17T00:00:00.000Z",
                "risk": "low", "inputs": [
                    {"metric": "spo2", "event_id": format!("ev-{n}"),
                     "observed_at": "2026-11-17T00:00:00.000Z"},
                    {"metric": "temp", "event_id": "ev-old",
                     "observed_at": "2026-11-16T23:00:00.000Z"}]})
            .to_string(),
        }
    }

    fn alert(id: &str, patient: &str, version: &str, created: u64) -> NewAlert {
        NewAlert {
            alert_id: id.into(),
            state: "open".into(),
            kind: "clinical".into(),
            topic: "alerts/site-01/review/dev-a".into(),
            device: Some("dev-a".into()),
            rule: Some("news2-medium".into()),
            created_at_ms: created,
            body: json!({"alert_id": id, "state": "open", "rule": "news2-medium",
                "rule_version": version, "metric": "news2", "source": "score",
                "patient_ref": patient, "score_id": null})
            .to_string(),
            level: 0,
        }
    }

    #[test]
    fn erased_rows_are_counted_sealed_rows_without_a_key_refuse_and_the_period_is_sql() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        let keyring = Arc::new(
            Keyring::open(
                &data.join("keyring.sqlite3"),
                Arc::new(LocalKeyFile::create(&tmp.path().join("kek.json")).expect("kek")),
            )
            .expect("keyring"),
        );
        let mut store = Store::open(&data)
            .expect("store")
            .with_keyring(keyring.clone());
        let mut scores = Vec::new();
        for p in ["pt-a", "pt-b"] {
            for v in ["v1", "v2", "v3"] {
                scores.push(score(1, p, v, T0 + 10));
            }
            // Outside the period: never opened nor counted.
            scores.push(score(2, p, "v1", T0 + 1_000));
        }
        store
            .commit(&Commit {
                scores,
                alerts: vec![
                    alert("al-a", "pt-a", "v1", T0 + 10),
                    alert("al-b", "pt-b", "v1", T0 + 10),
                    alert("al-late", "pt-a", "v1", T0 + 1_000),
                ],
                now_ms: T0 + 1_000,
                ..Commit::default()
            })
            .expect("commit");
        keyring
            .erase(&Subject::new("pt-b").expect("subject"), "test", "test", T0)
            .expect("erase");
        let period = (Some(T0), Some(T0 + 100));
        let r = rows(&store, "news2", ["v1", "v2"], period).expect("read");
        assert_eq!(r.scores.len(), 2, "pt-a at v1 and v2 only");
        assert_eq!((r.erased_rows, r.erased_alert_rows), (2, 1));
        assert_eq!(r.alerts.len(), 1);
        assert_eq!(r.alerts[0].patient.as_deref(), Some("pt-a"));
        assert_eq!(r.scores[0].trigger_inputs, vec!["ev-1".to_owned()]);
        drop(store);
        // The same store without its keyring: refused, not read as "unknown".
        let store = Store::open(&data).expect("store");
        let err = rows(&store, "news2", ["v1", "v2"], period).expect_err("sealed");
        assert!(err.to_string().contains("sealed"), "{err:#}");
    }
}
