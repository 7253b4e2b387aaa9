//! The Prometheus text exposition format (version 0.0.4), written by hand: `# HELP` and
//! `# TYPE` once per family, then its samples, label values and help text escaped as the
//! format asks (`\\`, `\"` and `\n`).
//!
//! Numbers are written the way Prometheus parses them: counts as integers, other values with
//! Rust's shortest round-trip decimal (never an exponent), non-finite ones as `NaN`, `+Inf` and
//! `-Inf`. Histogram bounds are kept in microseconds and written as exact decimal seconds, so
//! a bucket's `le` label never shows floating-point noise such as `0.30000000000000004`.

use super::registry::Histogram;
use std::fmt::Write as _;

/// The content type a scrape is answered with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a family's `# TYPE` line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One scrape's text, built family by family.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn new() -> Text {
        Text::default()
    }

    /// The text written so far.
    pub fn into_string(self) -> String {
        self.out
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Every sample of the family must follow
    /// before the next family starts.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = write!(self.out, "# HELP {name} ");
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.as_str());
    }

    /// One sample with an integer value.
    pub fn int(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One sample with a floating-point value.
    pub fn float(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels, None);
        self.out.push(' ');
        self.push_float(value);
        self.out.push('\n');
    }

    /// A whole histogram family: `_bucket` (cumulative, ending with `le="+Inf"`), `_sum` in
    /// seconds and `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, Kind::Histogram, help);
        let bucket = format!("{name}_bucket");
        let snapshot = histogram.snapshot();
        let mut cumulative = 0;
        for (bound_us, count) in histogram.bounds_us().iter().zip(&snapshot.counts) {
            cumulative += count;
            let le = seconds_text(*bound_us);
            self.name_and_labels(&bucket, &[], Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.name_and_labels(&bucket, &[], Some("+Inf"));
        let _ = writeln!(self.out, " {}", snapshot.count);
        self.float(&format!("{name}_sum"), &[], snapshot.sum_us as f64 / 1e6);
        self.int(&format!("{name}_count"), &[], snapshot.count);
    }

    fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let le = le.map(|le| ("le", le));
        for (i, (label, value)) in labels.iter().copied().chain(le).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(label);
            self.out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn push_float(&mut self, value: f64) {
        if value.is_nan() {
            self.out.push_str("NaN");
        } else if value.is_infinite() {
            self.out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(self.out, "{value}");
        }
    }
}

/// Microseconds as exact decimal seconds: 1_000 -> "0.001", 2_500_000 -> "2.5", 60_000_000 ->
/// "60".
pub fn seconds_text(us: u64) -> String {
    let (whole, fraction) = (us / 1_000_000, us % 1_000_000);
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_exact_decimal_seconds() {
        assert_eq!(seconds_text(500), "0.0005");
        assert_eq!(seconds_text(1_000), "0.001");
        assert_eq!(seconds_text(2_500_000), "2.5");
        assert_eq!(seconds_text(60_000_000), "60");
        assert_eq!(seconds_text(0), "0");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut text = Text::new();
        text.family("x_total", Kind::Counter, "a \\ b\nc \"quoted\"");
        text.int("x_total", &[("type", "a\"b\\c\nd"), ("outcome", "done")], 3);
        assert_eq!(
            text.into_string(),
            "# HELP x_total a \\\\ b\\nc \"quoted\"\n\
             # TYPE x_total counter\n\
             x_total{type=\"a\\\"b\\\\c\\nd\",outcome=\"done\"} 3\n"
        );
    }

    #[test]
    fn floats_never_use_an_exponent_and_infinities_are_spelled_out() {
        let mut text = Text::new();
        text.float("a", &[], 0.3);
        text.float("b", &[], 1e-7);
        text.float("c", &[], f64::INFINITY);
        text.float("d", &[], f64::NAN);
        text.float("e", &[], 2.0);
        assert_eq!(
            text.into_string(),
            "a 0.3\nb 0.0000001\nc +Inf\nd NaN\ne 2\n"
        );
    }

    #[test]
    fn a_histogram_is_cumulative_and_ends_with_inf() {
        let histogram = Histogram::new(&[1_000, 10_000]);
        histogram.observe_us(500);
        histogram.observe_us(1_000);
        histogram.observe_us(5_000);
        histogram.observe_us(20_000);
        let mut text = Text::new();
        text.histogram("w_seconds", "Wait.", &histogram);
        assert_eq!(
            text.into_string(),
            "# HELP w_seconds Wait.\n\
             # TYPE w_seconds histogram\n\
             w_seconds_bucket{le=\"0.001\"} 2\n\
             w_seconds_bucket{le=\"0.01\"} 3\n\
             w_seconds_bucket{le=\"+Inf\"} 4\n\
             w_seconds_sum 0.0265\n\
             w_seconds_count 4\n"
        );
    }
}
