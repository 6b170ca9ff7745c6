//! Capsule request bodies (`deny_unknown_fields`) and their validated forms.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hangar_jobs::TemplateId;
use hangar_jobs::store::Capsule;
use hangar_jobs::{CapsuleId, CapsuleStatus, HostId, TeamId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::domain::{MemoryMb, Metadata, TemplateName, TimeoutSec, Vcpus};
use crate::error::ApiError;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCapsuleBody {
    /// A template name (default `base`).
    #[schema(example = "base")]
    template: Option<String>,
    /// 1..=16; default: the template's.
    #[schema(minimum = 1, maximum = 16)]
    vcpus: Option<i64>,
    /// 128..=16384; default: the template's.
    #[schema(minimum = 128, maximum = 16384)]
    memory_mb: Option<i64>,
    /// Seconds of inactivity before the capsule is auto-paused, 10..=86400 (default 300).
    #[schema(minimum = 10, maximum = 86400)]
    timeout_sec: Option<i64>,
    /// At most 32 pairs; keys of 1..=64 characters, values of at most 512.
    metadata: Option<BTreeMap<String, String>>,
}

/// A create request, fully validated; sizes default to the template's.
#[derive(Debug)]
pub(crate) struct NewCapsule {
    pub(crate) template: TemplateName,
    pub(crate) vcpus: Option<Vcpus>,
    pub(crate) memory_mb: Option<MemoryMb>,
    pub(crate) timeout_sec: TimeoutSec,
    pub(crate) metadata: Metadata,
}

impl TryFrom<CreateCapsuleBody> for NewCapsule {
    type Error = ApiError;

    fn try_from(body: CreateCapsuleBody) -> Result<Self, ApiError> {
        Ok(Self {
            template: TemplateName::try_from(body.template.unwrap_or_else(|| "base".into()))?,
            vcpus: body.vcpus.map(Vcpus::try_from).transpose()?,
            memory_mb: body.memory_mb.map(MemoryMb::try_from).transpose()?,
            timeout_sec: TimeoutSec::try_from(body.timeout_sec.unwrap_or(TimeoutSec::DEFAULT))?,
            metadata: Metadata::try_from(body.metadata.unwrap_or_default())?,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotBody {
    /// The template to create (replaces the team's template of that name once it exists).
    pub(crate) name: String,
    /// False: destroy the capsule once the snapshot exists.
    #[serde(default = "keep_by_default")]
    pub(crate) keep: bool,
}

fn keep_by_default() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSnapshotBody {
    /// The platform template to create.
    pub(crate) name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeepaliveBody {
    /// A new inactivity timeout, 10..=86400 (default: the capsule's).
    #[schema(minimum = 10, maximum = 86400)]
    pub(crate) timeout_sec: Option<i64>,
}

// Query fields are text, parsed by the handler so that errors name the parameter; the
// document shows their real types.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TeamListQuery {
    #[param(value_type = Option<CapsuleStatus>)]
    pub(crate) status: Option<String>,
    /// Page size, 1..=200 (default 50).
    #[param(value_type = Option<u32>)]
    pub(crate) limit: Option<String>,
    /// The previous page's `next_cursor`.
    #[param(value_type = Option<CapsuleId>)]
    pub(crate) cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AdminListQuery {
    #[param(value_type = Option<TeamId>)]
    pub(crate) team_id: Option<String>,
    #[param(value_type = Option<CapsuleStatus>)]
    pub(crate) status: Option<String>,
    #[param(value_type = Option<HostId>)]
    pub(crate) host_id: Option<String>,
    /// Page size, 1..=200 (default 50).
    #[param(value_type = Option<u32>)]
    pub(crate) limit: Option<String>,
    /// The previous page's `next_cursor`.
    #[param(value_type = Option<CapsuleId>)]
    pub(crate) cursor: Option<String>,
}

/// A page of capsules, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct CapsulePage {
    pub(crate) capsules: Vec<Capsule>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub(crate) next_cursor: Option<CapsuleId>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct KeepaliveReply {
    /// When the capsule is auto-paused unless kept alive again.
    pub(crate) expires_at: DateTime<Utc>,
}

/// The parameters of a snapshot operation (read by the worker's snapshot job).
pub(crate) fn snapshot_params(
    name: &TemplateName,
    capsule: &Capsule,
    destroy_after: bool,
    platform: bool,
) -> serde_json::Value {
    let mut params = json!({
        "name": name.as_str(),
        "template_id": TemplateId::new(),
        "destroy_after": destroy_after,
        "prior_status": capsule.status,
    });
    if platform {
        params["platform"] = json!(true);
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> Result<NewCapsule, ApiError> {
        let body: CreateCapsuleBody =
            serde_json::from_value(json).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
        NewCapsule::try_from(body)
    }

    #[test]
    fn defaults() {
        let new = body(json!({})).unwrap();
        assert_eq!(new.template.as_str(), "base");
        assert_eq!(new.vcpus, None);
        assert_eq!(new.memory_mb, None);
        assert_eq!(new.timeout_sec.get(), 300);
        assert_eq!(new.metadata, Metadata::default());
    }

    #[test]
    fn every_field_is_validated() {
        let new = body(json!({"template": "t", "vcpus": 16, "memory_mb": 16384, "timeout_sec": 10, "metadata": {"a": "b"}})).unwrap();
        assert_eq!(new.vcpus.unwrap().get(), 16);
        for (bad, code) in [
            (json!({"vcpus": 0}), "invalid_request"),
            (json!({"vcpus": 17}), "invalid_request"),
            (json!({"memory_mb": 64}), "invalid_request"),
            (json!({"timeout_sec": 5}), "invalid_request"),
            (json!({"template": "../x"}), "invalid_name"),
            (json!({"metadata": {"k": 1}}), "invalid_json"),
            (json!({"vcpus": "2"}), "invalid_json"),
            (json!({"cpus": 2}), "invalid_json"),
        ] {
            assert_eq!(body(bad.clone()).unwrap_err().code(), code, "{bad}");
        }
    }

    #[test]
    fn snapshot_bodies() {
        let s: SnapshotBody = serde_json::from_value(json!({"name": "x"})).unwrap();
        assert!(s.keep);
        assert!(
            serde_json::from_value::<AdminSnapshotBody>(json!({"name": "x", "keep": true}))
                .is_err()
        );
    }
}
