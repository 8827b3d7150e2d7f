//! The layout every picture shares: the embedded font, sizes, colours,
//! legends and the notes under a chart.
//!
//! Text is laid out (and, in PNGs, rasterised) with the Liberation Sans font
//! embedded from `assets/fonts/` through plotters' `ab_glyph` backend, so
//! the pictures look the same on a machine without any system fonts.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

use super::super::GroupRow;
use crate::{Error, Result};

/// Liberation Sans Regular 2.1.5 (SIL OFL 1.1), see `assets/fonts/README.md`.
static FONT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/fonts/LiberationSans-Regular.ttf"
));

/// The family every text of the pictures uses.
pub(super) const FAMILY: &str = "sans-serif";

/// Chart size without the legend, pixels.
pub(super) const CHART_W: u32 = 820;
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
pub(super) const BAND_OPACITY: f64 = 0.16;

/// A group and its colour (the same in every picture).
pub(super) type Entry<'a> = (RGBColor, &'a GroupRow);

/// How a legend row shows its group's colour.
#[derive(Clone, Copy)]
pub(super) enum Swatch {
    /// A line, over a shaded band when the group has 2+ seeds.
    Line,
    /// A filled box.
    Bar,
}

/// Register the embedded font under the families plotters asks for (once).
pub(in crate::report::runs) fn ensure_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        ["sans-serif", "serif", "monospace"]
            .iter()
            .all(|f| register_font(f, FontStyle::Normal, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(super::super::ReportError::Font("assets/fonts/LiberationSans-Regular.ttf").into())
    }
}

/// A colour per group: Tableau 10, then plotters' 99-colour palette.
pub(super) fn color(i: usize) -> RGBColor {
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
pub(super) fn truncate_label(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL_CHARS {
        label.to_string()
    } else {
        let head: String = label.chars().take(MAX_LABEL_CHARS - 1).collect();
        format!("{head}…")
    }
}

/// An error drawing the picture at `path`.
pub(in crate::report::runs) fn draw_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!("drawing the picture failed: {e}")),
    )
}

/// Height of a chart with `entries` legend rows, notes aside.
pub(super) fn chart_height(entries: usize) -> u32 {
    MIN_H.max(90 + LEGEND_LINE * entries as u32)
}

/// Height of `lines` lines of notes (0 without notes).
pub(super) fn notes_height(lines: usize) -> u32 {
    if lines == 0 {
        0
    } else {
        12 + NOTE_LINE * lines as u32
    }
}

/// The font of the notes under a chart.
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
pub(super) fn wrap_notes(notes: &[String], width: u32) -> Vec<String> {
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
pub(super) fn legend_width(labels: &[String]) -> u32 {
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
pub(super) fn has_spread(g: &GroupRow) -> bool {
    g.seeds.len() >= 2
}

/// `x` as a percentage label: no decimals when whole.
pub(super) fn pct_label(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Text anchored at its left end, centred vertically.
fn left_center() -> plotters::style::text_anchor::Pos {
    plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Left,
        plotters::style::text_anchor::VPos::Center,
    )
}

/// Draws the notes under a chart, one line each.
pub(super) fn draw_notes<DB: DrawingBackend>(
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
pub(super) fn draw_legend<DB: DrawingBackend>(
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

#[cfg(test)]
mod tests {
    use super::*;

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
