//! Decoding one image file into an [`Image`]: 8 bits per channel, gray or
//! RGB, alpha composited on a [`Background`]. PNG and JPEG only (the
//! `image` crate built with just those two decoders); the format is told
//! from the content, not the file name.

use std::fmt;
use std::io::{Cursor, Read};
use std::path::Path;
use std::str::FromStr;

use ::image::io::Limits;
use ::image::{DynamicImage, ImageFormat};

use super::ImageOptions;

use crate::{Error, Result};

/// A decoded image: `height` rows of `width` pixels of `channels` (1: gray,
/// 3: RGB) 8-bit values, row-major, channels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    width: u32,
    height: u32,
    channels: u8,
    pixels: Vec<u8>,
}

impl Image {
    /// An image from its interleaved pixels; the error says what does not
    /// fit (a zero size, channels other than 1 or 3, a wrong pixel count).
    pub fn new(
        width: u32,
        height: u32,
        channels: u8,
        pixels: Vec<u8>,
    ) -> std::result::Result<Image, String> {
        if width == 0 || height == 0 {
            return Err(format!("the image is empty ({width}x{height})"));
        }
        if channels != 1 && channels != 3 {
            return Err(format!(
                "{channels} channels: an image has 1 (gray) or 3 (RGB)"
            ));
        }
        let want = (width as usize)
            .checked_mul(height as usize)
            .and_then(|n| n.checked_mul(channels as usize))
            .ok_or_else(|| format!("{width}x{height} is too large"))?;
        if pixels.len() != want {
            return Err(format!(
                "{width}x{height}x{channels} needs {want} values, got {}",
                pixels.len()
            ));
        }
        Ok(Image {
            width,
            height,
            channels,
            pixels,
        })
    }

    /// sha256 of the decoded image: width and height (u32 little-endian),
    /// channels (one byte), then the pixels as [`Image::pixels`] holds them.
    /// What an image cache records per image (FORMAT.md §3.1.1): it names
    /// the pixels the backbone saw, wherever they came from (a file, an IDX
    /// record).
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.width.to_le_bytes());
        h.update(self.height.to_le_bytes());
        h.update([self.channels]);
        h.update(&self.pixels);
        h.finalize().into()
    }

    /// Width in pixels (never 0).
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels (never 0).
    pub fn height(&self) -> u32 {
        self.height
    }

    /// 1 (gray) or 3 (RGB).
    pub fn channels(&self) -> u8 {
        self.channels
    }

    /// The pixels, row-major, channels interleaved.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }
}

/// What transparent pixels are composited on (straight alpha:
/// `round((c * a + b * (255 - a)) / 255)` per channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Background {
    /// 255 in every channel: how icons, emoji and drawings with alpha are
    /// usually shown, and their dark strokes keep their contrast.
    #[default]
    White,
    /// 0 in every channel.
    Black,
}

impl Background {
    /// The 8-bit value of every channel of the background.
    pub fn value(self) -> u8 {
        match self {
            Background::White => 255,
            Background::Black => 0,
        }
    }
}

impl FromStr for Background {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "white" => Ok(Background::White),
            "black" => Ok(Background::Black),
            _ => Err(Error::setting(
                "--background",
                format!("unknown background `{s}`: expected white or black"),
            )),
        }
    }
}

impl fmt::Display for Background {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Background::White => "white",
            Background::Black => "black",
        })
    }
}

/// Decode a PNG or JPEG held in memory, compositing alpha on
/// `opts.background`; the decoder may allocate at most
/// `opts.max_decoded_bytes` (a header claiming more is refused before any
/// pixel is read). The error is a message for a bad row (the caller names
/// the file).
pub fn decode_image(bytes: &[u8], opts: &ImageOptions) -> std::result::Result<Image, String> {
    let mut reader = ::image::io::Reader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(format!(
                "{other:?} images are not supported (PNG and JPEG are)"
            ))
        }
        None => return Err("not a PNG or JPEG image".to_owned()),
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(opts.max_decoded_bytes);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| format!("cannot decode the image: {e}"))?;
    from_dynamic(decoded, opts.background)
}

/// Read and decode the image file at `path` ([`decode_image`]), reading at
/// most `opts.max_file_bytes` bytes of it (a larger file is refused). The
/// error is a message for a bad row, without the path.
pub fn read_image(path: &Path, opts: &ImageOptions) -> std::result::Result<Image, String> {
    let max_bytes = opts.max_file_bytes;
    let file = crate::fsutil::open_regular(path).map_err(|e| match e {
        // The path is the caller's to add.
        Error::Io { source, .. } => format!("cannot open: {source}"),
        other => format!("cannot open: {other}"),
    })?;
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!(
            "the file is larger than {max_bytes} bytes, the most sherl reads for one image"
        ));
    }
    decode_image(&bytes, opts)
}

fn from_dynamic(img: DynamicImage, background: Background) -> std::result::Result<Image, String> {
    let (width, height) = (img.width(), img.height());
    let color = img.color();
    let bg = u32::from(background.value());
    let over = |c: u8, a: u8| -> u8 {
        let a = u32::from(a);
        // At most 255 * 255 + 127 before the division: fits, and the result is <= 255.
        ((u32::from(c) * a + bg * (255 - a) + 127) / 255) as u8
    };
    let (channels, pixels) = match (color.has_color(), color.has_alpha()) {
        (false, false) => (1, img.into_luma8().into_raw()),
        (true, false) => (3, img.into_rgb8().into_raw()),
        (false, true) => (
            1,
            img.into_luma_alpha8()
                .into_raw()
                .chunks_exact(2)
                .map(|p| over(p[0], p[1]))
                .collect(),
        ),
        (true, true) => {
            let raw = img.into_rgba8().into_raw();
            let mut out = Vec::with_capacity(raw.len() / 4 * 3);
            for p in raw.chunks_exact(4) {
                out.extend([over(p[0], p[3]), over(p[1], p[3]), over(p[2], p[3])]);
            }
            (3, out)
        }
    };
    Image::new(width, height, channels, pixels)
}
