//! Reading a FHIR server's answer to a transaction (R4 `Bundle.type =
//! transaction-response`): confirmed only when every entry was created (201) or
//! already existed (200, the `ifNoneExist` match).

use serde::Deserialize;

use super::FhirFailure;

#[derive(Deserialize)]
struct Response {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: String,
}

/// `Ok` when `body` is a transaction-response with `sent` entries, each 2xx.
pub fn check(body: &[u8], sent: usize) -> Result<(), FhirFailure> {
    let r: Response = serde_json::from_slice(body)
        .map_err(|e| FhirFailure::Response(format!("not a Bundle: {e}")))?;
    if r.resource_type != "Bundle" || r.kind != "transaction-response" {
        return Err(FhirFailure::Response(format!(
            "{} of type {:?}, expected a transaction-response Bundle",
            r.resource_type, r.kind
        )));
    }
    if r.entry.len() != sent {
        return Err(FhirFailure::Response(format!(
            "{} entries answered, {sent} sent",
            r.entry.len()
        )));
    }
    for (index, e) in r.entry.iter().enumerate() {
        let status = e.response.as_ref().map_or("", |r| r.status.as_str());
        // "201 Created", "200 OK", or just the code.
        if !status.starts_with('2') {
            return Err(FhirFailure::Entry {
                index,
                status: status.chars().take(40).collect(),
            });
        }
    }
    Ok(())
}

/// What an OperationOutcome says, short, for logs, audit and alerts: each issue's
/// severity, code and `expression` (where), at most 400 characters. Never its
/// `diagnostics`: a validator may quote the offending value there, a patient value.
pub fn outcome_summary(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return "no OperationOutcome".to_owned();
    };
    let issues = v["issue"].as_array().cloned().unwrap_or_default();
    let text = issues
        .iter()
        .map(|i| {
            let at = i["expression"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            format!(
                "{} {} at {}",
                i["severity"].as_str().unwrap_or("?"),
                i["code"].as_str().unwrap_or("?"),
                if at.is_empty() { "?" } else { &at }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    text.chars().take(400).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(statuses: &[&str]) -> Vec<u8> {
        let entries: Vec<_> = statuses
            .iter()
            .map(|s| serde_json::json!({"response": {"status": s}}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "resourceType": "Bundle", "type": "transaction-response", "entry": entries
        }))
        .expect("json")
    }

    #[test]
    fn created_or_existing_entries_confirm_the_batch() {
        assert!(check(&answer(&["201 Created", "200 OK", "201"]), 3).is_ok());
    }

    #[test]
    fn a_failed_entry_a_short_answer_or_another_bundle_do_not() {
        assert!(matches!(
            check(&answer(&["201 Created", "409 Conflict"]), 2),
            Err(FhirFailure::Entry { index: 1, .. })
        ));
        assert!(matches!(
            check(&answer(&["201 Created"]), 2),
            Err(FhirFailure::Response(_))
        ));
        let batch = br#"{"resourceType":"Bundle","type":"batch-response","entry":[]}"#;
        assert!(matches!(check(batch, 0), Err(FhirFailure::Response(_))));
        assert!(matches!(check(b"<html>", 0), Err(FhirFailure::Response(_))));
        let missing = br#"{"resourceType":"Bundle","type":"transaction-response","entry":[{}]}"#;
        assert!(matches!(
            check(missing, 1),
            Err(FhirFailure::Entry { index: 0, .. })
        ));
    }

    #[test]
    fn an_operation_outcome_is_summarised() {
        let oo = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","expression":["Bundle.entry[3].resource"],"diagnostics":"valueQuantity.value: input_value=97"}]}"#;
        let summary = outcome_summary(oo);
        assert_eq!(summary, "error invalid at Bundle.entry[3].resource");
        assert!(!summary.contains("97"), "never the diagnostics' values");
    }
}
