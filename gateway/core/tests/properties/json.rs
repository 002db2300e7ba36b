//! Strategies for JSON values and the ways they are written on the wire.

use proptest::collection::vec;
use proptest::prelude::*;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Object keys: mostly short printable words, sometimes any string at all.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_]{1,10}",
        1 => any::<String>(),
    ]
}

/// Any JSON value, a few levels deep.
pub fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// Any JSON object whose keys avoid `reserved`.
pub fn object_without(
    reserved: &'static [&'static str],
) -> impl Strategy<Value = Map<String, Value>> {
    vec((key(), value()), 0..6).prop_map(move |fields| {
        fields
            .into_iter()
            .filter(|(name, _)| !reserved.contains(&name.as_str()))
            .collect()
    })
}

/// How a value is written: compact or pretty, with JSON whitespace around it.
#[derive(Debug, Clone)]
pub struct Layout {
    pretty: bool,
    before: String,
    after: String,
}

pub fn layout() -> impl Strategy<Value = Layout> {
    (any::<bool>(), "[ \t\r\n]{0,3}", "[ \t\r\n]{0,3}").prop_map(|(pretty, before, after)| Layout {
        pretty,
        before,
        after,
    })
}

impl Layout {
    pub fn write(&self, value: &Value) -> Vec<u8> {
        let text = if self.pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        };
        let text = text.expect("a Value always serialises");
        [self.before.as_bytes(), &text, self.after.as_bytes()].concat()
    }
}

/// The top-level keys of a JSON object in the order written, duplicates kept (a `Value`
/// would silently keep only the last of two equal keys).
pub struct WrittenKeys(pub Vec<String>);

impl<'de> Deserialize<'de> for WrittenKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = WrittenKeys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WrittenKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(WrittenKeys(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}
