//! The layer-weights picture: SHERL's layer weights (alpha averaged over the
//! valid split's real tokens, then over seeds) per early layer, one bar per
//! `sherl` group with ± sample std error bars.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::super::{GroupRow, LayerWeight};
use super::layout::{
    chart_height, color, draw_legend, has_spread, legend_width, notes_height, truncate_label,
    wrap_notes, Entry, Swatch, CHART_W, FAMILY,
};

/// File stem of the picture.
pub(super) const STEM: &str = "layer_weights";
/// Title of the picture in the report.
pub(super) const TITLE: &str =
    "SHERL layer weights: alpha averaged over the valid split's real tokens, \
     per hidden_states layer, mean over seeds, error bars ± 1 sample std";

/// The layer weights of the `sherl` groups that have them, laid out.
pub(super) struct Weights<'a> {
    groups: Vec<Entry<'a>>,
    labels: Vec<String>,
    layers: Vec<usize>,
    legend: u32,
    /// The notes under the chart, wrapped.
    pub notes: Vec<String>,
    /// Picture size, pixels.
    pub size: (u32, u32),
}

impl<'a> Weights<'a> {
    /// Lay out the layer weights of `groups` (`None` when no `sherl` group
    /// has them).
    pub(super) fn new(groups: &'a [GroupRow]) -> Option<Self> {
        let weighted: Vec<Entry> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.method == "sherl" && !g.layer_weights.is_empty())
            .map(|(i, g)| (color(i), g))
            .collect();
        if weighted.is_empty() {
            return None;
        }
        let labels: Vec<String> = weighted
            .iter()
            .map(|(_, g)| {
                let sum: f64 = g.layer_weights.iter().map(|w| w.mean).sum();
                format!("{} (sum {sum:.3})", truncate_label(&g.label))
            })
            .collect();
        let legend = legend_width(&labels);
        let layers = layer_axis(&weighted);
        let bars = layers.len() as u32 * (weighted.len() as u32).min(4);
        let chart_w = CHART_W.max(140 + 45 * bars);
        let width = chart_w + legend;
        let notes = wrap_notes(&weight_notes(&weighted), width);
        let size = (
            width,
            chart_height(weighted.len()) + notes_height(notes.len()),
        );
        Some(Weights {
            groups: weighted,
            labels,
            layers,
            legend,
            notes,
            size,
        })
    }

    /// Draw the chart and its legend on `root` (the notes aside).
    pub(super) fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        draw_weights(root, &self.groups, &self.labels, &self.layers, self.legend)
    }
}

/// Whether an error bar of the layer-weight chart is cut at 0.
fn clipped_at_zero(w: &LayerWeight) -> bool {
    w.std.is_some_and(|sd| w.mean - sd < 0.0)
}

/// The notes under the layer-weight chart.
fn weight_notes(groups: &[Entry]) -> Vec<String> {
    let mut notes = vec![
        "Bars: SHERL's alpha (layer weight) averaged over the valid split's real tokens, \
         per hidden_states layer, then averaged over seeds."
            .to_string(),
    ];
    if groups.iter().any(|(_, g)| has_spread(g)) {
        let clipped = groups
            .iter()
            .filter(|(_, g)| has_spread(g))
            .any(|(_, g)| g.layer_weights.iter().any(clipped_at_zero));
        notes.push(format!(
            "Error bars: ± 1 sample standard deviation (n − 1) over seeds, for groups with 2+ seeds{}.",
            if clipped { " (cut at 0)" } else { "" }
        ));
    } else {
        notes.push("No error bars: every group has a single seed.".to_string());
    }
    notes.push(
        "Tokens whose weights are all zero (every layer's score ≤ 0) count as zero, so a \
         group's means can sum to slightly less than 1 (the sums are in the legend)."
            .to_string(),
    );
    notes
}

/// The union of the groups' layers, ascending.
fn layer_axis(groups: &[Entry]) -> Vec<usize> {
    let set: std::collections::BTreeSet<usize> = groups
        .iter()
        .flat_map(|(_, g)| g.layer_weights.iter().map(|w| w.layer))
        .collect();
    set.into_iter().collect()
}

/// A layer weight's error bar: mean ± sample std, cut at 0 (weights are
/// never negative); `None` without a spread.
fn error_bar(g: &GroupRow, w: &LayerWeight) -> Option<(f64, f64)> {
    let sd = w.std.filter(|_| has_spread(g))?;
    Some(((w.mean - sd).max(0.0), w.mean + sd))
}

/// Draws the layer-weight bars, their error bars and the legend.
fn draw_weights<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    labels: &[String],
    layers: &[usize],
    legend: u32,
) -> std::result::Result<(), String> {
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend);

    let values = groups.iter().flat_map(|(_, g)| {
        g.layer_weights.iter().map(move |w| {
            let (lo, hi) = error_bar(g, w).unwrap_or((w.mean, w.mean));
            (lo.min(w.mean), hi.max(w.mean))
        })
    });
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let (y0, y1) = (if lo < 0.0 { lo - pad } else { 0.0 }, hi + pad);
    // x in thousandths of a layer slot (integer coordinates: plotters cannot
    // format custom key points on an f64 axis); slot j is centred on 1000 j.
    let n = layers.len() as i32;
    let x_range = (-500..n * 1000 - 500).with_key_points((0..n).map(|j| j * 1000).collect());

    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "SHERL layer weights: mean alpha over valid tokens, mean over seeds",
            (FAMILY, 22),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y0..y1)
        .map_err(|e| e.to_string())?;
    let axis_label = |x: &i32| match usize::try_from(*x / 1000) {
        // the index alone: "hidden_states.10" under each of 12 bars overlapped
        Ok(j) if x % 1000 == 0 && j < layers.len() => layers[j].to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("early layer: hidden_states index")
        .y_desc("mean alpha over valid tokens")
        .x_label_formatter(&axis_label)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .max_light_lines(4)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    // The groups' bars share 80% of a slot, side by side.
    let width = 800 / groups.len().max(1) as i32;
    let bar_w = (width * 9 / 10).max(1);
    let whisker = RGBColor(40, 40, 40).stroke_width(2);
    for (i, &(c, g)) in groups.iter().enumerate() {
        let left_of = |lw: &LayerWeight| {
            let j = layers.iter().position(|&l| l == lw.layer)? as i32;
            Some(j * 1000 - 400 + i as i32 * width)
        };
        let bars = g.layer_weights.iter().filter_map(|lw| {
            let left = left_of(lw)?;
            Some(Rectangle::new(
                [(left, 0.0), (left + bar_w, lw.mean)],
                c.filled(),
            ))
        });
        chart.draw_series(bars).map_err(|e| e.to_string())?;
        // Error bars: a vertical line with caps a third of the bar wide.
        let cap = (bar_w / 6).max(1);
        let whiskers = g.layer_weights.iter().filter_map(|lw| {
            let (lo, hi) = error_bar(g, lw)?;
            let x = left_of(lw)? + bar_w / 2;
            Some([
                PathElement::new(vec![(x, lo), (x, hi)], whisker),
                PathElement::new(vec![(x - cap, lo), (x + cap, lo)], whisker),
                PathElement::new(vec![(x - cap, hi), (x + cap, hi)], whisker),
            ])
        });
        chart
            .draw_series(whiskers.flatten())
            .map_err(|e| e.to_string())?;
    }
    draw_legend(&legend_area, groups, labels, Swatch::Bar)
}
