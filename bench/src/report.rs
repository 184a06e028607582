//! Markdown tables of the results: one per scenario, a row per (case, target), the median of
//! the repetitions in each cell, followed by its ratios to `direct` (d) and `haproxy` (h).
//!
//! A ratio is this target's median divided by the reference's median for the same case. Which
//! ratios a column shows is part of the column: rates and latencies compare with both, proxy CPU
//! and memory only with haproxy (direct has no proxy), counts with nothing. Failed or skipped
//! runs show their reason instead of figures; a failure of some repetitions only is footnoted.

use std::fmt::Write as _;

use crate::scenarios::{Metrics, Scenario};
use crate::stats::median;
use crate::targets::Kind;

/// One figure of a scenario's table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub key: &'static str,
    pub title: &'static str,
    pub decimals: usize,
    pub vs_direct: bool,
    pub vs_haproxy: bool,
}

impl Column {
    const fn new(
        key: &'static str,
        title: &'static str,
        decimals: usize,
        d: bool,
        h: bool,
    ) -> Column {
        Column {
            key,
            title,
            decimals,
            vs_direct: d,
            vs_haproxy: h,
        }
    }

    /// A rate (higher is better): compared with direct and haproxy.
    pub const fn rate(key: &'static str, title: &'static str, decimals: usize) -> Column {
        Column::new(key, title, decimals, true, true)
    }

    /// A latency (lower is better): compared with direct and haproxy.
    pub const fn latency(key: &'static str, title: &'static str, decimals: usize) -> Column {
        Column::new(key, title, decimals, true, true)
    }

    /// A cost of the proxy itself (CPU, memory): compared with haproxy only.
    pub const fn cpu(key: &'static str, title: &'static str, decimals: usize) -> Column {
        Column::new(key, title, decimals, false, true)
    }

    /// A count or a loss figure: no ratio.
    pub const fn plain(key: &'static str, title: &'static str, decimals: usize) -> Column {
        Column::new(key, title, decimals, false, false)
    }
}

/// What one repetition of one (case, target) produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok(Metrics),
    Failed(String),
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct Row {
    pub case: &'static str,
    pub target: Kind,
    pub runs: Vec<Outcome>,
}

impl Row {
    /// Median of `key` over the successful repetitions that have it.
    pub fn median(&self, key: &str) -> Option<f64> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|o| match o {
                Outcome::Ok(m) => m.get(key).copied(),
                _ => None,
            })
            .collect();
        median(&values)
    }

    fn any_ok(&self) -> bool {
        self.runs.iter().any(|o| matches!(o, Outcome::Ok(_)))
    }

    fn first_reason(&self) -> Option<String> {
        self.runs.iter().find_map(|o| match o {
            Outcome::Failed(e) => Some(format!("failed: {e}")),
            Outcome::Skipped(e) => Some(e.clone()),
            Outcome::Ok(_) => None,
        })
    }
}

/// The results of one scenario.
#[derive(Debug, Clone)]
pub struct Table {
    pub scenario: Scenario,
    pub rows: Vec<Row>,
    /// Lines printed under the table (scaled-down counts and the like).
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(scenario: Scenario) -> Table {
        Table {
            scenario,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The row of `target` for `case`, created on first use.
    pub fn row(&mut self, case: &'static str, target: Kind) -> &mut Row {
        let i = match self
            .rows
            .iter()
            .position(|r| r.case == case && r.target == target)
        {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    case,
                    target,
                    runs: Vec::new(),
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[i]
    }

    fn reference(&self, case: &str, kind: Kind, key: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.case == case && r.target == kind)
            .and_then(|r| r.median(key))
            .filter(|v| *v != 0.0)
    }

    pub fn render(&self) -> String {
        let columns = self.scenario.columns();
        let has_haproxy = self
            .rows
            .iter()
            .any(|r| r.target == Kind::Haproxy && r.any_ok());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### {}: {}\n",
            self.scenario.name(),
            self.scenario.title()
        );
        out.push_str("| case | target |");
        for c in columns {
            let _ = write!(out, " {} |", c.title);
        }
        out.push_str("\n|---|---|");
        for _ in columns {
            out.push_str("---:|");
        }
        out.push('\n');
        let mut footnotes = Vec::new();
        for row in &self.rows {
            let _ = write!(out, "| {} | {} |", row.case, row.target.name());
            if !row.any_ok() {
                let reason = row.first_reason().unwrap_or_else(|| "no run".into());
                let _ = write!(out, " {} |", short(&reason));
                for _ in 1..columns.len() {
                    out.push_str(" |");
                }
                out.push('\n');
            } else {
                for c in columns {
                    let _ = write!(out, " {} |", self.cell(row, c, has_haproxy));
                }
                out.push('\n');
            }
            // One footnote per distinct failure of a row, naming the repetitions it hit.
            let mut failures: Vec<(String, Vec<usize>)> = Vec::new();
            for (i, o) in row.runs.iter().enumerate() {
                if let Outcome::Failed(e) = o {
                    let e = e.replace('\n', " ");
                    match failures.iter_mut().find(|(m, _)| *m == e) {
                        Some((_, reps)) => reps.push(i + 1),
                        None => failures.push((e, vec![i + 1])),
                    }
                }
            }
            for (e, reps) in failures {
                let reps: Vec<String> = reps.iter().map(usize::to_string).collect();
                footnotes.push(format!(
                    "{} / {} failed in rep {}: {e}",
                    row.case,
                    row.target.name(),
                    reps.join(", ")
                ));
            }
        }
        out.push_str("\nMedians of the repetitions. In parentheses: d = ratio to direct, h = ratio to haproxy (value ÷ reference).\n");
        for note in self.notes.iter().chain(&footnotes) {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    fn cell(&self, row: &Row, c: &Column, has_haproxy: bool) -> String {
        let Some(v) = row.median(c.key) else {
            return "—".to_string();
        };
        let mut ratios = Vec::new();
        if c.vs_direct && row.target != Kind::Direct {
            if let Some(r) = self.reference(row.case, Kind::Direct, c.key) {
                ratios.push(format!("d {:.2}×", v / r));
            }
        }
        // direct is the baseline: its own ratio to haproxy would only repeat haproxy's d.
        if c.vs_haproxy && has_haproxy && !matches!(row.target, Kind::Haproxy | Kind::Direct) {
            if let Some(r) = self.reference(row.case, Kind::Haproxy, c.key) {
                ratios.push(format!("h {:.2}×", v / r));
            }
        }
        let value = number(v, c.decimals);
        if ratios.is_empty() {
            value
        } else {
            format!("{value} ({})", ratios.join(", "))
        }
    }
}

/// A reason short enough for a table cell (the footnotes have it whole).
fn short(reason: &str) -> String {
    let one_line = reason.replace('|', "/").replace('\n', " ");
    match one_line.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// `v` with `decimals` places and thin grouping of thousands in the integer part.
pub fn number(v: f64, decimals: usize) -> String {
    let text = format!("{v:.decimals$}");
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", text.as_str()),
    };
    let (int, frac) = match rest.find('.') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if int.len() <= 4 {
        return text;
    }
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{sign}{grouped}{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_group_thousands() {
        assert_eq!(number(1234.5, 1), "1234.5");
        assert_eq!(number(123456.0, 0), "123,456");
        assert_eq!(number(-1234567.25, 2), "-1,234,567.25");
        assert_eq!(number(0.5, 2), "0.50");
    }

    #[test]
    fn ratios_use_medians_of_the_same_case() {
        let mut t = Table::new(Scenario::PingPong);
        let run = |rps: f64| {
            let mut m = Metrics::new();
            m.insert("rps", rps);
            Outcome::Ok(m)
        };
        t.row("1 conn", Kind::Direct).runs = vec![run(100.0), run(300.0), run(200.0)];
        t.row("1 conn", Kind::Sluice).runs = vec![run(50.0), run(100.0), run(150.0)];
        t.row("1 conn", Kind::Haproxy).runs = vec![run(80.0)];
        let text = t.render();
        assert!(
            text.contains("| 1 conn | sluice | 100 (d 0.50×, h 1.25×) |"),
            "{text}"
        );
        assert!(text.contains("| 1 conn | direct | 200 |"), "{text}");
    }

    #[test]
    fn failed_rows_show_their_reason() {
        let mut t = Table::new(Scenario::Udp);
        t.row("ping-pong", Kind::Haproxy).runs = vec![Outcome::Skipped("n/a: no UDP".into())];
        let text = t.render();
        assert!(
            text.contains("| ping-pong | haproxy | n/a: no UDP |"),
            "{text}"
        );
    }
}
