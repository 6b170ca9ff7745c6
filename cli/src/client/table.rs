//! Aligned text tables of capsules, operations and hosts.

use serde_json::Value;

use super::cell;

/// Columns padded to their widest cell, two spaces apart, a header first.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(value, width)| format!("{value:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn capsules(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                cell(c, "id"),
                cell(c, "status"),
                cell(c, "host_id"),
                cell(c, "vcpus"),
                cell(c, "memory_mb"),
                cell(c, "created_at"),
                cell(c, "status_reason"),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "STATUS",
        "HOST",
        "VCPUS",
        "MEMORY_MB",
        "CREATED",
        "REASON",
    ];
    render(&headers, &rows)
}

pub fn operations(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            let error = match (o["error_code"].as_str(), o["last_error"].as_str()) {
                (Some(code), Some(text)) => format!("{code}: {}", short(text)),
                (Some(code), None) => code.to_owned(),
                (None, Some(text)) => short(text),
                (None, None) => "-".into(),
            };
            vec![
                cell(o, "id"),
                cell(o, "kind"),
                cell(o, "status"),
                cell(o, "capsule_id"),
                format!("{}/{}", cell(o, "attempts"), cell(o, "max_attempts")),
                cell(o, "created_at"),
                error,
            ]
        })
        .collect();
    let headers = [
        "ID", "KIND", "STATUS", "CAPSULE", "ATTEMPTS", "CREATED", "ERROR",
    ];
    render(&headers, &rows)
}

pub fn hosts(list: &[Value]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            let scheduling = if !h["drain_requested_at"].is_null() {
                "draining"
            } else if h["cordoned"] == true {
                "cordoned"
            } else {
                "schedulable"
            };
            vec![
                cell(h, "id"),
                cell(h, "name"),
                cell(h, "status"),
                scheduling.to_owned(),
                format!("{}/{}", cell(h, "vcpus_reserved"), cell(h, "vcpus_total")),
                format!(
                    "{}/{}",
                    cell(h, "memory_mb_reserved"),
                    cell(h, "memory_mb_total")
                ),
                cell(h, "last_heartbeat_at"),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "NAME",
        "STATUS",
        "SCHEDULING",
        "VCPUS",
        "MEMORY_MB",
        "LAST_HEARTBEAT",
    ];
    render(&headers, &rows)
}

/// An error message cut to fit a column.
fn short(text: &str) -> String {
    const MAX: usize = 80;
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= MAX {
        return line.to_owned();
    }
    let cut: String = line.chars().take(MAX - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let rows = vec![
            vec!["cap_1".to_owned(), "running".to_owned()],
            vec!["cap_22".to_owned(), "-".to_owned()],
        ];
        assert_eq!(
            render(&["ID", "STATUS"], &rows),
            "ID      STATUS\ncap_1   running\ncap_22  -\n"
        );
    }

    #[test]
    fn hosts_show_a_drain() {
        let host =
            serde_json::json!({"cordoned": true, "drain_requested_at": "2026-01-01T00:00:00Z"});
        assert!(hosts(&[host]).contains("draining"));
    }
}
