//! The device to a FHIR R4 Device: its registered id, the firmware and on-device model
//! versions it last reported, lot, hardware model, site and region.

use serde_json::{Value as Json, json};

use crate::ids;

/// Device properties without an R4 element of their own.
pub const PROPERTY: &str = "urn:vitalmq:device-property";
/// `Device.version.type` codes (firmware, on-device model).
pub const VERSION_TYPE: &str = "urn:vitalmq:device-version";

/// What vitalmq knows of a device: the registry's facts and the versions its newest
/// message reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub id: String,
    pub site: String,
    /// The wearer's pseudonym.
    pub patient_ref: Option<String>,
    /// Firmware version (`fw`) of the newest message.
    pub fw: Option<String>,
    /// On-device model (`name/version`) of the newest message.
    pub model: Option<String>,
    pub lot: Option<String>,
    pub hardware_model: Option<String>,
    pub region: Option<String>,
}

/// The Device resource.
pub fn device(facts: &DeviceFacts) -> Json {
    let mut d = json!({
        "resourceType": "Device",
        "identifier": [ids::identifier(ids::DEVICE, &facts.id)],
        "status": "active",
    });
    if let Some(lot) = &facts.lot {
        d["lotNumber"] = lot.as_str().into();
    }
    if let Some(hw) = &facts.hardware_model {
        d["modelNumber"] = hw.as_str().into();
    }
    let mut versions = Vec::new();
    for (code, value) in [("firmware", &facts.fw), ("model", &facts.model)] {
        // An R4 string is never empty: an empty version says nothing.
        if let Some(v) = value.as_deref().filter(|v| !v.trim().is_empty()) {
            versions.push(json!({
                "type": {"coding": [{"system": VERSION_TYPE, "code": code}], "text": code},
                "value": v,
            }));
        }
    }
    if !versions.is_empty() {
        d["version"] = Json::Array(versions);
    }
    if let Some(region) = &facts.region {
        d["property"] = json!([{
            "type": {"coding": [{"system": PROPERTY, "code": "region"}], "text": "region"},
            "valueCode": [{"coding": [{"system": "urn:vitalmq:region", "code": region}], "text": region}],
        }]);
    }
    if let Some(p) = &facts.patient_ref {
        d["patient"] = ids::patient(p);
    }
    d["location"] = ids::logical("Location", ids::SITE, &facts.site);
    d
}
