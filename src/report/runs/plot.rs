//! The report's pictures, drawn with plotters as PNG and SVG.
//!
//! Text is laid out (and, in PNGs, rasterised) with the Liberation Sans font
//! embedded from `assets/fonts/` through plotters' `ab_glyph` backend, so
//! the pictures look the same on a machine without any system fonts.
//!
//! Over 500 lines because both charts share one layout (legend, notes,
//! sizes, colours) that only makes sense read together; the drawing of
//! each chart is one function.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

use super::GroupRow;
use crate::{Error, Result};

/// Liberation Sans Regular 2.1.5 (SIL OFL 1.1), see `assets/fonts/README.md`.
static FONT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/LiberationSans-Regular.ttf"
));

/// The family every text of the pictures uses.
const FAMILY: &str = "sans-serif";

/// Chart size without the legend, pixels.
const CHART_W: u32 = 820;
const MIN_H: u32 = 520;
/// Legend line height and font size.
const LEGEND_LINE: u32 = 22;
const LEGEND_FONT: u32 = 15;
/// Labels longer than this are shortened in legends.
const MAX_LABEL_CHARS: usize = 70;
/// The notes under a chart: font size, line height, left margin.
const NOTE_FONT: u32 = 14;
const NOTE_LINE: u32 = 19;
const NOTE_X: i32 = 16;
/// Opacity of a learning curve's seed band.
const BAND_OPACITY: f64 = 0.16;

/// A group and its colour (the same in every picture).
type Entry<'a> = (RGBColor, &'a GroupRow);

/// How a legend row shows its group's colour.
#[derive(Clone, Copy)]
enum Swatch {
    /// A line, over a shaded band when the group has 2+ seeds.
    Line,
    /// A filled box.
    Bar,
}

/// A picture written as `<stem>.png` and `<stem>.svg`.
#[derive(Debug, Clone)]
pub(super) struct Picture {
    pub stem: &'static str,
    pub title: String,
    pub files: Vec<PathBuf>,
}

/// Register the embedded font under the families plotters asks for (once).
pub(super) fn ensure_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|f| register_font(f, FontStyle::Normal, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(super::ReportError::Font("assets/fonts/LiberationSans-Regular.ttf").into())
    }
}

/// A colour per group: Tableau 10, then plotters' 99-colour palette.
fn color(i: usize) -> RGBColor {
    const TABLEAU: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    match TABLEAU.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let (r, g, b) = Palette99::pick(i - TABLEAU.len()).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// `label` cut to [`MAX_LABEL_CHARS`] characters (an ellipsis marks the cut).
fn truncate_label(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL_CHARS {
        label.to_string()
    } else {
        let head: String = label.chars().take(MAX_LABEL_CHARS - 1).collect();
        format!("{head}…")
    }
}

pub(super) fn draw_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!("drawing the picture failed: {e}")),
    )
}

/// Draw every picture that has data into `out`; remove stale ones that
/// have none now (so `out` never shows pictures of an older report).
pub(super) fn draw_all(groups: &[GroupRow], out: &Path) -> Result<Vec<Picture>> {
    ensure_font()?;
    let mut pictures = Vec::new();

    let curves: Vec<Entry> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.valid_accuracy_curve.is_empty())
        .map(|(i, g)| (color(i), g))
        .collect();
    let stem = "learning_curves";
    if curves.is_empty() {
        remove_stale(out, stem)?;
    } else {
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
        let chart = Chart::Curves {
            groups: curves,
            labels,
            legend,
            axis,
            notes,
        };
        let files = render(out, stem, size, &chart)?;
        pictures.push(Picture {
            stem,
            title: "Valid accuracy (%) per epoch, mean over seeds, shaded ± 1 sample std".into(),
            files,
        });
    }

    let weighted: Vec<Entry> = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.method == "sherl" && !g.layer_weights.is_empty())
        .map(|(i, g)| (color(i), g))
        .collect();
    let stem = "layer_weights";
    if weighted.is_empty() {
        remove_stale(out, stem)?;
    } else {
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
        let chart = Chart::Weights {
            groups: weighted,
            labels,
            layers,
            legend,
            notes,
        };
        let files = render(out, stem, size, &chart)?;
        pictures.push(Picture {
            stem,
            title: "SHERL layer weights: alpha averaged over the valid split's real tokens, \
                    per hidden_states layer, mean over seeds, error bars ± 1 sample std"
                .into(),
            files,
        });
    }
    Ok(pictures)
}

fn remove_stale(out: &Path, stem: &str) -> Result<()> {
    for ext in ["png", "svg"] {
        let p = out.join(format!("{stem}.{ext}"));
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn chart_height(entries: usize) -> u32 {
    MIN_H.max(90 + LEGEND_LINE * entries as u32)
}

fn notes_height(lines: usize) -> u32 {
    if lines == 0 {
        0
    } else {
        12 + NOTE_LINE * lines as u32
    }
}

fn note_font() -> FontDesc<'static> {
    FontDesc::new(
        FontFamily::Name(FAMILY),
        NOTE_FONT as f64,
        FontStyle::Normal,
    )
}

/// Text width in pixels (estimated when the font cannot lay it out).
fn text_width(font: &FontDesc, text: &str) -> u32 {
    font.box_size(text)
        .map(|(w, _)| w)
        .unwrap_or((text.chars().count() as f64 * 0.55 * font.get_size()) as u32)
}

/// Each note wrapped on word boundaries to fit a picture `width` wide.
fn wrap_notes(notes: &[String], width: u32) -> Vec<String> {
    let font = note_font();
    let room = width.saturating_sub(2 * NOTE_X as u32).max(200);
    let mut lines = Vec::new();
    for note in notes {
        let mut line = String::new();
        for word in note.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_string()
            } else {
                format!("{line} {word}")
            };
            if !line.is_empty() && text_width(&font, &candidate) > room {
                lines.push(std::mem::replace(&mut line, word.to_string()));
            } else {
                line = candidate;
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// Legend column width: swatch, gap, the longest label, margin.
fn legend_width(labels: &[String]) -> u32 {
    let font = FontDesc::new(
        FontFamily::Name(FAMILY),
        LEGEND_FONT as f64,
        FontStyle::Normal,
    );
    let widest = labels
        .iter()
        .map(|l| text_width(&font, l))
        .max()
        .unwrap_or(0);
    widest + 60
}

/// Whether a group's picture shows its spread over seeds.
fn has_spread(g: &GroupRow) -> bool {
    g.seeds.len() >= 2
}

/// `x` as a percentage label: no decimals when whole.
fn pct_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The y range (in %) of an accuracy axis for data spanning `lo..=hi` (%):
/// it starts at a multiple of 10 at least max(10, hi - lo) points below the
/// lowest value (0 at the least), so the data never fill more than half of
/// the axis and small gaps are not blown up, and ends at the multiple of 10
/// above the highest value (100 at the most).
pub(super) fn percent_axis(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.clamp(0.0, 100.0);
    let hi = hi.clamp(lo, 100.0);
    let below = (hi - lo).max(10.0);
    let y0 = (((lo - below) / 10.0).floor() * 10.0).max(0.0);
    let y1 = (((hi + 1.0) / 10.0).ceil() * 10.0).min(100.0);
    (y0, y1)
}

/// A curve point's band, in %: mean ± sample std, within 0..100.
fn band(p: &super::CurvePoint) -> (f64, f64) {
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

/// Whether an error bar of the layer-weight chart is cut at 0.
fn clipped_at_zero(w: &super::LayerWeight) -> bool {
    w.std.is_some_and(|sd| w.mean - sd < 0.0)
}

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

/// What one picture shows; drawn on either backend.
enum Chart<'a> {
    Curves {
        groups: Vec<Entry<'a>>,
        labels: Vec<String>,
        legend: u32,
        /// y range, %.
        axis: (f64, f64),
        notes: Vec<String>,
    },
    Weights {
        groups: Vec<Entry<'a>>,
        labels: Vec<String>,
        layers: Vec<usize>,
        legend: u32,
        notes: Vec<String>,
    },
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let notes = match self {
            Chart::Curves { notes, .. } | Chart::Weights { notes, .. } => notes,
        };
        let (_, h) = root.dim_in_pixel();
        let (main, footer) = root.split_vertically(h - notes_height(notes.len()));
        match self {
            Chart::Curves {
                groups,
                labels,
                legend,
                axis,
                ..
            } => draw_curves(&main, groups, labels, *legend, *axis)?,
            Chart::Weights {
                groups,
                labels,
                layers,
                legend,
                ..
            } => draw_weights(&main, groups, labels, layers, *legend)?,
        }
        draw_notes(&footer, notes)
    }
}

/// Draw one picture as `<stem>.png` and `<stem>.svg` in `out`.
fn render(out: &Path, stem: &str, size: (u32, u32), chart: &Chart) -> Result<Vec<PathBuf>> {
    let png = out.join(format!("{stem}.png"));
    // Written under a temporary name (plotters picks the encoder from the
    // extension) and renamed, so a reader never sees half a picture.
    let tmp = out.join(format!(".{stem}.{}.tmp.png", std::process::id()));
    let drawn = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(|e| e.to_string())
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(draw_error(&png, e));
    }
    std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))?;

    let svg = out.join(format!("{stem}.svg"));
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        chart.draw(&root).map_err(|e| draw_error(&svg, e))?;
        root.present().map_err(|e| draw_error(&svg, e))?;
    }
    crate::fsutil::write_atomic(&svg, text.as_bytes())?;
    Ok(vec![png, svg])
}

fn left_center() -> plotters::style::text_anchor::Pos {
    plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Left,
        plotters::style::text_anchor::VPos::Center,
    )
}

/// Draws the notes under a chart, one line each.
fn draw_notes<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    lines: &[String],
) -> std::result::Result<(), String> {
    let font = note_font().color(&RGBColor(60, 60, 60)).pos(left_center());
    for (i, line) in lines.iter().enumerate() {
        let y = (NOTE_LINE / 2 + i as u32 * NOTE_LINE) as i32;
        area.draw(&Text::new(line.clone(), (NOTE_X, y), font.clone()))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draws the legend: one swatch and label per group, top to bottom.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    labels: &[String],
    swatch: Swatch,
) -> std::result::Result<(), String> {
    let font = (FAMILY, LEGEND_FONT).into_font().color(&BLACK);
    let top = 60;
    for (i, (&(c, g), label)) in groups.iter().zip(labels).enumerate() {
        let y = top + (i as u32 * LEGEND_LINE) as i32;
        match swatch {
            Swatch::Bar => {
                area.draw(&Rectangle::new([(8, y - 6), (30, y + 6)], c.filled()))
                    .map_err(|e| e.to_string())?;
            }
            Swatch::Line => {
                if has_spread(g) {
                    area.draw(&Rectangle::new(
                        [(6, y - 7), (32, y + 7)],
                        c.mix(BAND_OPACITY).filled(),
                    ))
                    .map_err(|e| e.to_string())?;
                }
                area.draw(&PathElement::new(vec![(6, y), (32, y)], c.stroke_width(3)))
                    .map_err(|e| e.to_string())?;
            }
        }
        area.draw(&Text::new(label.clone(), (40, y), font.pos(left_center())))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

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
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let step = if y1 - y0 <= 40.0 { 5.0 } else { 10.0 };
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("valid accuracy (%)")
        .x_labels(((x1 - x0 + 1) as usize).min(15))
        .y_labels(((y1 - y0) / step).round() as usize + 1)
        .y_label_formatter(&|v| pct_label(*v))
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
fn error_bar(g: &GroupRow, w: &super::LayerWeight) -> Option<(f64, f64)> {
    let sd = w.std.filter(|_| has_spread(g))?;
    Some(((w.mean - sd).max(0.0), w.mean + sd))
}

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
        Ok(j) if x % 1000 == 0 && j < layers.len() => format!("hidden_states.{}", layers[j]),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("early layer (hidden_states index)")
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
        let left_of = |lw: &super::LayerWeight| {
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
        assert_eq!(percent_axis(0.0, 0.0), (0.0, 10.0));
    }

    #[test]
    fn notes_wrap_to_the_picture_width() {
        ensure_font().unwrap();
        let long = "word ".repeat(200);
        let lines = wrap_notes(&[long, "short".into()], 600);
        assert!(lines.len() > 2, "{lines:?}");
        assert_eq!(lines.last().unwrap(), "short");
        let font = note_font();
        assert!(lines.iter().all(|l| text_width(&font, l) <= 600));
    }
}
