//! CPU accounting from /proc, to show where a benchmark's time goes: the CPU seconds each
//! process used and how busy the whole machine was (other engineers' builds included).

use std::collections::HashMap;

/// Linux's USER_HZ on every mainstream architecture.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds of a process (user + system), `None` once it is gone.
pub fn process_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// (busy, total) CPU seconds of the machine since boot, all cores together.
pub fn machine_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0.0, 0.0);
    }
    let idle = v[3] + v[4];
    let total: f64 = v.iter().sum();
    ((total - idle) / TICKS_PER_SEC, total / TICKS_PER_SEC)
}

/// CPU use of named processes and of the machine, between two moments.
#[derive(Clone)]
pub struct Snapshot {
    processes: HashMap<String, f64>,
    machine: (f64, f64),
}

impl Snapshot {
    /// `pids` by name; the bench process itself is added as `bench`.
    pub fn take(pids: &[(String, u32)]) -> Snapshot {
        let mut processes: HashMap<String, f64> = pids
            .iter()
            .filter_map(|(n, p)| process_secs(*p).map(|s| (n.clone(), s)))
            .collect();
        if let Some(s) = process_secs(std::process::id()) {
            processes.insert("bench".into(), s);
        }
        Snapshot {
            processes,
            machine: machine_secs(),
        }
    }

    /// CPU seconds used since `earlier`, grouped by the process name up to its first `-`
    /// (`worker-0`, `worker-1` → `worker`), sorted by name, then `machine busy` (every
    /// process on the machine) and the machine's busy fraction (0..=1).
    pub fn since(&self, earlier: &Snapshot) -> (Vec<(String, f64)>, f64, f64) {
        let mut groups: HashMap<String, f64> = HashMap::new();
        for (name, secs) in &self.processes {
            let before = earlier.processes.get(name).copied().unwrap_or(0.0);
            let group = name.split('-').next().unwrap_or(name).to_owned();
            *groups.entry(group).or_default() += secs - before;
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        let busy = self.machine.0 - earlier.machine.0;
        let total = self.machine.1 - earlier.machine.1;
        let fraction = if total > 0.0 { busy / total } else { 0.0 };
        (groups, busy, fraction)
    }
}

/// A one-line account: `api 3.1 s, bench 2.0 s, …; machine busy 12.3 s (96 % of 2 CPUs)`.
pub fn describe(now: &Snapshot, earlier: &Snapshot) -> String {
    let (groups, busy, fraction) = now.since(earlier);
    let parts: Vec<String> = groups
        .iter()
        .map(|(n, s)| format!("{n} {s:.1} s"))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ours: f64 = groups.iter().map(|g| g.1).sum();
    format!(
        "{}; machine busy {busy:.1} CPU-s ({:.0} % of {cpus} CPUs), of which other processes (builds, other tests) {:.1} CPU-s",
        parts.join(", "),
        fraction * 100.0,
        busy - ours
    )
}
