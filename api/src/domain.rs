//! Validated request values ("parse, don't validate"): each newtype can only hold an
//! acceptable value, and its error names the field and the allowed range.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::error::ApiError;

/// An integer field checked against an inclusive range.
fn in_range(field: &str, value: i64, min: i64, max: i64) -> Result<i32, ApiError> {
    if (min..=max).contains(&value) {
        // The ranges below all fit in i32.
        Ok(value as i32)
    } else {
        Err(ApiError::InvalidRequest(format!(
            "`{field}` must be between {min} and {max} (got {value})"
        )))
    }
}

macro_rules! ranged {
    ($(#[$doc:meta])* $name:ident, $field:literal, $min:literal ..= $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) struct $name(i32);

        impl $name {
            pub(crate) const MIN: i64 = $min;
            pub(crate) const MAX: i64 = $max;

            pub(crate) fn get(self) -> i32 {
                self.0
            }
        }

        impl TryFrom<i64> for $name {
            type Error = ApiError;
            fn try_from(value: i64) -> Result<Self, ApiError> {
                in_range($field, value, Self::MIN, Self::MAX).map(Self)
            }
        }
    };
}

ranged!(/// vCPUs of a capsule.
    Vcpus, "vcpus", 1..=16);
ranged!(/// Memory of a capsule.
    MemoryMb, "memory_mb", 128..=16384);
ranged!(/// Seconds of inactivity before a capsule is auto-paused.
    TimeoutSec, "timeout_sec", 10..=86400);
ranged!(/// A page size.
    PageLimit, "limit", 1..=200);
ranged!(/// Seconds a `?wait=` long poll may park.
    WaitSec, "wait", 0..=300);

impl TimeoutSec {
    pub(crate) const DEFAULT: i64 = 300;
}

impl PageLimit {
    pub(crate) const DEFAULT: i64 = 50;
}

/// A capsule's metadata: at most 32 string pairs, keys 1..=64 and values ≤ 512 chars.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Metadata(BTreeMap<String, String>);

impl Metadata {
    const MAX_KEYS: usize = 32;
    const MAX_KEY_CHARS: usize = 64;
    const MAX_VALUE_CHARS: usize = 512;

    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).unwrap_or_default()
    }
}

impl TryFrom<BTreeMap<String, String>> for Metadata {
    type Error = ApiError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, ApiError> {
        let invalid = |m: String| Err(ApiError::InvalidRequest(m));
        if map.len() > Self::MAX_KEYS {
            return invalid(format!(
                "`metadata` may hold at most {} keys (got {})",
                Self::MAX_KEYS,
                map.len()
            ));
        }
        for (key, value) in &map {
            let chars = key.chars().count();
            if chars == 0 || chars > Self::MAX_KEY_CHARS {
                return invalid(format!(
                    "`metadata` keys must be 1 to {} characters long",
                    Self::MAX_KEY_CHARS
                ));
            }
            if value.chars().count() > Self::MAX_VALUE_CHARS {
                return invalid(format!(
                    "`metadata` values must be at most {} characters long (key `{key}`)",
                    Self::MAX_VALUE_CHARS
                ));
            }
        }
        Ok(Self(map))
    }
}

/// A name people give things (templates, teams, keys, hosts): 1..=64 characters, no
/// control characters, no path separators or `..` (template names become file names on
/// hosts).
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let chars = name.chars().count();
    let reason = if chars == 0 || chars > 64 {
        "must be 1 to 64 characters long"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else if name.contains('/') || name.contains('\\') {
        "must not contain `/` or `\\`"
    } else if name.contains("..") {
        "must not contain `..`"
    } else if name.trim() != name {
        "must not start or end with whitespace"
    } else {
        return Ok(());
    };
    Err(ApiError::InvalidName(format!("{what} name {reason}")))
}

macro_rules! name {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct $name(String);

        impl $name {
            pub(crate) fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ApiError;
            fn try_from(name: String) -> Result<Self, ApiError> {
                check_name($what, &name)?;
                Ok(Self(name))
            }
        }
    };
}

name!(/// The name of a template (a snapshot's name).
    TemplateName, "template");
name!(/// The name of a team.
    TeamName, "team");
name!(/// The name of an API key.
    KeyName, "key");
name!(/// The name of a host.
    HostName, "host");

/// An optional query parameter parsed with `FromStr`; the error names the parameter.
pub(crate) fn param<T>(name: &str, value: Option<&str>) -> Result<Option<T>, ApiError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .map_err(|e| ApiError::InvalidRequest(format!("`{name}`: {e}")))
        })
        .transpose()
}

/// A ranged integer query parameter with a default.
pub(crate) fn int_param<T: TryFrom<i64, Error = ApiError>>(
    name: &str,
    value: Option<&str>,
    default: i64,
) -> Result<T, ApiError> {
    let n = param::<i64>(name, value)?.unwrap_or(default);
    T::try_from(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code()
    }

    #[test]
    fn ranges_are_inclusive_and_errors_name_the_field() {
        assert_eq!(Vcpus::try_from(1).unwrap().get(), 1);
        assert_eq!(Vcpus::try_from(16).unwrap().get(), 16);
        let err = Vcpus::try_from(17).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(err.to_string().contains("`vcpus` must be between 1 and 16"));
        assert!(Vcpus::try_from(0).is_err());
        assert!(MemoryMb::try_from(127).is_err());
        assert!(MemoryMb::try_from(16384).is_ok());
        assert!(MemoryMb::try_from(16385).is_err());
        assert!(TimeoutSec::try_from(9).is_err());
        assert!(TimeoutSec::try_from(86400).is_ok());
        assert!(TimeoutSec::try_from(i64::MAX).is_err());
        assert!(PageLimit::try_from(0).is_err());
        assert!(PageLimit::try_from(200).is_ok());
        assert!(WaitSec::try_from(301).is_err());
    }

    #[test]
    fn metadata_limits() {
        let pairs = |n: usize, k: usize, v: usize| -> BTreeMap<String, String> {
            (0..n)
                .map(|i| (format!("{i:0>k$}"), "v".repeat(v)))
                .collect()
        };
        assert!(Metadata::try_from(pairs(32, 64, 512)).is_ok());
        assert_eq!(code(Metadata::try_from(pairs(33, 2, 1))), "invalid_request");
        assert!(Metadata::try_from(pairs(1, 65, 1)).is_err());
        assert!(Metadata::try_from(pairs(1, 2, 513)).is_err());
        let empty_key = BTreeMap::from([(String::new(), "v".to_owned())]);
        assert!(Metadata::try_from(empty_key).is_err());
        // Characters, not bytes.
        assert!(Metadata::try_from(BTreeMap::from([("é".repeat(64), "ü".repeat(512))])).is_ok());
    }

    #[test]
    fn template_names() {
        for good in ["base", "my-template_2", "v1.2", "ünïcode", &"x".repeat(64)] {
            assert!(TemplateName::try_from(good.to_owned()).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b",
            "a\\b",
            "..",
            "a..b",
            "tab\there",
            "nul\0",
            " padded",
            &"x".repeat(65),
        ] {
            assert_eq!(
                code(TemplateName::try_from(bad.to_owned())),
                "invalid_name",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn params_parse_or_name_themselves() {
        assert_eq!(param::<i64>("limit", None).unwrap(), None);
        assert_eq!(param::<i64>("limit", Some("")).unwrap(), None);
        assert_eq!(param::<i64>("limit", Some("7")).unwrap(), Some(7));
        let err = param::<i64>("limit", Some("seven")).unwrap_err();
        assert!(err.to_string().starts_with("`limit`"));
        assert_eq!(
            int_param::<PageLimit>("limit", None, PageLimit::DEFAULT)
                .unwrap()
                .get(),
            50
        );
        assert!(int_param::<PageLimit>("limit", Some("201"), 50).is_err());
    }
}
