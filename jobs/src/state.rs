//! The capsule state machine: statuses, the one table of allowed transitions, and the
//! statuses of operations (job handles).
//!
//! Every write of a capsule's status goes through [`CapsuleStatus::can_become`] and a
//! conditional update on status and generation (see `store::capsules::transition`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A string that names no known status or kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct ParseEnumError {
    pub what: &'static str,
    pub value: String,
}

/// Declares a string-backed enum with `as_str`, `Display`, `FromStr`, `ALL` and serde.
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        // Decoded from the TEXT columns whose CHECK constraints hold the same names.
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, ParseEnumError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseEnumError { what: $what, value: s.chars().take(40).collect() }),
                }
            }
        }
    };
}

string_enum!(
    /// Where a capsule is in its life.
    CapsuleStatus, "capsule status" {
        Starting => "starting",
        Running => "running",
        Pausing => "pausing",
        Paused => "paused",
        Resuming => "resuming",
        Snapshotting => "snapshotting",
        Stopping => "stopping",
        Stopped => "stopped",
        Error => "error",
        Unknown => "unknown",
    }
);

string_enum!(
    /// What an operation asks for; one job kind (and one Redis stream) each.
    OperationKind, "operation kind" {
        Create => "create",
        Pause => "pause",
        Resume => "resume",
        Snapshot => "snapshot",
        Destroy => "destroy",
        HostEvent => "host_event",
    }
);

string_enum!(
    /// Where an operation (job handle) is.
    OperationStatus, "operation status" {
        Queued => "queued",
        Running => "running",
        Retrying => "retrying",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

use CapsuleStatus::*;

/// The allowed transitions, `(from, to)`. This table is the state machine.
pub const TRANSITIONS: &[(CapsuleStatus, CapsuleStatus)] = &[
    (Starting, Running),
    (Starting, Error),
    (Starting, Unknown),
    (Running, Pausing),
    (Running, Snapshotting),
    (Running, Stopping),
    // The host paused it on its own (an `auto_paused` report).
    (Running, Paused),
    (Running, Error),
    (Running, Unknown),
    (Pausing, Paused),
    // An operator cancelled the queued pause before any worker claimed it: the VM was never
    // touched.
    (Pausing, Running),
    (Pausing, Error),
    (Pausing, Unknown),
    (Paused, Resuming),
    (Paused, Snapshotting),
    (Paused, Stopping),
    (Paused, Error),
    (Paused, Unknown),
    (Resuming, Running),
    // A queued resume cancelled by an operator (never claimed), or an `auto_paused` report
    // that arrives before the resume runs: the VM is paused.
    (Resuming, Paused),
    (Resuming, Error),
    (Resuming, Unknown),
    // A snapshot returns the capsule to where it was, or goes on to destroy it.
    (Snapshotting, Running),
    (Snapshotting, Paused),
    (Snapshotting, Stopping),
    (Snapshotting, Error),
    (Snapshotting, Unknown),
    (Stopping, Stopped),
    (Stopping, Error),
    (Error, Stopping),
    // An operator retries the failed create that left the capsule here (nothing moved it
    // since): placement is kept and the agent's create is idempotent by capsule id.
    (Error, Starting),
    // A host that comes back reports what it really runs.
    (Unknown, Running),
    (Unknown, Paused),
    (Unknown, Error),
    (Unknown, Stopping),
];

impl CapsuleStatus {
    /// Whether the table allows `self → to`.
    pub fn can_become(self, to: CapsuleStatus) -> bool {
        TRANSITIONS.contains(&(self, to))
    }

    /// Transient statuses are on their way somewhere and carry a deadline.
    pub fn is_transient(self) -> bool {
        self.deadline().is_some()
    }

    /// `stopped` is forever.
    pub fn is_terminal(self) -> bool {
        self == Stopped
    }

    /// How long a transient status may last before the reconciler settles it.
    pub fn deadline(self) -> Option<Duration> {
        let secs = match self {
            Starting | Stopping => 120,
            Pausing | Resuming => 60,
            Snapshotting => 900,
            _ => return None,
        };
        Some(Duration::from_secs(secs))
    }
}

impl OperationKind {
    /// The status a capsule moves to when this operation starts, from `from`.
    /// `None` when the operation does not move the capsule at its start.
    pub fn start_status(self) -> Option<CapsuleStatus> {
        match self {
            OperationKind::Create => Some(Starting),
            OperationKind::Pause => Some(Pausing),
            OperationKind::Resume => Some(Resuming),
            OperationKind::Snapshot => Some(Snapshotting),
            OperationKind::Destroy => Some(Stopping),
            OperationKind::HostEvent => None,
        }
    }

    /// The statuses from which a user may ask for this operation.
    pub fn accepted_from(self) -> &'static [CapsuleStatus] {
        match self {
            OperationKind::Pause => &[Running],
            OperationKind::Resume => &[Paused],
            OperationKind::Snapshot => &[Running, Paused],
            // Destroy is accepted in any non-terminal status and waits for the in-flight
            // operation, if any, to finish first.
            OperationKind::Destroy => &[
                Starting,
                Running,
                Pausing,
                Paused,
                Resuming,
                Snapshotting,
                Stopping,
                Error,
                Unknown,
            ],
            OperationKind::Create | OperationKind::HostEvent => &[],
        }
    }

    /// Where the capsule goes back to when a queued (never claimed) operation of this kind is
    /// cancelled; `prior` is where it was when the operation was accepted (snapshots record
    /// it). `None`: the kind cannot be cancelled (a destroy always runs; a host report is a
    /// fact). A cancelled create leaves a capsule that never had a VM: `error`, to destroy.
    pub fn cancelled_status(self, prior: Option<CapsuleStatus>) -> Option<CapsuleStatus> {
        match self {
            OperationKind::Create => Some(Error),
            OperationKind::Pause => Some(Running),
            OperationKind::Resume => Some(Paused),
            OperationKind::Snapshot => prior.filter(|p| matches!(p, Running | Paused)),
            OperationKind::Destroy | OperationKind::HostEvent => None,
        }
    }

    /// Lifecycle kinds hold the capsule's one in-flight slot; destroy waits behind them.
    pub fn is_lifecycle(self) -> bool {
        matches!(
            self,
            OperationKind::Create
                | OperationKind::Pause
                | OperationKind::Resume
                | OperationKind::Snapshot
        )
    }
}

impl OperationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OperationStatus::Succeeded | OperationStatus::Failed | OperationStatus::Cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for status in CapsuleStatus::ALL {
            assert_eq!(status.as_str().parse::<CapsuleStatus>().unwrap(), *status);
        }
        assert!("sleeping".parse::<CapsuleStatus>().is_err());
    }

    #[test]
    fn stopped_is_terminal_and_has_no_way_out() {
        assert!(TRANSITIONS.iter().all(|(from, _)| *from != Stopped));
        assert!(Stopped.is_terminal());
    }

    #[test]
    fn every_status_but_stopped_can_reach_stopped() {
        for status in CapsuleStatus::ALL.iter().copied() {
            let mut seen = vec![status];
            let mut frontier = vec![status];
            while let Some(s) = frontier.pop() {
                for (from, to) in TRANSITIONS {
                    if *from == s && !seen.contains(to) {
                        seen.push(*to);
                        frontier.push(*to);
                    }
                }
            }
            assert!(seen.contains(&Stopped), "{status} cannot reach stopped");
        }
    }

    #[test]
    fn every_transient_status_has_a_way_to_error() {
        for status in CapsuleStatus::ALL
            .iter()
            .copied()
            .filter(|s| s.is_transient())
        {
            assert!(status.can_become(Error), "{status} cannot fail");
        }
    }

    #[test]
    fn each_operation_starts_with_an_allowed_transition() {
        for kind in OperationKind::ALL {
            if let Some(start) = kind.start_status() {
                for from in kind.accepted_from() {
                    // Destroy from a transient status waits; it starts from where that ends.
                    if from.is_transient() || *from == start {
                        continue;
                    }
                    assert!(from.can_become(start), "{kind}: {from} -> {start}");
                }
            }
        }
    }

    #[test]
    fn cancelling_a_queued_operation_is_an_allowed_transition() {
        for kind in OperationKind::ALL {
            let (Some(start), Some(back)) =
                (kind.start_status(), kind.cancelled_status(Some(Paused)))
            else {
                continue;
            };
            assert!(start.can_become(back), "{kind}: {start} -> {back}");
        }
        assert_eq!(
            OperationKind::Snapshot.cancelled_status(Some(Running)),
            Some(Running)
        );
        assert_eq!(OperationKind::Snapshot.cancelled_status(Some(Error)), None);
        assert_eq!(OperationKind::Destroy.cancelled_status(Some(Running)), None);
    }

    proptest! {
        /// Random walks over the table never leave it and never leave `stopped`.
        #[test]
        fn random_walks_follow_the_table(steps in proptest::collection::vec(0usize..64, 1..200)) {
            let mut status = Starting;
            for pick in steps {
                let next: Vec<_> = TRANSITIONS.iter().filter(|(f, _)| *f == status).map(|(_, t)| *t).collect();
                if next.is_empty() {
                    prop_assert_eq!(status, Stopped);
                    break;
                }
                let to = next[pick % next.len()];
                prop_assert!(status.can_become(to));
                status = to;
            }
        }
    }
}
