//! An SVG chart of a phase over time: throughput (answers per second) and latency (mean
//! and max of the answers completed in each second). Plain SVG, no dependencies.

use std::fmt::Write;

use crate::report::Report;

const WIDTH: f64 = 800.0;
const PLOT_HEIGHT: f64 = 200.0;
const MARGIN: f64 = 60.0;

fn polyline(points: &[(f64, f64)], colour: &str) -> String {
    let mut out = String::from("<polyline fill=\"none\" stroke-width=\"2\" ");
    let _ = write!(out, "stroke=\"{colour}\" points=\"");
    for (x, y) in points {
        let _ = write!(out, "{x:.1},{y:.1} ");
    }
    out.push_str("\"/>\n");
    out
}

/// One plot: series of (second, value), scaled into the band starting at `top`.
fn plot(out: &mut String, top: f64, title: &str, unit: &str, series: &[(&str, &str, Vec<f64>)]) {
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let x = |i: usize| MARGIN + (WIDTH - 2.0 * MARGIN) * i as f64 / (n - 1) as f64;
    let y = |v: f64| top + PLOT_HEIGHT - PLOT_HEIGHT * v / max;
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN}\" y=\"{:.0}\" font-size=\"14\">{title}</text>",
        top - 8.0
    );
    let _ = writeln!(
        out,
        "<rect x=\"{MARGIN}\" y=\"{top}\" width=\"{}\" height=\"{PLOT_HEIGHT}\" fill=\"none\" stroke=\"#ccc\"/>",
        WIDTH - 2.0 * MARGIN
    );
    let _ = writeln!(
        out,
        "<text x=\"4\" y=\"{:.0}\" font-size=\"11\">{max:.1} {unit}</text>",
        top + 10.0
    );
    let _ = writeln!(
        out,
        "<text x=\"4\" y=\"{:.0}\" font-size=\"11\">0</text>",
        top + PLOT_HEIGHT
    );
    let mut legend_x = WIDTH - MARGIN - 200.0;
    for (name, colour, values) in series {
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (x(i), y(*v)))
            .collect();
        out.push_str(&polyline(&points, colour));
        let _ = writeln!(
            out,
            "<text x=\"{legend_x:.0}\" y=\"{:.0}\" font-size=\"11\" fill=\"{colour}\">{name}</text>",
            top - 8.0
        );
        legend_x += 100.0;
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\">{} s</text>",
        WIDTH - MARGIN - 20.0,
        top + PLOT_HEIGHT + 14.0,
        n - 1
    );
}

/// The chart of the report's main phase.
pub fn svg(report: &Report) -> String {
    let t = &report.timeline;
    let rps: Vec<f64> = t.iter().map(|s| s.requests_per_second).collect();
    let mean: Vec<f64> = t.iter().map(|s| s.mean_ms).collect();
    let max: Vec<f64> = t.iter().map(|s| s.max_ms).collect();
    let height = 2.0 * PLOT_HEIGHT + 3.0 * MARGIN;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let title = format!(
        "{}: throughput (ceiling {:.0} req/s, ratio {:.2})",
        report.scenario, report.ceiling_rps, report.ratio
    );
    plot(
        &mut out,
        MARGIN,
        &title,
        "req/s",
        &[("answers/s", "#1f77b4", rps)],
    );
    plot(
        &mut out,
        2.0 * MARGIN + PLOT_HEIGHT,
        "latency of the answers completed each second",
        "ms",
        &[("mean", "#2ca02c", mean), ("max", "#d62728", max)],
    );
    out.push_str("</svg>\n");
    out
}
