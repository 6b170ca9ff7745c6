//! `GET /v1/events`: the capsule event history as Server-Sent Events, live.
//!
//! Read from the durable `events` table, in the gap-free order of migration 0004; each
//! message's `id:` is its position (`<xid>.<id>`), so a client that reconnects with
//! `Last-Event-ID` (browsers do it by themselves) resumes exactly after the last event it
//! got and misses nothing. Without it the stream starts with what happens next; `?after=`
//! takes a position too (`0.0`: from the very beginning). Filter with `?capsule_id=`. A team
//! key sees its team's events, a platform admin key every team's.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use hangar_jobs::store::Event;
use hangar_jobs::store::records::{self, EventPosition};
use hangar_jobs::{CapsuleId, TeamId};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::domain;
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Caller, QueryParams};

/// How often a quiet stream looks for new events.
const POLL: Duration = Duration::from_millis(250);
const PAGE: i64 = 200;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(events))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only this capsule's events.
    #[param(value_type = Option<CapsuleId>)]
    capsule_id: Option<String>,
    /// Start after this position (`<xid>.<id>`; `0.0`: from the beginning).
    #[param(example = "0.0")]
    after: Option<String>,
}

fn parse_position(text: &str) -> Result<EventPosition, ApiError> {
    let invalid = || {
        ApiError::InvalidRequest(format!(
            "`{text}` is not an event position (`<xid>.<id>`, as in an event's `id:` line)"
        ))
    };
    let (xid, id) = text.split_once('.').ok_or_else(invalid)?;
    Ok(EventPosition {
        xid: xid.parse().map_err(|_| invalid())?,
        id: id.parse().map_err(|_| invalid())?,
    })
}

/// The capsule event stream, live (Server-Sent Events). Each message's `id:` is its
/// position, `event:` the event's kind and `data:` the event as JSON.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    security(("api_key" = [])),
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position (set by browsers on reconnect)"),
    ),
    responses(
        (status = 200, description = "An endless stream of events; `data:` of each is an Event", content_type = "text/event-stream", body = Event),
        (status = 400, description = "A malformed filter or position", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
    )
)]
async fn events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    QueryParams(q): QueryParams<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let capsule = domain::param::<CapsuleId>("capsule_id", q.capsule_id.as_deref())?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::InvalidRequest("Last-Event-ID is not text".into()))
        })
        .transpose()?;
    let start = match last_event_id.or(q.after.as_deref()) {
        Some(text) => parse_position(text)?,
        None => {
            let mut conn = state.pool.acquire().await?;
            records::events_head(&mut conn).await?
        }
    };
    let team = (!caller.is_admin()).then_some(caller.0.team_id);
    let stream =
        feed(&state, team, capsule, start).map(|(position, event)| Ok(message(position, &event)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The events after `start` (of `team`, or of every team; of `capsule`, or of all), as
/// they commit; ends at shutdown.
pub(crate) fn feed(
    state: &AppState,
    team: Option<TeamId>,
    capsule: Option<CapsuleId>,
    start: EventPosition,
) -> impl Stream<Item = (EventPosition, Event)> + use<> {
    let feed = Feed {
        state: state.clone(),
        team,
        capsule,
        after: start,
        ready: VecDeque::new(),
        closing: state.waiters.closing(),
    };
    futures::stream::unfold(feed, |mut feed| async move {
        let next = feed.next().await?;
        Some((next, feed))
    })
}

/// One client's place in the stream.
struct Feed {
    state: AppState,
    team: Option<TeamId>,
    capsule: Option<CapsuleId>,
    after: EventPosition,
    ready: VecDeque<(EventPosition, Event)>,
    /// Flips at shutdown: the stream ends so the server can stop.
    closing: watch::Receiver<bool>,
}

impl Feed {
    /// The next event, waiting for one; `None` at shutdown.
    async fn next(&mut self) -> Option<(EventPosition, Event)> {
        loop {
            if let Some(next) = self.ready.pop_front() {
                return Some(next);
            }
            if *self.closing.borrow() {
                return None;
            }
            match self.fetch().await {
                Ok(page) if !page.is_empty() => {
                    self.after = page.last().map(|(p, _)| *p).unwrap_or(self.after);
                    self.ready.extend(page);
                    continue;
                }
                Ok(_) => {}
                // Postgres unavailable: try again at the next poll; the client stays put.
                Err(error) => tracing::warn!(%error, "reading events failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.closing.changed() => return None,
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<(EventPosition, Event)>, hangar_jobs::store::StoreError> {
        let mut conn = self.state.pool.acquire().await?;
        records::events_after(&mut conn, self.after, self.team, self.capsule, PAGE).await
    }
}

fn message(position: EventPosition, event: &Event) -> SseEvent {
    SseEvent::default()
        .id(format!("{}.{}", position.xid, position.id))
        .event(&event.kind)
        .json_data(event)
        .unwrap_or_else(|_| SseEvent::default().comment("unserializable event"))
}
