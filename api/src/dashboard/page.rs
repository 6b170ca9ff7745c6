//! The page frame (navigation, notice, live-update script, styles) and small renderers
//! shared by the views. Everything user-supplied goes through maud, which escapes it.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::Operator;

const STYLE: &str = include_str!("dashboard.css");
const SCRIPT: &str = include_str!("dashboard.js");

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    Capsules,
    Operations,
    Queues,
    Hosts,
}

/// A dashboard page: `content` goes in `<main>`, which the live script refreshes.
pub(super) fn frame(
    operator: &Operator,
    section: Section,
    title: &str,
    notice: Option<&str>,
    content: Markup,
) -> Markup {
    let nav = [
        (Section::Capsules, "/dashboard", "Capsules"),
        (Section::Operations, "/dashboard/operations", "Operations"),
        (Section::Queues, "/dashboard/queues", "Queues"),
        (Section::Hosts, "/dashboard/hosts", "Hosts"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Hangar" }
                style { (PreEscaped(STYLE)) }
            }
            body data-csrf=(operator.csrf) {
                header {
                    span.brand { "Hangar" }
                    nav {
                        @for (s, href, label) in nav {
                            a href=(href) class=[(s == section).then_some("current")] { (label) }
                        }
                    }
                    span #live title="Live updates" { "●" }
                    form.logout method="post" action="/dashboard/logout" {
                        input type="hidden" name="csrf" value=(operator.csrf);
                        button type="submit" { "Log out" }
                    }
                }
                @if let Some(notice) = notice {
                    p.notice role="status" { (notice) }
                }
                main { (content) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// The login form, with the reason of a refused attempt.
pub(super) fn login(error: Option<&str>) -> Markup {
    bare(
        "Log in",
        html! {
            form.login method="post" action="/dashboard/login" {
                h1 { "Hangar operator dashboard" }
                label for="key" { "Admin key" }
                input #key type="password" name="key" autocomplete="off" required autofocus;
                @if let Some(error) = error {
                    p.error role="alert" { (error) }
                }
                button type="submit" { "Log in" }
            }
        },
    )
}

/// A page with one message (refused requests).
pub(super) fn message(title: &str, text: &str) -> Markup {
    bare(
        title,
        html! {
            h1 { (title) }
            p { (text) }
            p { a href="/dashboard" { "Back to the dashboard" } }
        },
    )
}

fn bare(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Hangar" }
                style { (PreEscaped(STYLE)) }
            }
            body.bare { main { (content) } }
        }
    }
}

/// A status as a coloured badge; transient statuses are marked as such.
pub(super) fn badge(status: &str, transient: bool) -> Markup {
    html! {
        span class={ "badge " (status) @if transient { " transient" } } { (status) }
    }
}

/// An action button: a POST form with the session's CSRF token, returning to `back`.
pub(super) fn action(operator: &Operator, path: &str, label: &str, back: &str) -> Markup {
    html! {
        form.action method="post" action=(path) data-confirm={ (label) "?" } {
            input type="hidden" name="csrf" value=(operator.csrf);
            input type="hidden" name="back" value=(back);
            button type="submit" { (label) }
        }
    }
}

/// A timestamp, and how long ago it was.
pub(super) fn when(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(at.to_rfc3339()) { (ago(at)) }
    }
}

pub(super) fn ago(at: DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// `value` made safe inside a URL's query string.
pub(super) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
