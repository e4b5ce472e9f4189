//! Medians, p95 and the verdict against a target; the human table.

use serde::Serialize;

/// Summary of repeated measurements of one quantity (milliseconds unless named otherwise).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub median: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    /// None when there is no sample.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Summary {
            median: percentile(&s, 50.0),
            p95: percentile(&s, 95.0),
            min: s[0],
            max: s[s.len() - 1],
            samples: samples.to_vec(),
        })
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with three significant digits.
pub fn ms(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    coordinator::timeline::fmt_ms(v)
}

/// "ok" when `value` is within `target` (lower is better), else "MISSED by x<factor>".
pub fn verdict_below(value: f64, target: f64) -> String {
    if !value.is_finite() {
        "not measured".into()
    } else if value <= target {
        format!("ok ({:.0}% of target)", 100.0 * value / target)
    } else {
        format!("MISSED by x{:.2}", value / target)
    }
}

/// "ok" when `value` reaches `target` (higher is better).
pub fn verdict_above(value: f64, target: f64) -> String {
    if !value.is_finite() {
        "not measured".into()
    } else if value >= target {
        format!("ok (x{:.2} of target)", value / target)
    } else {
        format!("MISSED by x{:.2}", target / value.max(f64::MIN_POSITIVE))
    }
}

/// A plain text table with left-aligned first column and right-aligned others.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                let pad = width[i] - c.chars().count();
                if i == 0 || i == cols - 1 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
                s.push_str("  ");
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(&self.header);
        out.push_str(&line(&width.iter().map(|w| "-".repeat(*w)).collect()));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 10.0);
        assert_eq!(percentile(&s, 95.0), 19.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }

    #[test]
    fn verdicts_name_the_factor() {
        assert!(verdict_below(10.0, 50.0).starts_with("ok"));
        assert_eq!(verdict_below(100.0, 50.0), "MISSED by x2.00");
        assert_eq!(verdict_above(10_000.0, 20_000.0), "MISSED by x2.00");
    }
}
