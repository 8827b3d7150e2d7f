//! The report's pictures, drawn with plotters as PNG and SVG.
//!
//! Text is laid out (and, in PNGs, rasterised) with the Liberation Sans font
//! embedded from `assets/fonts/` through plotters' `ab_glyph` backend, so
//! the pictures look the same on a machine without any system fonts.

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

/// A group and its colour (the same in every picture).
type Entry<'a> = (RGBColor, &'a GroupRow);

/// A picture written as `<stem>.png` and `<stem>.svg`.
#[derive(Debug, Clone)]
pub(super) struct Picture {
    pub stem: &'static str,
    pub title: String,
    pub files: Vec<PathBuf>,
}

/// Register the embedded font under the families plotters asks for (once).
fn ensure_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|f| register_font(f, FontStyle::Normal, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Config(
            "the embedded font assets/fonts/LiberationSans-Regular.ttf is not a valid font".into(),
        ))
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

fn short(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL_CHARS {
        label.to_string()
    } else {
        let head: String = label.chars().take(MAX_LABEL_CHARS - 1).collect();
        format!("{head}…")
    }
}

fn draw_error(path: &Path, e: impl std::fmt::Display) -> Error {
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
        let legend = legend_width(&curves);
        let size = (CHART_W + legend, chart_height(curves.len()));
        let chart = Chart::Curves {
            groups: curves,
            legend,
        };
        let files = render(out, stem, size, &chart)?;
        pictures.push(Picture {
            stem,
            title: "Valid accuracy per epoch, mean over seeds".into(),
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
        let legend = legend_width(&weighted);
        let layers = layer_axis(&weighted);
        let bars = layers.len() as u32 * (weighted.len() as u32).min(4);
        let chart_w = CHART_W.max(140 + 45 * bars);
        let size = (chart_w + legend, chart_height(weighted.len()));
        let chart = Chart::Weights {
            groups: weighted,
            layers,
            legend,
        };
        let files = render(out, stem, size, &chart)?;
        pictures.push(Picture {
            stem,
            title: "SHERL layer weights per early layer, mean over seeds".into(),
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

/// Legend column width: swatch, gap, the longest label, margin.
fn legend_width(groups: &[Entry]) -> u32 {
    // An average glyph of the font is about 0.55 em wide; measure exactly
    // when the font can lay the text out.
    let font = FontDesc::new(
        FontFamily::Name(FAMILY),
        LEGEND_FONT as f64,
        FontStyle::Normal,
    );
    let widest = groups
        .iter()
        .map(|(_, g)| {
            let label = short(&g.label);
            font.box_size(&label)
                .map(|(w, _)| w)
                .unwrap_or((label.chars().count() as f64 * 0.55 * LEGEND_FONT as f64) as u32)
        })
        .max()
        .unwrap_or(0);
    widest + 60
}

/// What one picture shows; drawn on either backend.
enum Chart<'a> {
    Curves {
        groups: Vec<Entry<'a>>,
        legend: u32,
    },
    Weights {
        groups: Vec<Entry<'a>>,
        layers: Vec<usize>,
        legend: u32,
    },
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        match self {
            Chart::Curves { groups, legend } => draw_curves(root, groups, *legend),
            Chart::Weights {
                groups,
                layers,
                legend,
            } => draw_weights(root, groups, layers, *legend),
        }
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

/// Draws the legend: one swatch and label per group, top to bottom.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    bars: bool,
) -> std::result::Result<(), String> {
    let font = (FAMILY, LEGEND_FONT).into_font().color(&BLACK);
    let top = 60;
    for (i, &(c, g)) in groups.iter().enumerate() {
        let y = top + (i as u32 * LEGEND_LINE) as i32;
        if bars {
            area.draw(&Rectangle::new([(8, y - 6), (30, y + 6)], c.filled()))
                .map_err(|e| e.to_string())?;
        } else {
            area.draw(&PathElement::new(vec![(6, y), (32, y)], c.stroke_width(3)))
                .map_err(|e| e.to_string())?;
        }
        area.draw(&Text::new(
            short(&g.label),
            (40, y),
            font.pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            )),
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    legend: u32,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend);

    let points = groups.iter().flat_map(|(_, g)| &g.valid_accuracy_curve);
    let last = points.clone().map(|p| p.epoch as i32).max().unwrap_or(1);
    let first = points.clone().map(|p| p.epoch as i32).min().unwrap_or(1);
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.valid_accuracy), hi.max(p.valid_accuracy))
    });
    let pad = ((hi - lo) * 0.08).max(0.01);
    let (y0, y1) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
    let (y0, y1) = if y1 - y0 < 0.02 {
        (y0 - 0.01, y1 + 0.01)
    } else {
        (y0, y1)
    };
    let (x0, x1) = if last > first {
        (first, last)
    } else {
        (first - 1, last + 1)
    };

    let mut chart = ChartBuilder::on(&chart_area)
        .caption("Valid accuracy per epoch (mean over seeds)", (FAMILY, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("valid accuracy")
        .x_labels(((x1 - x0 + 1) as usize).min(15))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .max_light_lines(4)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    for &(c, g) in groups {
        let pts: Vec<(i32, f64)> = g
            .valid_accuracy_curve
            .iter()
            .map(|p| (p.epoch as i32, p.valid_accuracy))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(|e| e.to_string())?;
    }
    draw_legend(&legend_area, groups, false)
}

/// The union of the groups' layers, ascending.
fn layer_axis(groups: &[Entry]) -> Vec<usize> {
    let set: std::collections::BTreeSet<usize> = groups
        .iter()
        .flat_map(|(_, g)| g.layer_weights.iter().map(|w| w.layer))
        .collect();
    set.into_iter().collect()
}

fn draw_weights<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    groups: &[Entry],
    layers: &[usize],
    legend: u32,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend);

    let values = groups
        .iter()
        .flat_map(|(_, g)| g.layer_weights.iter().map(|w| w.mean));
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let (y0, y1) = (if lo < 0.0 { lo - pad } else { 0.0 }, hi + pad);
    // x in thousandths of a layer slot (integer coordinates: plotters cannot
    // format custom key points on an f64 axis); slot j is centred on 1000 j.
    let n = layers.len() as i32;
    let x_range = (-500..n * 1000 - 500).with_key_points((0..n).map(|j| j * 1000).collect());

    let mut chart = ChartBuilder::on(&chart_area)
        .caption("SHERL layer weights (mean over seeds)", (FAMILY, 22))
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
        .x_desc("early layer")
        .y_desc("layer weight")
        .x_label_formatter(&axis_label)
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .max_light_lines(4)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    // The groups' bars share 80% of a slot, side by side.
    let width = 800 / groups.len().max(1) as i32;
    for (i, &(c, g)) in groups.iter().enumerate() {
        let bars = g.layer_weights.iter().filter_map(|lw| {
            let j = layers.iter().position(|&l| l == lw.layer)? as i32;
            let left = j * 1000 - 400 + i as i32 * width;
            Some(Rectangle::new(
                [(left, 0.0), (left + (width * 9 / 10).max(1), lw.mean)],
                c.filled(),
            ))
        });
        chart.draw_series(bars).map_err(|e| e.to_string())?;
    }
    draw_legend(&legend_area, groups, true)
}
