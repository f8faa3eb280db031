//! PNG plots (feature `plot`): the sweep's time and speed-up against context length, recall
//! against keys scanned for the index benchmark, task scores against prompt length.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::eval::{TaskRow, mean_score};
use crate::stats::{Summary, curve};
use crate::sweep::{SweepReport, tokens};

fn err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::Plot { path: path.to_path_buf(), reason: e.to_string() }
}

/// Distinct, readable line colours (no yellow on white).
fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(0, 0, 0),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// Two panels against context length (log 2): one layer's decode-attention time per step, and
/// the speed-up over `full`; one line per selector.
pub fn sweep(report: &SweepReport, path: &Path) -> Result<()> {
    let err = err(path);
    let contexts = report.contexts();
    if report.rows.is_empty() {
        return Err(err(&"nothing to plot: the report has no rows"));
    }
    let mut selectors: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !selectors.contains(&r.selector.as_str()) {
            selectors.push(&r.selector);
        }
    }
    let x = |n: usize| (n as f64).log2();
    let (x0, x1) = (x(contexts[0]) - 0.3, x(contexts[contexts.len() - 1]) + 0.3);
    let times: Vec<f64> = report.rows.iter().map(|r| r.step_ms).filter(|t| *t > 0.0).collect();
    let (tmin, tmax) = (times.iter().copied().fold(f64::INFINITY, f64::min), times.iter().copied().fold(0.0, f64::max));
    if tmax <= 0.0 {
        return Err(err(&"nothing to plot: no positive step times"));
    }
    let speeds: Vec<f64> = report.rows.iter().filter_map(|r| r.speedup).filter(|s| *s > 0.0).collect();
    let smax = speeds.iter().copied().fold(1.0, f64::max);
    let smin = speeds.iter().copied().fold(1.0, f64::min);

    let root = BitMapBackend::new(path, (1500, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title, body) = root.split_vertically(50);
    let caption = format!(
        "Decode attention, one layer ({} KV heads × {} query heads, dim {}), 1 thread; medians of {} steps",
        report.n_kv_heads, report.n_q_heads, report.head_dim, report.args.steps
    );
    title.draw(&Text::new(caption, (20, 15), ("sans-serif", 24).into_font())).map_err(|e| err(&e))?;
    let (left, right) = body.split_horizontally(750);
    // Ticks only at powers of two: the contexts are powers of two by default.
    let fmt_x = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 { tokens(2f64.powf(v.round()) as usize) } else { String::new() }
    };

    let mut c = ChartBuilder::on(&left)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (tmin * 0.7..tmax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("context (keys per head)")
        .y_desc("ms per decode step (select + attend), log")
        .x_labels(contexts.len() + 1)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&|v| if *v >= 1.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, sel) in selectors.iter().enumerate() {
        let style = color(i).stroke_width(3);
        let pts: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| r.selector == *sel && r.step_ms > 0.0)
            .map(|r| (x(r.context), r.step_ms))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|e| err(&e))?
            .label(sel.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 25, y)], style));
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, style.filled()))).map_err(|e| err(&e))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut c = ChartBuilder::on(&right)
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (smin * 0.7..smax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("context (keys per head)")
        .y_desc("speed-up over full, same run (log)")
        .x_labels(contexts.len() + 1)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}×") } else { format!("{v:.1}×") })
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()
        .map_err(|e| err(&e))?;
    // A reference line at 10×.
    c.draw_series(LineSeries::new([(x0, 10.0), (x1, 10.0)], BLACK.mix(0.4).stroke_width(1))).map_err(|e| err(&e))?;
    for (i, sel) in selectors.iter().enumerate() {
        let style = color(i).stroke_width(3);
        let pts: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| r.selector == *sel)
            .filter_map(|r| Some((x(r.context), r.speedup.filter(|s| *s > 0.0)?)))
            .collect();
        c.draw_series(LineSeries::new(pts.clone(), style)).map_err(|e| err(&e))?;
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, style.filled()))).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws every all-layer curve of `summary` into a PNG at `path`.
pub fn recall_vs_scanned(summary: &[Summary], title: &str, path: &Path) -> Result<()> {
    let mut names: Vec<String> = summary.iter().filter(|s| s.layer.is_none()).map(Summary::name).collect();
    names.sort();
    names.dedup();
    // Exact scans are one point at 100%, and curves with no full-precision scores (plain
    // IVF-PQ) have no x; neither is drawn.
    names.retain(|n| !n.ends_with("/Flat"));
    let curves: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|n| {
            let pts = curve(summary, n)
                .iter()
                .filter(|s| s.scanned_frac > 0.0)
                .map(|s| (100.0 * s.scanned_frac, s.mean_recall))
                .collect();
            (n.clone(), pts)
        })
        .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
        .collect();
    let all: Vec<(f64, f64)> = curves.iter().flat_map(|c| c.1.iter().copied()).collect();
    let xmin = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).max(1e-3);
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max).max(xmin * 10.0);
    // The useful region is high recall; curves that start lower enter from the bottom edge.
    let ymin = all.iter().map(|p| p.1).fold(1.0, f64::min).clamp(0.5, 0.9);

    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    let err = err(path);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 30))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d((xmin * 0.8..xmax * 1.25).log_scale(), ymin.floor_to(0.05)..1.005)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("% of keys scored at full precision per query (log)")
        .y_desc(format!("mean recall@k over heads (from {ymin:.2})"))
        .label_style(("sans-serif", 20))
        .axis_desc_style(("sans-serif", 22))
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in curves.iter().enumerate() {
        // Points below the axis are dropped rather than drawn clamped onto it.
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1 >= ymin).collect();
        if pts.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).stroke_width(3);
        let dashed = !name.starts_with("needle/");
        let style = if dashed { color.stroke_width(2) } else { color };
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 30, y)], style));
        chart
            .draw_series(pts.iter().map(|&p| {
                if dashed {
                    Circle::new(p, 4, style).into_dyn()
                } else {
                    TriangleMarker::new(p, 6, style.filled()).into_dyn()
                }
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 20))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

trait FloorTo {
    fn floor_to(self, step: f64) -> f64;
}

impl FloorTo for f64 {
    fn floor_to(self, step: f64) -> f64 {
        (self / step).floor() * step
    }
}
/// Mean task score against prompt length, one line per selector.
pub fn tasks(rows: &[TaskRow], selectors: &[String], title: &str, path: &Path) -> Result<()> {
    let err = err(path);
    let mut lengths: Vec<usize> = rows.iter().map(|r| r.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let (lo, hi) = (*lengths.first().unwrap_or(&1) as f64, *lengths.last().unwrap_or(&2) as f64);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), -0.02f64..1.05)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("prompt tokens").y_desc("mean score").draw().map_err(|e| err(&e))?;
    for (i, sel) in selectors.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> =
            lengths.iter().filter_map(|&l| mean_score(rows, None, sel, Some(l)).map(|v| (l as f64, v))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(sel.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
