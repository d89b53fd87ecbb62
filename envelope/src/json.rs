//! CBOR values as JSON, for `inspect` output and pass-through of unknown payload keys.
//!
//! JSON has no byte strings or tags, so they are shown as `{"bstr": hex}` and
//! `{"tag": n, "value": ...}`; non-text map keys are shown as their debug form.

use std::collections::BTreeMap;

use ciborium::value::Value;
use serde_json::{Map, Value as Json};

/// Converts one CBOR value to JSON.
pub fn cbor_to_json(value: &Value) -> Json {
    match value {
        Value::Integer(i) => {
            let i = i128::from(*i);
            u64::try_from(i)
                .map(Json::from)
                .or_else(|_| i64::try_from(i).map(Json::from))
                .unwrap_or_else(|_| Json::String(i.to_string()))
        }
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map_or_else(|| Json::String(f.to_string()), Json::Number),
        Value::Text(t) => Json::String(t.clone()),
        Value::Bytes(b) => Json::Object(Map::from_iter([(
            "bstr".to_owned(),
            Json::String(hex::encode(b)),
        )])),
        Value::Bool(b) => Json::Bool(*b),
        Value::Null => Json::Null,
        Value::Tag(tag, inner) => Json::Object(Map::from_iter([
            ("tag".to_owned(), Json::from(*tag)),
            ("value".to_owned(), cbor_to_json(inner)),
        ])),
        Value::Array(items) => Json::Array(items.iter().map(cbor_to_json).collect()),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (map_key(k), cbor_to_json(v)))
                .collect(),
        ),
        other => Json::String(format!("{other:?}")),
    }
}

/// The first key that occurs twice in a map anywhere inside `value` (maps inside arrays,
/// tags and maps included), as a dotted path below `at`. Keys count as the same when
/// [`cbor_to_json`] would give them the same JSON name (which includes equal CBOR
/// values): a pass-through value becomes a JSON object, and an object keeps only the last
/// of two equal names, so accepting them would silently drop a signed value.
pub(crate) fn duplicate_key(value: &Value, at: &str) -> Option<String> {
    match value {
        Value::Map(entries) => {
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in entries {
                let name = map_key(k);
                let path = format!("{at}.{}", name.escape_debug().take(64).collect::<String>());
                if !seen.insert(name) {
                    return Some(path);
                }
                if let Some(dup) = duplicate_key(v, &path) {
                    return Some(dup);
                }
            }
            None
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| duplicate_key(v, &format!("{at}[{i}]"))),
        Value::Tag(_, inner) => duplicate_key(inner, at),
        _ => None,
    }
}

fn map_key(key: &Value) -> String {
    match key {
        Value::Text(t) => t.clone(),
        Value::Integer(i) => i128::from(*i).to_string(),
        other => cbor_to_json(other).to_string(),
    }
}

/// `serialize_with` helper for maps of unknown keys.
pub(crate) fn serialize_value_map<S: serde::Serializer>(
    map: &BTreeMap<String, Value>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap as _;
    let mut out = s.serialize_map(Some(map.len()))?;
    for (k, v) in map {
        out.serialize_entry(k, &cbor_to_json(v))?;
    }
    out.end()
}
