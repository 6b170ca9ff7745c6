//! Summaries of samples and the markdown rows every benchmark prints.

/// Order statistics of a set of samples (any unit; the caller names it).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Summary {
            n: s.len(),
            min: s[0],
            p25: quantile(&s, 0.25),
            p50: quantile(&s, 0.50),
            p75: quantile(&s, 0.75),
            p99: quantile(&s, 0.99),
            max: s[s.len() - 1],
        })
    }
}

/// Linear interpolation between closest ranks, on sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The median of a few values (e.g. per-round rates).
pub fn median(values: &[f64]) -> f64 {
    Summary::of(values).map_or(f64::NAN, |s| s.p50)
}

/// Header of a latency table (milliseconds).
pub fn latency_header(title: &str) {
    println!();
    println!("### {title}");
    println!();
    println!("| measure | p50 ms | p99 ms | min ms | IQR ms (p25–p75) | max ms | n | target |");
    println!("|---|---:|---:|---:|---|---:|---:|---|");
}

/// One latency row; `target` is free text such as `p50 ≤ 5, p99 ≤ 25 → met`.
pub fn latency_row(name: &str, samples_ms: &[f64], target: &str) {
    match Summary::of(samples_ms) {
        Some(s) => println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2}–{:.2} | {:.2} | {} | {target} |",
            s.p50, s.p99, s.min, s.p25, s.p75, s.max, s.n
        ),
        None => println!("| {name} | – | – | – | – | – | 0 | {target} |"),
    }
}

/// "met" / "MISSED" for a latency target on p50 and p99.
pub fn verdict(samples_ms: &[f64], p50_max: f64, p99_max: f64) -> String {
    match Summary::of(samples_ms) {
        Some(s) => {
            let ok = s.p50 <= p50_max && s.p99 <= p99_max;
            format!(
                "p50 ≤ {p50_max}, p99 ≤ {p99_max}: {}",
                if ok { "met" } else { "MISSED" }
            )
        }
        None => "no samples".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!(
            (s.min, s.p25, s.p50, s.p75, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        assert_eq!(s.n, 5);
        assert!((s.p99 - 4.96).abs() < 1e-9);
        assert_eq!(median(&[3.0, 1.0]), 2.0);
        assert!(Summary::of(&[]).is_none());
    }
}
