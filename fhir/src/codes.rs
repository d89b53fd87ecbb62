//! The measurements SPEC section 3 lists, with their LOINC codes, UCUM units and the
//! FHIR R4 vital-signs profile each conforms to (reasons in `docs/fhir.md`).

/// LOINC's code system URI.
pub const LOINC: &str = "http://loinc.org";
/// UCUM's code system URI.
pub const UCUM: &str = "http://unitsofmeasure.org";
/// Observation category code system (`vital-signs`).
pub const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
/// Why a value is absent.
pub const DATA_ABSENT: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";
/// Metric names a device sends that SPEC does not list (mapped without a profile).
pub const METRIC: &str = "urn:vitalmq:metric";

/// One LOINC coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loinc {
    pub code: &'static str,
    pub display: &'static str,
}

/// One measurement's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vital {
    /// The key in the payload's `m`.
    pub metric: &'static str,
    /// The codings of `Observation.code`, the first the primary one.
    pub codes: &'static [Loinc],
    /// UCUM code of the value.
    pub ucum: &'static str,
    /// Human-readable unit (`Quantity.unit`).
    pub unit: &'static str,
    /// The R4 vital-signs profile (`meta.profile`).
    pub profile: &'static str,
}

const PROFILE: &str = "http://hl7.org/fhir/StructureDefinition/";

/// The single-value vital signs: `spo2`, `pulse`, `resp`, `temp`.
pub const VITALS: [Vital; 4] = [
    Vital {
        metric: "spo2",
        codes: &[
            Loinc {
                code: "59408-5",
                display: "Oxygen saturation in Arterial blood by Pulse oximetry",
            },
            Loinc {
                code: "2708-6",
                display: "Oxygen saturation in Arterial blood",
            },
        ],
        ucum: "%",
        unit: "%",
        profile: "oxygensat",
    },
    Vital {
        metric: "pulse",
        codes: &[Loinc {
            code: "8867-4",
            display: "Heart rate",
        }],
        ucum: "/min",
        unit: "beats/minute",
        profile: "heartrate",
    },
    Vital {
        metric: "resp",
        codes: &[Loinc {
            code: "9279-1",
            display: "Respiratory rate",
        }],
        ucum: "/min",
        unit: "breaths/minute",
        profile: "resprate",
    },
    Vital {
        metric: "temp",
        codes: &[Loinc {
            code: "8310-5",
            display: "Body temperature",
        }],
        ucum: "Cel",
        unit: "Cel",
        profile: "bodytemp",
    },
];

/// The blood-pressure panel: one Observation, `sbp` and `dbp` as its components.
pub const BP_PANEL: Loinc = Loinc {
    code: "85354-9",
    display: "Blood pressure panel with all children optional",
};
/// Systolic and diastolic: (payload key, component code).
pub const BP_PARTS: [(&str, Loinc); 2] = [
    (
        "sbp",
        Loinc {
            code: "8480-6",
            display: "Systolic blood pressure",
        },
    ),
    (
        "dbp",
        Loinc {
            code: "8462-4",
            display: "Diastolic blood pressure",
        },
    ),
];
/// The panel's pseudo-metric name (identifiers `<event id>:bp`, see
/// [`crate::observation::panel_key`]).
pub const BP: &str = "bp";
/// UCUM code of blood pressure.
pub const MM_HG: &str = "mm[Hg]";
/// The vital-signs profile of the panel.
pub const BP_PROFILE: &str = "bp";

/// The mapping of a single-value metric.
pub fn vital(metric: &str) -> Option<&'static Vital> {
    VITALS.iter().find(|v| v.metric == metric)
}

/// The canonical URL of a vital-signs profile.
pub fn profile_url(profile: &str) -> String {
    format!("{PROFILE}{profile}")
}

/// The metric a LOINC code stands for (the first coding of each metric, the panel's
/// components included): the inverse used to re-verify values.
pub fn metric_of(loinc: &str) -> Option<&'static str> {
    VITALS
        .iter()
        .find(|v| v.codes.first().is_some_and(|c| c.code == loinc))
        .map(|v| v.metric)
        .or_else(|| {
            BP_PARTS
                .iter()
                .find(|(_, c)| c.code == loinc)
                .map(|(m, _)| *m)
        })
}

/// Percent-encoded in a metric's safe code: controls, whitespace and `%` itself.
const METRIC_UNSAFE: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b' ').add(b'%').add(0x7f);

/// The `urn:vitalmq:metric` code (and identifier part) of a metric SPEC does not list.
/// A device may name a metric any text, but an R4 `code` is non-empty with no leading,
/// trailing or double whitespace: a name that is such a code and has no `%` is itself;
/// any other is percent-encoded (whitespace, controls, `%`), and the empty name is
/// `%` (which no encoding produces). Injective: two names never share a code. The
/// original name goes in `code.text` ([`metric_name`] inverts it).
pub fn metric_code(metric: &str) -> std::borrow::Cow<'_, str> {
    if metric.is_empty() {
        return "%".into();
    }
    if is_code(metric) && !metric.contains('%') {
        return metric.into();
    }
    percent_encoding::utf8_percent_encode(metric, METRIC_UNSAFE)
        .to_string()
        .into()
}

/// The metric name a [`metric_code`] stands for (`None`: not one it produces).
pub fn metric_name(code: &str) -> Option<String> {
    if code == "%" {
        return Some(String::new());
    }
    if !code.contains('%') {
        return Some(code.to_owned());
    }
    let name = percent_encoding::percent_decode_str(code)
        .decode_utf8()
        .ok()?
        .into_owned();
    (metric_code(&name) == code).then_some(name)
}

/// An R4 `code`: `[^\s]+( [^\s]+)*` (FHIR's whitespace: space, tab, CR, LF).
fn is_code(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.contains("  ")
        && !s
            .chars()
            .any(|c| c.is_whitespace() && c != ' ' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_codes_are_valid_r4_codes_and_injective() {
        let names = [
            "etco2", "spo2,x", "a b", "a  b", " a", "a ", "", "%", "a%20b", "a\tb", "x\u{7f}",
            "%25", "&#+",
        ];
        let codes: Vec<String> = names.iter().map(|n| metric_code(n).into_owned()).collect();
        for (n, c) in names.iter().zip(&codes) {
            assert!(is_code(c), "{n:?} -> {c:?}");
            assert_eq!(metric_name(c).as_deref(), Some(*n), "{c:?}");
        }
        let unique: std::collections::HashSet<&String> = codes.iter().collect();
        assert_eq!(unique.len(), names.len(), "{codes:?}");
        assert_eq!(metric_code("etco2"), "etco2");
        assert_eq!(metric_code("spo2,x"), "spo2,x");
        assert_eq!(metric_code("a  b"), "a%20%20b");
    }
}
