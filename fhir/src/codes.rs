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
