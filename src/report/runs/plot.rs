//! The report's pictures, drawn with plotters as PNG and SVG: one file per
//! picture kind ([`curves`], [`weights`]) over the layout they share
//! ([`layout`]: font, legend, notes, sizes, colours).

mod curves;
mod layout;
mod weights;

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::GroupRow;
use crate::{Error, Result};
use layout::notes_height;
pub(super) use layout::{draw_error, ensure_font};

/// A picture written as `<stem>.png` and `<stem>.svg`.
#[derive(Debug, Clone)]
pub(super) struct Picture {
    pub stem: &'static str,
    pub title: String,
    pub files: Vec<PathBuf>,
}

/// Draw every picture that has data into `out`; remove stale ones that
/// have none now (so `out` never shows pictures of an older report).
pub(super) fn draw_all(groups: &[GroupRow], out: &Path) -> Result<Vec<Picture>> {
    ensure_font()?;
    let mut pictures = Vec::new();
    let curves = curves::Curves::new(groups).map(Chart::Curves);
    pictures.extend(draw_or_remove(out, curves::STEM, curves::TITLE, curves)?);
    let weights = weights::Weights::new(groups).map(Chart::Weights);
    pictures.extend(draw_or_remove(out, weights::STEM, weights::TITLE, weights)?);
    Ok(pictures)
}

/// Draw `chart` as `<stem>.{png,svg}` in `out`, or remove stale files of
/// that stem when there is no chart.
fn draw_or_remove(
    out: &Path,
    stem: &'static str,
    title: &str,
    chart: Option<Chart>,
) -> Result<Option<Picture>> {
    let Some(chart) = chart else {
        remove_stale(out, stem)?;
        return Ok(None);
    };
    let files = render(out, stem, chart.size(), &chart)?;
    Ok(Some(Picture {
        stem,
        title: title.into(),
        files,
    }))
}

/// Remove `<stem>.png` and `<stem>.svg` from `out` if they exist.
fn remove_stale(out: &Path, stem: &str) -> Result<()> {
    for ext in ["png", "svg"] {
        let p = out.join(format!("{stem}.{ext}"));
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// What one picture shows; drawn on either backend.
enum Chart<'a> {
    Curves(curves::Curves<'a>),
    Weights(weights::Weights<'a>),
}

impl Chart<'_> {
    /// Picture size, pixels.
    fn size(&self) -> (u32, u32) {
        match self {
            Chart::Curves(c) => c.size,
            Chart::Weights(w) => w.size,
        }
    }

    /// Draw the picture on `root`: the chart with its legend, the notes below.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let notes = match self {
            Chart::Curves(c) => &c.notes,
            Chart::Weights(w) => &w.notes,
        };
        let (_, h) = root.dim_in_pixel();
        let (main, footer) = root.split_vertically(h - notes_height(notes.len()));
        match self {
            Chart::Curves(c) => c.draw(&main)?,
            Chart::Weights(w) => w.draw(&main)?,
        }
        layout::draw_notes(&footer, notes)
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
