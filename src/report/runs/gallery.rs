//! The retrieval picture `retrieval_examples.{png,svg}`: the text queries
//! a retrieval run wrote to `examples.json` (the first caption of a few
//! test images, with the best checkpoint), one row each: the caption, then
//! its top 5 images as thumbnails with their scores, the caption's own
//! image framed in green (a row whose own image is not among them says
//! its rank). Drawn for the best retrieval group's first run that has the
//! file.
//!
//! The PNG is drawn with plotters (the report's font, thumbnails blitted);
//! the SVG is written directly, each thumbnail an embedded PNG (plotters'
//! SVG backend would write one rectangle per pixel).

use std::path::{Path, PathBuf};

use plotters::backend::RGBPixel;
use plotters::prelude::*;

use super::plot::{draw_error, ensure_font, Picture};
use super::retrieval::RetrievalGroupRow;
use crate::fit::retrieval::examples::{QueryExample, EXAMPLES_FILE};
use crate::{Error, Result};

/// The picture's file stem.
pub(super) const STEM: &str = "retrieval_examples";

/// Thumbnail side, cell width, row height, caption column width, title band.
const THUMB: u32 = 72;
const CELL: u32 = 110;
const ROW: u32 = 134;
const LEFT: u32 = 300;
const TOP: u32 = 56;
/// Characters of a caption shown (an ellipsis marks a cut).
const CAPTION_CHARS: usize = 34;
/// Characters of an image id shown under its thumbnail.
const ID_CHARS: usize = 13;
const GREEN: (u8, u8, u8) = (44, 160, 44);

/// Draw the picture for the best group (the first run with
/// `examples.json`); `None` (and stale files removed) when no run has one.
pub(super) fn draw(
    groups: &[RetrievalGroupRow],
    runs: &Path,
    out: &Path,
) -> Result<Option<Picture>> {
    let found = groups.first().and_then(|g| {
        g.run_ids.iter().zip(&g.seeds).find_map(|(id, &seed)| {
            let p = runs.join(id).join(EXAMPLES_FILE);
            let ex: Vec<QueryExample> = crate::fsutil::read_json(&p).ok()?;
            (!ex.is_empty()).then_some((g, seed, ex))
        })
    });
    let Some((group, seed, examples)) = found else {
        for ext in ["png", "svg"] {
            let p = out.join(format!("{STEM}.{ext}"));
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        return Ok(None);
    };
    ensure_font()?;
    let title = format!(
        "Text → image on test: {} (seed {seed}); green frame: the caption's own image",
        group.label
    );
    let rows: Vec<Row> = examples.iter().map(Row::new).collect();
    let width = LEFT + CELL * rows.iter().map(|r| r.cells.len()).max().unwrap_or(1) as u32 + 20;
    let height = TOP + ROW * rows.len() as u32 + 10;
    let png = draw_png(out, (width, height), &title, &rows)?;
    let svg = out.join(format!("{STEM}.svg"));
    crate::fsutil::write_atomic(&svg, svg_text((width, height), &title, &rows).as_bytes())?;
    Ok(Some(Picture {
        stem: STEM,
        title: format!(
            "Text queries of the test split with their top {} images, best group {}",
            rows[0].cells.len(),
            group.label
        ),
        files: vec![png, svg],
    }))
}

/// One query's row, thumbnails loaded.
struct Row {
    caption: String,
    note: String,
    cells: Vec<Cell>,
}

struct Cell {
    /// `rank. id` (a long id cut).
    label: String,
    score: String,
    own: bool,
    /// `THUMB x THUMB` RGB, composited on white; `None`: no readable file.
    pixels: Option<Vec<u8>>,
}

impl Row {
    fn new(q: &QueryExample) -> Row {
        let text = q.caption.clone().unwrap_or_else(|| q.caption_id.clone());
        let caption = format!("\"{}\"", cut(&text, CAPTION_CHARS));
        Row {
            caption,
            note: format!("own image {}: rank {}", q.image_id, q.rank),
            cells: q
                .top
                .iter()
                .map(|h| Cell {
                    label: format!("{}. {}", h.rank, cut(&h.id, ID_CHARS)),
                    score: format!("{:.3}", h.score),
                    own: h.id == q.image_id,
                    pixels: h.image.as_deref().and_then(thumbnail),
                })
                .collect(),
        }
    }
}

/// `text` cut to `n` characters, an ellipsis marking a cut.
fn cut(text: &str, n: usize) -> String {
    if text.chars().count() > n {
        let head: String = text.chars().take(n - 1).collect();
        format!("{head}…")
    } else {
        text.to_string()
    }
}

/// The image at `path` scaled to `THUMB x THUMB`, transparency on white.
fn thumbnail(path: &str) -> Option<Vec<u8>> {
    let img = image::open(path).ok()?.to_rgba8();
    let small = image::imageops::resize(&img, THUMB, THUMB, image::imageops::FilterType::Triangle);
    Some(
        small
            .pixels()
            .flat_map(|p| {
                let [r, g, b, a] = p.0;
                let over = |c: u8| {
                    ((u32::from(c) * u32::from(a) + 255 * (255 - u32::from(a))) / 255) as u8
                };
                [over(r), over(g), over(b)]
            })
            .collect(),
    )
}

/// Top-left corner of cell `k` of row `r`'s thumbnail.
fn thumb_at(r: usize, k: usize) -> (i32, i32) {
    (
        (LEFT + CELL * k as u32 + (CELL - THUMB) / 2) as i32,
        (TOP + ROW * r as u32 + 8) as i32,
    )
}

fn draw_png(out: &Path, size: (u32, u32), title: &str, rows: &[Row]) -> Result<PathBuf> {
    let png = out.join(format!("{STEM}.png"));
    let tmp = out.join(format!(".{STEM}.{}.tmp.png", std::process::id()));
    let drawn = (|| -> std::result::Result<(), String> {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let font = |px: f64| FontDesc::new(FontFamily::Name("sans-serif"), px, FontStyle::Normal);
        root.draw(&Text::new(title.to_string(), (16, 20), font(17.0)))
            .map_err(e)?;
        for (r, row) in rows.iter().enumerate() {
            let y = (TOP + ROW * r as u32) as i32;
            root.draw(&Text::new(row.caption.clone(), (16, y + 30), font(15.0)))
                .map_err(e)?;
            root.draw(&Text::new(
                row.note.clone(),
                (16, y + 54),
                font(13.0).color(&RGBColor(90, 90, 90)),
            ))
            .map_err(e)?;
            for (k, c) in row.cells.iter().enumerate() {
                let (x, ty) = thumb_at(r, k);
                let t = THUMB as i32;
                match c.pixels.clone().and_then(|p| {
                    BitMapElement::<_, RGBPixel>::with_owned_buffer((x, ty), (THUMB, THUMB), p)
                }) {
                    Some(bitmap) => root.draw(&bitmap).map_err(e)?,
                    None => root
                        .draw(&Rectangle::new(
                            [(x, ty), (x + t, ty + t)],
                            RGBColor(225, 225, 225).filled(),
                        ))
                        .map_err(e)?,
                }
                let frame = if c.own {
                    RGBColor(GREEN.0, GREEN.1, GREEN.2).stroke_width(4)
                } else {
                    RGBColor(200, 200, 200).stroke_width(1)
                };
                root.draw(&Rectangle::new(
                    [(x - 3, ty - 3), (x + t + 3, ty + t + 3)],
                    frame,
                ))
                .map_err(e)?;
                root.draw(&Text::new(
                    c.label.clone(),
                    (x - 14, ty + t + 8),
                    font(12.0),
                ))
                .map_err(e)?;
                root.draw(&Text::new(
                    c.score.clone(),
                    (x - 14, ty + t + 24),
                    font(12.0).color(&RGBColor(90, 90, 90)),
                ))
                .map_err(e)?;
            }
        }
        root.present().map_err(e)
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(draw_error(&png, e));
    }
    std::fs::rename(&tmp, &png).map_err(|e| Error::io(&png, e))?;
    Ok(png)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn svg_text((w, h): (u32, u32), title: &str, rows: &[Row]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="16" y="26" font-size="17">{}</text>"#,
        xml(title)
    );
    for (r, row) in rows.iter().enumerate() {
        let y = TOP + ROW * r as u32;
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" font-size="15">{}</text>"#,
            y + 36,
            xml(&row.caption)
        );
        let _ = writeln!(
            s,
            r##"<text x="16" y="{}" font-size="13" fill="#5a5a5a">{}</text>"##,
            y + 60,
            xml(&row.note)
        );
        for (k, c) in row.cells.iter().enumerate() {
            let (x, ty) = thumb_at(r, k);
            match c.pixels.as_deref().and_then(png_base64) {
                Some(b64) => {
                    let _ = writeln!(
                        s,
                        r#"<image x="{x}" y="{ty}" width="{THUMB}" height="{THUMB}" href="data:image/png;base64,{b64}"/>"#
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x}" y="{ty}" width="{THUMB}" height="{THUMB}" fill="#e1e1e1"/>"##
                    );
                }
            }
            let (stroke, sw) = if c.own {
                (format!("rgb({},{},{})", GREEN.0, GREEN.1, GREEN.2), 4)
            } else {
                ("rgb(200,200,200)".to_string(), 1)
            };
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{stroke}" stroke-width="{sw}"/>"#,
                x - 3,
                ty - 3,
                THUMB + 6,
                THUMB + 6
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="12">{}</text>"#,
                x - 14,
                ty + THUMB as i32 + 20,
                xml(&c.label)
            );
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" font-size="12" fill="#5a5a5a">{}</text>"##,
                x - 14,
                ty + THUMB as i32 + 36,
                xml(&c.score)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// `THUMB x THUMB` RGB pixels as a base64 PNG.
fn png_base64(rgb: &[u8]) -> Option<String> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(rgb, THUMB, THUMB, image::ColorType::Rgb8)
        .ok()?;
    Some(base64(&bytes))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                s.push(A[((n >> shift) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
