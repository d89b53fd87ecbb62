//! Attribution by observation time (issue 19, point 1): a reading belongs to the patient
//! and site of the assignment whose period contains its `observed_at`, not to whatever
//! the device serves when the bridge gets round to it. A reading observed before a
//! reassignment but processed after it stays with the earlier patient.
//!
//! Pure: the registry's history in, the entry the event and its alerts are built from
//! out, or the refusal (`unassigned`) when no assignment covers the instant.

use std::borrow::Cow;

use vitalmq_envelope::{ReasonClass, Refusal};
use vitalmq_policies::{DeviceEntry, DeviceRegistry, UnixMillis, Use};

use crate::normalize::rfc3339_ms;

/// The device entry as it stood at `observed_at_ms`: `entry` with the `patient_ref` and
/// `site` of the assignment covering that instant (borrowed when they are the entry's
/// own, which is the common case), or an `unassigned` refusal naming why.
///
/// The refusal's detail names instants and the device's state, never the patient.
pub fn attribute<'a>(
    registry: &DeviceRegistry,
    entry: &'a DeviceEntry,
    observed_at_ms: UnixMillis,
) -> Result<Cow<'a, DeviceEntry>, Refusal> {
    let at = || rfc3339_ms(observed_at_ms).unwrap_or_else(|| format!("{observed_at_ms} ms"));
    match registry
        .assignment_at(&entry.id, observed_at_ms)
        .map(|a| &a.serves)
    {
        Some(Use::Assigned { patient_ref, site }) => {
            if *patient_ref == entry.patient_ref && *site == entry.site {
                Ok(Cow::Borrowed(entry))
            } else {
                Ok(Cow::Owned(DeviceEntry {
                    patient_ref: patient_ref.clone(),
                    site: site.clone(),
                    ..entry.clone()
                }))
            }
        }
        Some(Use::Retired) => Err(Refusal::new(
            ReasonClass::Unassigned,
            format!("observed at {} while the device was retired", at()),
        )),
        None => Err(Refusal::new(
            ReasonClass::Unassigned,
            format!(
                "observed at {}, when no assignment of the device covers",
                at()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vitalmq_envelope::{Algorithm, DeviceId, SigningKey};

    use super::*;

    const T_SWITCH: u64 = 1_750_000_000_000;

    /// `dev-1` worn by `pt-a` on `north` until `T_SWITCH`, then by `pt-b` on `south`.
    fn reassigned() -> DeviceRegistry {
        let key = SigningKey::generate(Algorithm::EdDsa)
            .expect("key")
            .verifying_key();
        let text = format!(
            r#"format = "vitalmq-registry/v2"
trust_domain = "test.vitalmq"
[[devices]]
id = "dev-1"
alg = "EdDSA"
public_key = "{}"
[[devices.assignments]]
valid_from = "2025-01-01T00:00:00Z"
valid_to = "{}"
patient_ref = "pt-a"
site = "north"
[[devices.assignments]]
valid_from = "{}"
patient_ref = "pt-b"
site = "south"
"#,
            key.to_hex(),
            rfc3339_ms(T_SWITCH).expect("in range"),
            rfc3339_ms(T_SWITCH).expect("in range"),
        );
        DeviceRegistry::parse(&text, Path::new("registry.toml")).expect("valid registry")
    }

    fn dev() -> DeviceId {
        DeviceId::new("dev-1").expect("id")
    }

    #[test]
    fn a_reading_observed_before_a_reassignment_stays_with_the_earlier_patient() {
        let registry = reassigned();
        let entry = registry.device(&dev()).expect("registered");
        // The registry's current fields are the later assignment's...
        assert_eq!(entry.patient_ref, "pt-b");
        // ...but a reading observed a second before the switch, processed after it,
        // belongs to the earlier patient and site.
        let before = attribute(&registry, entry, T_SWITCH - 1_000).expect("assigned");
        assert_eq!(before.patient_ref, "pt-a");
        assert_eq!(before.site.as_str(), "north");
        assert_eq!(before.key, entry.key);
        let after = attribute(&registry, entry, T_SWITCH).expect("assigned");
        assert_eq!(after.patient_ref, "pt-b");
        assert_eq!(after.site.as_str(), "south");
        assert!(matches!(after, Cow::Borrowed(_)));
    }

    #[test]
    fn a_reading_no_assignment_covers_is_refused_as_unassigned() {
        let mut registry = reassigned();
        let entry = registry.device(&dev()).expect("registered").clone();
        let early = attribute(&registry, &entry, 1_000).expect_err("before any assignment");
        assert_eq!(early.reason, ReasonClass::Unassigned);
        assert!(
            early.detail.contains("1970-01-01T00:00:01Z"),
            "{}",
            early.detail
        );
        assert!(!early.detail.contains("pt-"), "no patient in the detail");

        let retire_at = T_SWITCH + 60_000;
        registry
            .change_history(&dev(), |h| h.retire(retire_at))
            .expect("retired");
        let retired = attribute(&registry, &entry, retire_at + 1).expect_err("retired");
        assert_eq!(retired.reason, ReasonClass::Unassigned);
        assert!(retired.detail.contains("retired"), "{}", retired.detail);
        // Readings from before the retirement are still the later patient's.
        let still = attribute(&registry, &entry, retire_at - 1).expect("assigned");
        assert_eq!(still.patient_ref, "pt-b");
    }
}
