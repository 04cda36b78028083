//! An SVG chart of a phase over time: throughput (answers per second) and latency (mean
//! and max of the answers completed in each second). Plain SVG, no dependencies.
//!
//! The x axis is the time of the scenario's load, which leaves the ceiling phases out:
//! where one ran (between rounds) a dashed line marks it; the crash scenario's kill is a
//! red line, after which there is no load.

use std::fmt::Write;

use crate::report::Report;

const WIDTH: f64 = 800.0;
const PLOT_HEIGHT: f64 = 200.0;
/// Room for the y axis' labels on the left.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
/// Room above a plot (its title and legend) and below it (the x axis' labels).
const MARGIN: f64 = 60.0;

fn polyline(points: &[(f64, f64)], colour: &str) -> String {
    let mut out = String::from("<polyline fill=\"none\" stroke-width=\"2\" ");
    let _ = write!(out, "stroke=\"{colour}\" points=\"");
    for (x, y) in points {
        let _ = write!(out, "{x:.1},{y:.1} ");
    }
    out.push_str("\"/>\n");
    // A line needs two points: a run of one whole second is a dot.
    if let [(x, y)] = points {
        let _ = writeln!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{colour}\"/>"
        );
    }
    out
}

/// A step of 1, 2 or 5 times a power of ten that cuts `span` into at most `most` parts.
fn tick_step(span: f64, most: usize) -> f64 {
    let raw = (span / most.max(1) as f64).max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

/// A value for an axis label: no decimals unless it needs them.
fn label(value: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{value:.0}")
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

/// Vertical marks across a plot: (second, colour, dashed, label).
type Mark<'a> = (f64, &'a str, bool, &'a str);

/// One plot: series of (second, value), scaled into the band starting at `top`.
fn plot(
    out: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    series: &[(&str, &str, Vec<f64>)],
    marks: &[Mark],
) {
    // The axis spans the whole seconds of the timeline (each second's value is drawn at
    // its middle) and every mark (a kill in the last, partial second).
    let seconds = marks.iter().map(|m| m.0.ceil()).fold(
        series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(1) as f64,
        f64::max,
    );
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let y_step = tick_step(max, 4);
    // The axis ends on a tick at or above the highest value.
    let y_max = (max / y_step).ceil() * y_step;
    let plot_width = WIDTH - LEFT - RIGHT;
    let x = |second: f64| LEFT + plot_width * second / seconds;
    let y = |v: f64| top + PLOT_HEIGHT - PLOT_HEIGHT * v / y_max;
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"{:.0}\" font-size=\"14\">{title}</text>",
        top - 24.0
    );
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{plot_width}\" height=\"{PLOT_HEIGHT}\" fill=\"none\" stroke=\"#ccc\"/>",
    );
    // y axis: ticks and grid lines, labels right-aligned left of the border, unit above.
    let _ = writeln!(
        out,
        "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">{unit}</text>",
        LEFT - 6.0,
        top - 6.0
    );
    let mut tick = 0.0;
    while tick <= y_max + y_step / 2.0 {
        let at = y(tick);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{at:.1}\" x2=\"{:.1}\" y2=\"{at:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{:.0}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            LEFT + plot_width,
            LEFT - 6.0,
            at + 4.0,
            label(tick, y_step)
        );
        tick += y_step;
    }
    // x axis: a tick every 1, 2, 5, 10... seconds.
    let x_step = tick_step(seconds, 10).max(1.0);
    let mut second = 0.0;
    while second <= seconds + 1e-9 {
        let at = x(second);
        let _ = writeln!(
            out,
            "<line x1=\"{at:.1}\" y1=\"{:.0}\" x2=\"{at:.1}\" y2=\"{:.0}\" stroke=\"#999\"/>\n\
             <text x=\"{at:.1}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"middle\">{second:.0}</text>",
            top + PLOT_HEIGHT,
            top + PLOT_HEIGHT + 4.0,
            top + PLOT_HEIGHT + 16.0,
        );
        second += x_step;
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">seconds of load</text>",
        LEFT + plot_width,
        top + PLOT_HEIGHT + 30.0,
    );
    for (second, colour, dashed, name) in marks {
        if *second < 0.0 || *second > seconds {
            continue;
        }
        let at = x(*second);
        let dash = if *dashed {
            " stroke-dasharray=\"4 3\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<line x1=\"{at:.1}\" y1=\"{top}\" x2=\"{at:.1}\" y2=\"{:.0}\" stroke=\"{colour}\"{dash}/>\n\
             <text x=\"{:.1}\" y=\"{:.0}\" font-size=\"10\" fill=\"{colour}\">{name}</text>",
            top + PLOT_HEIGHT,
            at + 3.0,
            top + 11.0,
        );
    }
    let mut legend_x = LEFT + plot_width - 180.0;
    for (name, colour, values) in series {
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (x(i as f64 + 0.5), y(*v)))
            .collect();
        out.push_str(&polyline(&points, colour));
        let _ = writeln!(
            out,
            "<text x=\"{legend_x:.0}\" y=\"{:.0}\" font-size=\"11\" fill=\"{colour}\">{name}</text>",
            top - 6.0
        );
        legend_x += 90.0;
    }
}

/// The chart of the report's main phase.
pub fn svg(report: &Report) -> String {
    let t = &report.timeline;
    let rps: Vec<f64> = t.iter().map(|s| s.requests_per_second).collect();
    let mean: Vec<f64> = t.iter().map(|s| s.mean_ms).collect();
    let max: Vec<f64> = t.iter().map(|s| s.max_ms).collect();
    let height = 2.0 * PLOT_HEIGHT + 4.0 * MARGIN;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    // Ceiling phases between rounds (the first and the last are before and after the load).
    let ceilings = report.ceilings_at_s.len();
    let mut marks: Vec<Mark> = report
        .ceilings_at_s
        .iter()
        .enumerate()
        .filter(|(i, _)| *i > 0 && *i + 1 < ceilings)
        .map(|(_, &at)| (at, "#7f7f7f", true, "ceiling phase"))
        .collect();
    if let Some(at) = report.killed_at_s {
        marks.push((at, "#d62728", false, "kill -9"));
    }
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
        &marks,
    );
    plot(
        &mut out,
        3.0 * MARGIN + PLOT_HEIGHT,
        "latency of the answers completed each second",
        "ms",
        &[("mean", "#2ca02c", mean), ("max", "#d62728", max)],
        &marks,
    );
    if ceilings > 2 {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{:.0}\" font-size=\"11\" fill=\"#555\">Ceiling phases (GET /health) ran before the load, at each dashed line and after it; their time is not shown.</text>",
            height - 12.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::driver::{PhaseStats, Second};

    /// A report of `seconds` seconds of load at 1000 answers a second.
    fn report(seconds: usize) -> Report {
        let mut stats = PhaseStats::new();
        stats.timeline = vec![
            Second {
                requests: 1000,
                latency_sum_us: 1_000_000,
                latency_max_us: 5_000,
            };
            seconds + 1
        ];
        stats.requests = 1000 * seconds as u64;
        stats.elapsed = Duration::from_secs(seconds as u64);
        stats.whole_seconds = seconds;
        Report::new("flash-sale", &stats, &stats)
    }

    #[test]
    fn the_chart_marks_the_ceiling_phases_and_the_kill_and_labels_its_axes() {
        let mut interleaved = report(12);
        interleaved.ceilings_at_s = vec![0.0, 4.0, 8.0, 12.0];
        let chart = svg(&interleaved);
        // The two between the rounds, in each plot.
        assert_eq!(chart.matches(">ceiling phase<").count(), 4, "{chart}");
        assert!(!chart.contains("kill -9"));
        // Seconds 0, 2, ... 12 under each plot, not only the last one.
        for second in ["0", "6", "12"] {
            let tick = format!("text-anchor=\"middle\">{second}</text>");
            assert_eq!(chart.matches(&tick).count(), 2, "{second}: {chart}");
        }
        // The y labels end left of the plot's border.
        assert!(chart.contains(&format!(
            "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">req/s</text>",
            LEFT - 6.0,
            MARGIN - 6.0
        )));

        let mut crash = report(6);
        crash.killed_at_s = Some(3.5);
        let chart = svg(&crash);
        assert_eq!(chart.matches(">kill -9<").count(), 2, "{chart}");
        // A kill in the last, partial second (not on the timeline) is still drawn.
        crash.killed_at_s = Some(6.3);
        let chart = svg(&crash);
        assert_eq!(chart.matches(">kill -9<").count(), 2, "{chart}");
        assert!(!chart.contains("ceiling phase"));
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(10.0, 10), 1.0);
        assert_eq!(tick_step(23.0, 10), 5.0);
        assert_eq!(tick_step(60_000.0, 4), 20_000.0);
        assert_eq!(tick_step(0.8, 4), 0.2);
        assert_eq!(label(0.4, 0.2), "0.4");
        assert_eq!(label(20_000.0, 5_000.0), "20000");
    }
}
