//! Deterministic ids derived from what they name, so that evaluating the same events
//! again (a batch the store could not take, a restart) gives the same ids and the
//! store keeps each row once: `<prefix>-` + the first 32 hex digits of
//! SHA-256(`domain` 0x00 part 0x00 part ... part). The domain names the kind and
//! version of the id, so ids of different kinds never collide.

use sha2::{Digest as _, Sha256};

/// The id of `parts` in `domain` (see the module documentation).
pub fn derived_id(prefix: &str, domain: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    for part in parts {
        h.update([0]);
        h.update(part.as_bytes());
    }
    format!("{prefix}-{}", hex::encode(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use vitalmq_envelope::DeviceId;

    /// The ids every kind of row already stored carries: pinned against an
    /// independent computation (Python's hashlib), so a change of the derivation
    /// cannot pass unnoticed.
    #[test]
    fn ids_are_the_ones_already_stored() {
        let dev = DeviceId::new("dev-00001").expect("id");
        assert_eq!(
            crate::alerts::alert_id(&dev, "spo2-low", "ev1-abc"),
            "al-f94b5220baed72450d49df724d402f5a"
        );
        assert_eq!(
            crate::score::row::score_id("pt-1", "news2", "rcp-2017.1", "ev1-abc"),
            "sc-8f748d1a714b86c7bbaaeb9bce5721b4"
        );
        assert_eq!(
            crate::score::row::alert_id("pt-1", "rcp-2017.1", "news2-high", "ev1-abc"),
            "al-0024c4a4747f36d488288697f2c5fe7b"
        );
        assert_eq!(
            crate::store::shadow_change_id("2025-07-01.1", "al-x", "open", "ev1-abc"),
            "sa-24d6500c6c336704cc23550a72f80d97"
        );
    }
}
