//! Line charts as plain SVG text: axes, ticks, grid, polylines, a legend and marker lines.
//!
//! The benches draw a handful of small charts; a plotting crate would bring a font stack and a
//! rasteriser for that. SVG viewers lay out text themselves, so labels only name a generic
//! font family and no font file is involved.

use std::fmt::Write as _;

/// Colours that stay apart on white and for common colour-vision deficiencies (Okabe-Ito).
pub const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// How values map onto an axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    Linear,
    /// Base-10 logarithmic; every value must be positive.
    Log,
}

/// One axis: its range, scale, label and (optionally) where the ticks go.
#[derive(Clone, Debug)]
pub struct Axis {
    pub label: String,
    pub min: f64,
    pub max: f64,
    pub scale: Scale,
    /// Tick positions and their labels; empty: chosen automatically (linear axes only).
    pub ticks: Vec<(f64, String)>,
}

impl Axis {
    pub fn linear(label: &str, min: f64, max: f64) -> Axis {
        Axis {
            label: label.to_owned(),
            min,
            max,
            scale: Scale::Linear,
            ticks: Vec::new(),
        }
    }

    pub fn log(label: &str, min: f64, max: f64, ticks: &[(f64, &str)]) -> Axis {
        Axis {
            label: label.to_owned(),
            min,
            max,
            scale: Scale::Log,
            ticks: ticks.iter().map(|(v, l)| (*v, (*l).to_owned())).collect(),
        }
    }

    /// Where `value` falls between `min` (0.0) and `max` (1.0).
    fn fraction(&self, value: f64) -> f64 {
        let (lo, hi, v) = match self.scale {
            Scale::Linear => (self.min, self.max, value),
            Scale::Log => (
                self.min.log10(),
                self.max.log10(),
                value.max(f64::MIN_POSITIVE).log10(),
            ),
        };
        if hi > lo { (v - lo) / (hi - lo) } else { 0.5 }
    }

    fn tick_marks(&self) -> Vec<(f64, String)> {
        if !self.ticks.is_empty() {
            return self.ticks.clone();
        }
        nice_ticks(self.min, self.max, 6)
            .into_iter()
            .map(|v| (v, format_number(v)))
            .collect()
    }
}

/// Evenly spaced round numbers (steps of 1, 2 or 5 times a power of ten) covering min..=max.
pub fn nice_ticks(min: f64, max: f64, about: usize) -> Vec<f64> {
    if max <= min || about == 0 {
        return vec![min];
    }
    let raw = (max - min) / about as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    let first = (min / step).ceil() as i64;
    let last = (max / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A number as a tick label: no trailing zeros, thousands as "k".
pub fn format_number(value: f64) -> String {
    if value.abs() >= 10_000.0 && (value / 1000.0).fract().abs() < 1e-9 {
        return format!("{}k", value / 1000.0);
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// One line on a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: String,
    pub dashed: bool,
    /// Draw a dot at each point (for sparse measurements, not time series).
    pub markers: bool,
}

impl Series {
    pub fn new(label: &str, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            label: label.to_owned(),
            points,
            color: color.to_owned(),
            dashed: false,
            markers: false,
        }
    }

    pub fn with_markers(mut self) -> Series {
        self.markers = true;
        self
    }

    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

/// A marker line across a panel, with a short label.
#[derive(Clone, Debug)]
pub struct Marker {
    pub at: f64,
    pub label: String,
    /// For a horizontal line: put the label at the right end instead of the left.
    pub label_right: bool,
}

impl Marker {
    pub fn new(at: f64, label: &str) -> Marker {
        Marker {
            at,
            label: label.to_owned(),
            label_right: false,
        }
    }

    pub fn label_right(mut self) -> Marker {
        self.label_right = true;
        self
    }
}

/// One chart: two axes, its lines, and marker lines.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    /// Vertical lines at these x values (phase changes).
    pub x_markers: Vec<Marker>,
    /// Horizontal lines at these y values (targets, capacity).
    pub y_markers: Vec<Marker>,
}

impl Panel {
    pub fn new(title: &str, x: Axis, y: Axis) -> Panel {
        Panel {
            title: title.to_owned(),
            x,
            y,
            series: Vec::new(),
            x_markers: Vec::new(),
            y_markers: Vec::new(),
        }
    }
}

/// Panels stacked vertically under one title.
#[derive(Clone, Debug)]
pub struct Figure {
    pub title: String,
    pub width: f64,
    pub panel_height: f64,
    pub panels: Vec<Panel>,
    /// A line of small print under the panels (what was measured, how).
    pub note: String,
}

const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 190.0;
const TITLE_HEIGHT: f64 = 34.0;
const PANEL_TOP: f64 = 26.0;
const PANEL_BOTTOM: f64 = 46.0;
const NOTE_HEIGHT: f64 = 26.0;

impl Figure {
    pub fn new(title: &str) -> Figure {
        Figure {
            title: title.to_owned(),
            width: 860.0,
            panel_height: 300.0,
            panels: Vec::new(),
            note: String::new(),
        }
    }

    /// The whole document.
    pub fn render(&self) -> String {
        let panel_total = self.panel_height + PANEL_TOP + PANEL_BOTTOM;
        let height = TITLE_HEIGHT
            + panel_total * self.panels.len() as f64
            + if self.note.is_empty() {
                0.0
            } else {
                NOTE_HEIGHT
            };
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{height:.0}" viewBox="0 0 {w:.0} {height:.0}" font-family="sans-serif" font-size="12">"#,
            w = self.width
        );
        let _ = writeln!(
            out,
            r#"<rect x="0" y="0" width="{:.0}" height="{height:.0}" fill="white"/>"#,
            self.width
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="22" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
            self.width / 2.0,
            escape(&self.title)
        );
        for (i, panel) in self.panels.iter().enumerate() {
            let top = TITLE_HEIGHT + panel_total * i as f64 + PANEL_TOP;
            self.render_panel(&mut out, panel, top);
        }
        if !self.note.is_empty() {
            let _ = writeln!(
                out,
                r##"<text x="{MARGIN_LEFT:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
                height - 9.0,
                escape(&self.note)
            );
        }
        out.push_str("</svg>\n");
        out
    }

    fn render_panel(&self, out: &mut String, panel: &Panel, top: f64) {
        let left = MARGIN_LEFT;
        let width = self.width - MARGIN_LEFT - MARGIN_RIGHT;
        let height = self.panel_height;
        let bottom = top + height;
        let px = |x: f64| left + panel.x.fraction(x).clamp(-0.02, 1.02) * width;
        let py = |y: f64| bottom - panel.y.fraction(y).clamp(-0.02, 1.02) * height;

        let _ = writeln!(
            out,
            r#"<text x="{left:.1}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
            top - 8.0,
            escape(&panel.title)
        );
        // Grid and ticks.
        for (value, label) in panel.y.tick_marks() {
            if value < panel.y.min - 1e-9 || value > panel.y.max + 1e-9 {
                continue;
            }
            let y = py(value);
            let _ = writeln!(
                out,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##,
                left + width
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                escape(&label)
            );
        }
        for (value, label) in panel.x.tick_marks() {
            if value < panel.x.min - 1e-9 || value > panel.x.max + 1e-9 {
                continue;
            }
            let x = px(value);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#e4e4e4"/>"##
            );
            let _ = writeln!(
                out,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                bottom + 16.0,
                escape(&label)
            );
        }
        // Axes.
        let _ = writeln!(
            out,
            r#"<rect x="{left:.1}" y="{top:.1}" width="{width:.1}" height="{height:.1}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + width / 2.0,
            bottom + 34.0,
            escape(&panel.x.label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            left - 50.0,
            top + height / 2.0,
            escape(&panel.y.label)
        );
        // Marker lines.
        for marker in &panel.y_markers {
            let y = py(marker.at);
            let _ = writeln!(
                out,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="2,3"/>"##,
                left + width
            );
            let (x, anchor) = if marker.label_right {
                (left + width - 4.0, "end")
            } else {
                (left + 4.0, "start")
            };
            let _ = writeln!(
                out,
                r##"<text x="{x:.1}" y="{:.1}" font-size="10" fill="#555" text-anchor="{anchor}">{}</text>"##,
                y - 3.0,
                escape(&marker.label)
            );
        }
        for marker in &panel.x_markers {
            let x = px(marker.at);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#888" stroke-dasharray="4,3"/>"##
            );
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
                x + 3.0,
                top + 11.0,
                escape(&marker.label)
            );
        }
        // Lines.
        for series in &panel.series {
            if series.points.is_empty() {
                continue;
            }
            let points: Vec<String> = series
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let dash = if series.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                series.color,
                points.join(" ")
            );
            if series.markers {
                for &(x, y) in &series.points {
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                        px(x),
                        py(y),
                        series.color
                    );
                }
            }
        }
        // Legend, right of the plot area.
        let legend_x = left + width + 14.0;
        for (i, series) in panel.series.iter().enumerate() {
            let y = top + 12.0 + 20.0 * i as f64;
            let dash = if series.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<line x1="{legend_x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
                legend_x + 24.0,
                series.color
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                legend_x + 30.0,
                y + 4.0,
                escape(&series.label)
            );
        }
    }
}

/// Text safe inside an SVG element.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
