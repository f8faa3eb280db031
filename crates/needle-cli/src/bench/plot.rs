//! Recall against share of keys scanned, one line per index (log-scaled x axis, since the
//! interesting region is a few percent of the keys).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::stats::{Summary, curve};

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
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
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
