//! The learning-curves picture: valid accuracy (%) per epoch, mean over
//! seeds, one line per group, shaded mean ± sample std over seeds.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::super::{CurvePoint, GroupRow};
use super::layout::{
    chart_height, color, draw_legend, has_spread, legend_width, notes_height, pct_label,
    truncate_label, wrap_notes, Entry, Swatch, BAND_OPACITY, CHART_W, FAMILY,
};

/// File stem of the picture.
pub(super) const STEM: &str = "learning_curves";
/// Title of the picture in the report.
pub(super) const TITLE: &str =
    "Valid accuracy (%) per epoch, mean over seeds, shaded ± 1 sample std";

/// The learning curves of the groups that have one, laid out.
pub(super) struct Curves<'a> {
    groups: Vec<Entry<'a>>,
    labels: Vec<String>,
    legend: u32,
    /// y range, %.
    axis: (f64, f64),
    /// The notes under the chart, wrapped.
    pub notes: Vec<String>,
    /// Picture size, pixels.
    pub size: (u32, u32),
}

impl<'a> Curves<'a> {
    /// Lay out the curves of `groups` (`None` when no group has one).
    pub(super) fn new(groups: &'a [GroupRow]) -> Option<Self> {
        let curves: Vec<Entry> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.valid_accuracy_curve.is_empty())
            .map(|(i, g)| (color(i), g))
            .collect();
        if curves.is_empty() {
            return None;
        }
        let labels: Vec<String> = curves
            .iter()
            .map(|(_, g)| truncate_label(&g.label))
            .collect();
        let legend = legend_width(&labels);
        let axis = curve_axis(&curves);
        let width = CHART_W + legend;
        let notes = wrap_notes(&curve_notes(&curves, axis), width);
        let size = (
            width,
            chart_height(curves.len()) + notes_height(notes.len()),
        );
        Some(Curves {
            groups: curves,
            labels,
            legend,
            axis,
            notes,
            size,
        })
    }

    /// Draw the chart and its legend on `root` (the notes aside).
    pub(super) fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        draw_curves(root, &self.groups, &self.labels, self.legend, self.axis)
    }
}

/// The y range (in %) of an accuracy axis for data spanning `lo..=hi` (%):
/// it starts at a multiple of 10 at least max(10, hi - lo) points below the
/// lowest value (0 at the least), so the data never fill more than half of
/// the axis and small gaps are not blown up, and ends at the multiple of 10
/// above the highest value (100 at the most).
fn percent_axis(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.clamp(0.0, 100.0);
    let hi = hi.clamp(lo, 100.0);
    let below = (hi - lo).max(10.0);
    let y0 = (((lo - below) / 10.0).floor() * 10.0).max(0.0);
    let y1 = (((hi + 1.0) / 10.0).ceil() * 10.0).min(100.0);
    (y0, y1)
}

/// Room drawn above an axis that ends at 100 % (3 % of its span), none
/// below that: the axis ends a whole point or more above the data there.
fn headroom(y0: f64, y1: f64) -> f64 {
    if y1 >= 100.0 {
        (y1 - y0) * 0.03
    } else {
        0.0
    }
}

/// A curve point's band, in %: mean ± sample std, within 0..100.
fn band(p: &CurvePoint) -> (f64, f64) {
    let sd = p.std.unwrap_or(0.0);
    (
        (100.0 * (p.valid_accuracy - sd)).max(0.0),
        (100.0 * (p.valid_accuracy + sd)).min(100.0),
    )
}

/// The learning curves' y range (%): the means and the bands drawn.
fn curve_axis(groups: &[Entry]) -> (f64, f64) {
    let (lo, hi) = groups
        .iter()
        .flat_map(|(_, g)| {
            let spread = has_spread(g);
            g.valid_accuracy_curve.iter().map(move |p| {
                let mean = 100.0 * p.valid_accuracy;
                if spread {
                    band(p)
                } else {
                    (mean, mean)
                }
            })
        })
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (a, b)| {
            (lo.min(a), hi.max(b))
        });
    if lo.is_finite() && hi.is_finite() {
        percent_axis(lo, hi)
    } else {
        (0.0, 100.0)
    }
}

/// The notes under the learning curves (y range `y0..y1`).
fn curve_notes(groups: &[Entry], (y0, y1): (f64, f64)) -> Vec<String> {
    let spread = if groups.iter().any(|(_, g)| has_spread(g)) {
        "Shaded band: mean ± 1 sample standard deviation (n − 1) over the seeds that reached \
         the epoch, for groups with 2+ seeds."
    } else {
        "No band: every group has a single seed."
    };
    vec![
        format!("Lines: valid accuracy after each epoch, mean over seeds. {spread}"),
        format!(
            "Y axis: {} % to {} %, from a round number well below the lowest value (not cut to the data).",
            pct_label(y0),
            pct_label(y1)
        ),
    ]
}

/// Draws the learning curves and their legend.
fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    labels: &[String],
    legend: u32,
    (y0, y1): (f64, f64),
) -> std::result::Result<(), String> {
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend);

    let points = groups.iter().flat_map(|(_, g)| &g.valid_accuracy_curve);
    let last = points.clone().map(|p| p.epoch as i32).max().unwrap_or(1);
    let first = points.clone().map(|p| p.epoch as i32).min().unwrap_or(1);
    let (x0, x1) = if last > first {
        (first, last)
    } else {
        (first - 1, last + 1)
    };

    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "Valid accuracy per epoch (%), mean over seeds ± 1 sample std",
            (FAMILY, 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        // a little room above 100 %, so a curve at 100 % is not drawn on
        // the frame (no tick is labelled above 100)
        .build_cartesian_2d(x0..x1, y0..y1 + headroom(y0, y1))
        .map_err(|e| e.to_string())?;
    let step = if y1 - y0 <= 40.0 { 5.0 } else { 10.0 };
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("valid accuracy (%)")
        .x_labels(((x1 - x0 + 1) as usize).min(15))
        .y_labels(((y1 - y0) / step).round() as usize + 1)
        .y_label_formatter(&|v| {
            if *v <= y1 {
                pct_label(*v)
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .max_light_lines(4)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    // Bands first, so that no band covers another group's line.
    for &(c, g) in groups {
        if !has_spread(g) {
            continue;
        }
        let curve = &g.valid_accuracy_curve;
        let style = c.mix(BAND_OPACITY).filled();
        if let [p] = curve.as_slice() {
            // One epoch: a band would have no width; an error bar instead.
            let (lo, hi) = band(p);
            let x = p.epoch as i32;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, lo), (x, hi)],
                    c.stroke_width(2),
                )))
                .map_err(|e| e.to_string())?;
            continue;
        }
        let upper = curve.iter().map(|p| (p.epoch as i32, band(p).1));
        let lower = curve.iter().rev().map(|p| (p.epoch as i32, band(p).0));
        chart
            .draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                style,
            )))
            .map_err(|e| e.to_string())?;
    }
    for &(c, g) in groups {
        let pts: Vec<(i32, f64)> = g
            .valid_accuracy_curve
            .iter()
            .map(|p| (p.epoch as i32, 100.0 * p.valid_accuracy))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(|e| e.to_string())?;
    }
    draw_legend(&legend_area, groups, labels, Swatch::Line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_axis_starts_well_below_the_data_at_a_round_number() {
        // The demo's spread: 72-81 % is a third of the axis, not all of it.
        assert_eq!(percent_axis(72.0, 81.0), (60.0, 90.0));
        // A tight cluster still gets at least 10 points below.
        assert_eq!(percent_axis(95.0, 95.5), (80.0, 100.0));
        // Wide data: the axis is at least twice the data's span.
        assert_eq!(percent_axis(50.0, 80.0), (20.0, 90.0));
        // Never below 0 or above 100.
        assert_eq!(percent_axis(3.0, 20.0), (0.0, 30.0));
        assert_eq!(percent_axis(100.0, 100.0), (90.0, 100.0));
        // an axis ending at 100 % is drawn a little higher, so a curve at
        // 100 % stays off the frame; below 100 the axis has room already
        assert!((headroom(70.0, 100.0) - 0.9).abs() < 1e-12);
        assert_eq!(headroom(50.0, 90.0), 0.0);
        assert_eq!(percent_axis(0.0, 0.0), (0.0, 10.0));
    }
}
