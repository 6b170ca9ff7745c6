//! Typed, prefixed ids (`cap_…`, `op_…`): a UUIDv7 rendered as 32 hex digits after the prefix.
//!
//! UUIDv7 sorts by creation time, so ids double as pagination cursors. Parsing checks the
//! prefix, so an operation id can never be passed where a capsule id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not a valid id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {kind} id (expected `{prefix}_` followed by 32 hex digits)")]
pub struct IdError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}_{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                let error = || IdError { kind: $kind, prefix: $prefix, value: truncate(s) };
                let hex = s
                    .strip_prefix($prefix)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .ok_or_else(error)?;
                if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    return Err(error());
                }
                Uuid::try_parse(hex).map(Self).map_err(|_| error())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        // In the OpenAPI document: a string with the prefix as its pattern.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $kind, " id: `", $prefix, "_` and 32 hex digits.")))
                    .pattern(Some(concat!("^", $prefix, "_[0-9a-f]{32}$")))
                    .examples([concat!($prefix, "_0190f5a0c0de7000800000000000000a")])
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Keeps error messages short when someone sends a megabyte as an id.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

typed_id!(/// A capsule (one microVM sandbox).
    CapsuleId, "cap", "capsule");
typed_id!(/// An operation: the intent row and job handle of one lifecycle request.
    OperationId, "op", "operation");
typed_id!(/// A template: a base image or a snapshot capsules are created from.
    TemplateId, "tpl", "template");
typed_id!(/// A KVM host running the host agent.
    HostId, "host", "host");
typed_id!(/// A team (tenant).
    TeamId, "team", "team");
typed_id!(/// An API key.
    KeyId, "key", "key");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = CapsuleId::new();
        let text = id.to_string();
        assert!(text.starts_with("cap_"));
        assert_eq!(text.len(), 4 + 32);
        assert_eq!(text.parse::<CapsuleId>().unwrap(), id);
    }

    #[test]
    fn rejects_the_wrong_prefix_and_malformed_hex() {
        let op = OperationId::new().to_string();
        assert!(op.parse::<CapsuleId>().is_err());
        for bad in [
            "",
            "cap_",
            "cap_123",
            "cap-0190f5a0c0de7000800000000000000a",
            "cap_0190F5A0C0DE7000800000000000000A",
            "cap_0190f5a0c0de7000800000000000000g",
        ] {
            assert!(bad.parse::<CapsuleId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn error_message_names_the_kind_and_is_bounded() {
        let err = "x".repeat(1000).parse::<HostId>().unwrap_err();
        assert!(err.to_string().contains("host id"));
        assert!(err.to_string().len() < 200);
    }

    #[test]
    fn schema_pattern_matches_real_ids() {
        let schema = serde_json::to_value(<CapsuleId as utoipa::PartialSchema>::schema()).unwrap();
        assert_eq!(schema["type"], "string");
        assert_eq!(schema["pattern"], "^cap_[0-9a-f]{32}$");
        let example = schema["examples"][0].as_str().unwrap();
        assert!(example.parse::<CapsuleId>().is_ok());
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = OperationId::new();
        let b = OperationId::new();
        assert!(a < b);
    }
}
