//! The dashboard's pages: capsules, one capsule, operations, one operation, queues, hosts,
//! and the live feed that refreshes them. Lists are pages of 50 by id (keyset, never
//! OFFSET), newest first; counts come from grouped, indexed queries.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use hangar_jobs::store::capsules::{self, CapsuleFilter};
use hangar_jobs::store::operations::{self, OperationFilter};
use hangar_jobs::store::{Event, Host, Operation, dashboard, hosts, records};
use hangar_jobs::{CapsuleId, CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus};
use maud::{Markup, html};
use serde::Deserialize;

use super::Operator;
use super::page::{self, Section, action, badge, when};
use crate::AppState;
use crate::domain::param;
use crate::error::ApiError;
use crate::extract::PathId;

const PAGE: i64 = 50;
/// The window of the queues' throughput and failure rate.
const WINDOW_SECS: f64 = 300.0;

type PageResult = Result<Response, PageError>;

/// A page's refusal (a bad filter, an unknown id) as a page a person reads: the API's
/// status, stable code and message, in HTML rather than the JSON envelope.
pub(super) struct PageError(ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(error: E) -> Self {
        PageError(error.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = format!("Refused: {}", self.0.code());
        let text = self.0.to_string();
        // The API's own response logs an internal error's cause, once.
        let status = self.0.into_response().status();
        (status, page::message(&title, &text)).into_response()
    }
}

/// Filters and cursor of the list pages; invalid values are reported, not ignored.
#[derive(Deserialize, Default)]
pub(super) struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    team: Option<String>,
    host: Option<String>,
    capsule: Option<String>,
    id: Option<String>,
    before: Option<String>,
    notice: Option<String>,
}

/// Capsules: counts by status, and the list filtered by status, team and host.
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses((status = 200, description = "Capsules", content_type = "text/html", body = String)))]
pub(super) async fn capsules(
    State(state): State<AppState>,
    operator: Operator,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let filter = CapsuleFilter {
        status: param("status", q.status.as_deref())?,
        team: param("team", q.team.as_deref())?,
        host: param("host", q.host.as_deref())?,
        before: param("before", q.before.as_deref())?,
        limit: PAGE,
    };
    let mut conn = state.pool.acquire().await?;
    let counts = capsules::count_by_status(&mut conn).await?;
    let list = capsules::list(&mut conn, &filter).await?;
    let hosts = hosts::list(&mut conn).await?;
    let host_names: HashMap<HostId, &str> = hosts.iter().map(|h| (h.id, h.name.as_str())).collect();
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let next = (list.len() as i64 == PAGE)
        .then(|| list.last().map(|c| c.id))
        .flatten();
    let content = html! {
        h1 { "Capsules" }
        div.cards {
            a.card href="/dashboard" { div.n { (total) } div.l { "all" } }
            @for (status, n) in &counts {
                a class={ "card" @if status.is_transient() { " transient" } }
                    href={ "/dashboard?status=" (status) } data-status=(status) {
                    div.n { (n) } div.l { (status) @if status.is_transient() { " (transient)" } }
                }
            }
        }
        form.filters method="get" action="/dashboard" {
            label { "Status" select name="status" {
                option value="" { "any" }
                @for s in CapsuleStatus::ALL {
                    option value=(s) selected[filter.status == Some(*s)] { (s) }
                }
            } }
            label { "Team" input name="team" placeholder="team_…" value=[q.team.as_deref()]; }
            label { "Host" select name="host" {
                option value="" { "any" }
                @for h in &hosts { option value=(h.id) selected[filter.host == Some(h.id)] { (h.name) } }
            } }
            button type="submit" { "Filter" }
        }
        table #capsules {
            thead { tr { th { "Capsule" } th { "Status" } th { "Team" } th { "Host" }
                th.num { "vCPUs" } th.num { "MiB" } th { "Created" } th { "Changed" } } }
            tbody {
                @for c in &list {
                    tr data-id=(c.id) {
                        td { a.id href={ "/dashboard/capsules/" (c.id) } { (c.id) } }
                        td { (badge(c.status.as_str(), c.status.is_transient()))
                             @if let Some(r) = &c.status_reason { " " span.muted { (r) } } }
                        td.id { a href={ "/dashboard?team=" (c.team_id) } { (c.team_id) } }
                        td { @if let Some(h) = c.host_id { (host_names.get(&h).copied().unwrap_or("?")) } }
                        td.num { (c.vcpus) } td.num { (c.memory_mb) }
                        td { (when(c.created_at)) } td { (when(c.updated_at)) }
                    }
                }
                @if list.is_empty() { tr { td colspan="8" .muted { "No capsules match." } } }
            }
        }
        @if let Some(next) = next { p.pager { a href=(with_before("/dashboard", &q, next)) { "Older →" } } }
    };
    Ok(page::frame(
        &operator,
        Section::Capsules,
        "Capsules",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

/// One capsule: its facts, operations and events.
#[utoipa::path(get, path = "/dashboard/capsules/{id}", tag = "dashboard",
    params(("id" = CapsuleId, Path)),
    responses((status = 200, description = "A capsule", content_type = "text/html", body = String)))]
pub(super) async fn capsule(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<CapsuleId>,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let mut conn = state.pool.acquire().await?;
    let capsule = capsules::get(&mut conn, None, id)
        .await?
        .ok_or(ApiError::NotFound("capsule"))?;
    let filter = OperationFilter {
        capsule: Some(id),
        limit: PAGE,
        ..Default::default()
    };
    let ops = operations::list(&mut conn, &filter).await?;
    let events = records::capsule_events(&mut conn, id, 500).await?;
    let back = format!("/dashboard/capsules/{id}");
    let content = html! {
        h1 { "Capsule " span.id { (capsule.id) } }
        dl.facts {
            dt { "Status" } dd { (badge(capsule.status.as_str(), capsule.status.is_transient()))
                @if let Some(r) = &capsule.status_reason { " " (r) } }
            dt { "Team" } dd.id { (capsule.team_id) }
            dt { "Host" } dd.id { @if let Some(h) = capsule.host_id { (h) } @else { "—" } }
            dt { "Size" } dd { (capsule.vcpus) " vCPUs, " (capsule.memory_mb) " MiB" }
            dt { "Generation" } dd { (capsule.generation) }
            dt { "Expires" } dd { (capsule.expires_at.to_rfc3339()) }
            dt { "Created" } dd { (when(capsule.created_at)) }
        }
        h2 { "Operations" }
        (operations_table(&operator, &ops, &back))
        h2 { "Events" }
        table #events {
            thead { tr { th { "When" } th { "Event" } th { "Transition" } th { "Message" } th { "Operation" } } }
            tbody { @for e in &events { tr {
                td { (when(e.created_at)) } td { (e.kind) }
                td { (e.from_status.as_deref().unwrap_or("")) " → " (e.to_status.as_deref().unwrap_or("")) }
                td { (e.message.as_deref().unwrap_or("")) }
                td { @if let Some(op) = e.operation_id { a.id href={ "/dashboard/operations/" (op) } { (op) } } }
            } } }
        }
    };
    Ok(page::frame(
        &operator,
        Section::Capsules,
        "Capsule",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

/// Operations (the jobs): filter by status, kind, capsule and team, or look one up by id.
#[utoipa::path(get, path = "/dashboard/operations", tag = "dashboard",
    responses((status = 200, description = "Operations", content_type = "text/html", body = String)))]
pub(super) async fn operations(
    State(state): State<AppState>,
    operator: Operator,
    Query(q): Query<ListQuery>,
) -> PageResult {
    if let Some(id) = param::<OperationId>("id", q.id.as_deref())? {
        return Ok(Redirect::to(&format!("/dashboard/operations/{id}")).into_response());
    }
    let filter = OperationFilter {
        status: param("status", q.status.as_deref())?,
        kind: param("kind", q.kind.as_deref())?,
        capsule: param("capsule", q.capsule.as_deref())?,
        team: param("team", q.team.as_deref())?,
        before: param("before", q.before.as_deref())?,
        limit: PAGE,
    };
    let mut conn = state.pool.acquire().await?;
    let list = operations::list(&mut conn, &filter).await?;
    let mut counts: Vec<(OperationStatus, i64)> = Vec::new();
    for (_, status, n) in operations::count_by_status(&mut conn).await? {
        match counts.iter_mut().find(|(s, _)| *s == status) {
            Some((_, total)) => *total += n,
            None => counts.push((status, n)),
        }
    }
    counts.sort_by_key(|(s, _)| OperationStatus::ALL.iter().position(|x| x == s));
    let next = (list.len() as i64 == PAGE)
        .then(|| list.last().map(|o| o.id))
        .flatten();
    let content = html! {
        h1 { "Operations" }
        div.cards { @for (status, n) in &counts {
            a.card href={ "/dashboard/operations?status=" (status) } data-status=(status) {
                div.n { (n) } div.l { (status) } }
        } }
        form.filters method="get" action="/dashboard/operations" {
            label { "Look up" input name="id" placeholder="op_…"; }
            label { "Status" select name="status" {
                option value="" { "any" }
                @for s in OperationStatus::ALL { option value=(s) selected[filter.status == Some(*s)] { (s) } }
            } }
            label { "Kind" select name="kind" {
                option value="" { "any" }
                @for k in OperationKind::ALL { option value=(k) selected[filter.kind == Some(*k)] { (k) } }
            } }
            label { "Capsule" input name="capsule" placeholder="cap_…" value=[q.capsule.as_deref()]; }
            label { "Team" input name="team" placeholder="team_…" value=[q.team.as_deref()]; }
            button type="submit" { "Filter" }
        }
        (operations_table(&operator, &list, &current("/dashboard/operations", &q)))
        @if let Some(next) = next { p.pager { a href=(with_before("/dashboard/operations", &q, next)) { "Older →" } } }
    };
    Ok(page::frame(
        &operator,
        Section::Operations,
        "Operations",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

/// One operation: attempts, last error, and its timeline.
#[utoipa::path(get, path = "/dashboard/operations/{id}", tag = "dashboard",
    params(("id" = OperationId, Path)),
    responses((status = 200, description = "An operation", content_type = "text/html", body = String)))]
pub(super) async fn operation(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<OperationId>,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let mut conn = state.pool.acquire().await?;
    let op = operations::get(&mut conn, None, id)
        .await?
        .ok_or(ApiError::NotFound("operation"))?;
    let events = dashboard::operation_events(&mut conn, id, 200).await?;
    let back = format!("/dashboard/operations/{id}");
    let content = html! {
        h1 { "Operation " span.id { (op.id) } }
        p { (actions(&operator, &op, &back)) }
        dl.facts {
            dt { "Kind" } dd { (op.kind) }
            dt { "Status" } dd { (badge(op.status.as_str(), false)) }
            dt { "Capsule" } dd { @if let Some(c) = op.capsule_id { a.id href={ "/dashboard/capsules/" (c) } { (c) } } }
            dt { "Team" } dd.id { (op.team_id) }
            dt { "Attempts" } dd { (op.attempts) " of " (op.max_attempts) }
            dt { "Step" } dd { (op.step.as_deref().unwrap_or("—")) }
            dt { "Error" }
            @if op.error_code.is_none() && op.last_error.is_none() { dd { "—" } } @else {
                dd.error { (op.error_code.as_deref().unwrap_or("")) " " (op.last_error.as_deref().unwrap_or("")) }
            }
        }
        h2 { "Timeline" }
        table #timeline {
            thead { tr { th { "When" } th { "What" } } }
            tbody { @for (at, what) in timeline(&op, &events) { tr { td { (when(at)) } td { (what) } } } }
        }
    };
    Ok(page::frame(
        &operator,
        Section::Operations,
        "Operation",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

/// An operation's life in time order: accepted, its events, first attempt, finished.
fn timeline(op: &Operation, events: &[Event]) -> Vec<(DateTime<Utc>, Markup)> {
    let mut rows = vec![(op.created_at, html! { "accepted (queued)" })];
    rows.extend(
        op.started_at
            .map(|at| (at, html! { "first attempt started" })),
    );
    rows.extend(events.iter().map(|e| {
        let what = html! {
            (e.kind) ": " (e.from_status.as_deref().unwrap_or("")) " → "
            (e.to_status.as_deref().unwrap_or("")) " "
            span.muted { (e.message.as_deref().unwrap_or("")) }
        };
        (e.created_at, what)
    }));
    rows.extend(
        op.finished_at
            .map(|at| (at, html! { "finished: " (op.status) })),
    );
    // Stable: rows written in the same instant keep the order above.
    rows.sort_by_key(|(at, _)| *at);
    rows
}

/// Queues: per job kind, the jobs in each stage, throughput and failure rate.
#[utoipa::path(get, path = "/dashboard/queues", tag = "dashboard",
    responses((status = 200, description = "Queues", content_type = "text/html", body = String)))]
pub(super) async fn queues(
    State(state): State<AppState>,
    operator: Operator,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let mut conn = state.pool.acquire().await?;
    let figures = dashboard::queue_figures(&mut conn, WINDOW_SECS).await?;
    drop(conn);
    let mut depths = HashMap::new();
    for kind in OperationKind::ALL {
        depths.insert(*kind, state.queue.depth(*kind).await.ok());
    }
    let minutes = WINDOW_SECS / 60.0;
    let content = html! {
        h1 { "Queues" }
        p.muted { "Stages now; throughput and failure rate over the last " (minutes) " minutes. \
                   Retrying: running a second or later attempt. Scheduled: backing off before \
                   the next attempt, or committed and not yet pushed to Redis. \
                   Dead: failed for good; retry them from Operations." }
        table #queues {
            thead { tr { th { "Kind" } th.num { "Queued" } th.num { "In flight" } th.num { "Retrying" }
                th.num { "Scheduled" } th.num { "Dead" } th.num { "Stream entries" }
                th.num { "Done / min" } th.num { "Failure rate" } } }
            tbody { @for f in &figures {
                @let kind = f.kind.expect("one row per kind");
                @let done = f.succeeded_recently + f.failed_recently;
                tr data-kind=(kind) {
                    td { a href={ "/dashboard/operations?kind=" (kind) } { (kind) } }
                    td.num { (f.queued) } td.num { (f.in_flight) } td.num { (f.retrying) }
                    td.num { (f.scheduled) }
                    td.num { a href={ "/dashboard/operations?status=failed&kind=" (kind) } { (f.dead) } }
                    td.num { @match depths.get(&kind).copied().flatten() { Some(d) => (d), None => "?" } }
                    td.num { (format!("{:.1}", done as f64 / minutes)) }
                    td.num { @if done > 0 { (format!("{:.1} %", 100.0 * f.failed_recently as f64 / done as f64)) } @else { "—" } }
                }
            } }
        }
    };
    Ok(page::frame(
        &operator,
        Section::Queues,
        "Queues",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

/// Hosts: health, heartbeat age, capacity used; cordon, uncordon, drain.
#[utoipa::path(get, path = "/dashboard/hosts", tag = "dashboard",
    responses((status = 200, description = "Hosts", content_type = "text/html", body = String)))]
pub(super) async fn hosts(
    State(state): State<AppState>,
    operator: Operator,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let mut conn = state.pool.acquire().await?;
    let list = hosts::list(&mut conn).await?;
    let content = html! {
        h1 { "Hosts" }
        table #hosts {
            thead { tr { th { "Host" } th { "Health" } th { "Heartbeat" } th { "Driver" }
                th { "vCPUs reserved" } th { "Memory reserved" } th { "Placement" } th { "Actions" } } }
            tbody { @for h in &list { (host_row(&operator, h)) } }
        }
    };
    Ok(page::frame(
        &operator,
        Section::Hosts,
        "Hosts",
        q.notice.as_deref(),
        content,
    )
    .into_response())
}

fn host_row(operator: &Operator, h: &Host) -> Markup {
    let back = "/dashboard/hosts";
    html! {
        tr data-host=(h.name) {
            td { (h.name) br; span.id { (h.id) } }
            td { (badge(&h.status, false)) }
            td { (page::ago(h.last_heartbeat_at)) }
            td { (h.driver) }
            td { (usage(h.vcpus_reserved, h.vcpus_total)) }
            td { (usage(h.memory_mb_reserved, h.memory_mb_total)) }
            td { @if h.drain_requested_at.is_some() { "draining" } @else if h.cordoned { "cordoned" } @else { "open" } }
            td {
                @if h.cordoned {
                    (action(operator, &format!("/dashboard/hosts/{}/uncordon", h.id), "Uncordon", back))
                } @else {
                    (action(operator, &format!("/dashboard/hosts/{}/cordon", h.id), "Cordon", back))
                }
                @if h.drain_requested_at.is_none() {
                    " " (action(operator, &format!("/dashboard/hosts/{}/drain", h.id), "Drain", back))
                }
            }
        }
    }
}

fn usage(used: i32, total: i32) -> Markup {
    let percent = if total > 0 {
        (100 * used / total).clamp(0, 100)
    } else {
        0
    };
    html! { (used) " / " (total) div.bar { span style={ "width:" (percent) "%" } {} } }
}

fn operations_table(operator: &Operator, ops: &[Operation], back: &str) -> Markup {
    html! {
        table #operations {
            thead { tr { th { "Operation" } th { "Kind" } th { "Status" } th { "Capsule" }
                th.num { "Attempts" } th { "Last error" } th { "Created" } th { "Actions" } } }
            tbody {
                @for op in ops { tr data-id=(op.id) data-status=(op.status) {
                    td { a.id href={ "/dashboard/operations/" (op.id) } { (op.id) } }
                    td { (op.kind) } td { (badge(op.status.as_str(), false)) }
                    td { @if let Some(c) = op.capsule_id { a.id href={ "/dashboard/capsules/" (c) } { (c) } } }
                    td.num { (op.attempts) "/" (op.max_attempts) }
                    td.error { (op.last_error.as_deref().map(|e| truncate(e, 120)).unwrap_or_default()) }
                    td { (when(op.created_at)) }
                    td { (actions(operator, op, back)) }
                } }
                @if ops.is_empty() { tr { td colspan="8" .muted { "No operations match." } } }
            }
        }
    }
}

/// Retry for a failed operation, cancel for a queued one.
fn actions(operator: &Operator, op: &Operation, back: &str) -> Markup {
    html! {
        @if op.status == OperationStatus::Failed && op.kind != OperationKind::HostEvent {
            (action(operator, &format!("/dashboard/operations/{}/retry", op.id), "Retry", back))
        }
        @if op.status == OperationStatus::Queued
            && !matches!(op.kind, OperationKind::Destroy | OperationKind::HostEvent) {
            (action(operator, &format!("/dashboard/operations/{}/cancel", op.id), "Cancel", back))
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The list's URL with its filters (no cursor, no notice), for actions to return to.
fn current(path: &str, q: &ListQuery) -> String {
    let mut url = path.to_owned();
    let pairs = [
        ("status", &q.status),
        ("kind", &q.kind),
        ("team", &q.team),
        ("host", &q.host),
        ("capsule", &q.capsule),
    ];
    for (name, value) in pairs {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{name}={}", page::encode(value)));
        }
    }
    url
}

fn with_before(path: &str, q: &ListQuery, before: impl std::fmt::Display) -> String {
    let url = current(path, q);
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}before={before}")
}

/// The live feed: one message per event, which the page script turns into a refresh.
#[utoipa::path(get, path = "/dashboard/live", tag = "dashboard",
    responses((status = 200, description = "Server-Sent Events: one per capsule event", content_type = "text/event-stream", body = String)))]
pub(super) async fn live(
    State(state): State<AppState>,
    _operator: Operator,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, PageError> {
    let mut conn = state.pool.acquire().await?;
    let start = records::events_head(&mut conn).await?;
    drop(conn);
    let stream = crate::events::feed(&state, None, None, start)
        .map(|(_, event)| Ok(SseEvent::default().data(event.kind)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
