//! Still images through the same preprocessing as video frames: decode with the
//! `image` crate (PNG, JPEG), honour the EXIF orientation, convert to RGB, resize to
//! the encoder's input with a bicubic (Catmull-Rom, a = -0.5, antialiased when
//! shrinking) filter as Hugging Face's SigLIP processor does with PIL, then normalise.

use std::path::Path;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::error::DataError;
use crate::preprocess::Preprocess;

/// Decodes an image file, upright per its EXIF orientation.
pub fn read_image(path: impl AsRef<Path>) -> Result<DynamicImage, DataError> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(DataError::NotFound { path: path.into() });
    }
    let bad = |reason: String| DataError::Image {
        path: path.into(),
        reason,
    };
    let reader = ImageReader::open(path)
        .map_err(|e| bad(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad("unknown format (PNG and JPEG are supported)".into()));
    }
    let mut decoder = reader.into_decoder().map_err(|e| bad(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| bad(e.to_string()))?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| bad(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(bad("the image is empty".into()));
    }
    image.apply_orientation(orientation);
    Ok(image)
}

/// Planar `[3, height, width]` encoder input of an image.
pub fn preprocess_image(image: &DynamicImage, pre: &Preprocess) -> Vec<f32> {
    let rgb = image.to_rgb8();
    let resized = if rgb.dimensions() == (pre.width, pre.height) {
        rgb
    } else {
        imageops::resize(&rgb, pre.width, pre.height, FilterType::CatmullRom)
    };
    let mut out = Vec::with_capacity(pre.frame_len());
    pre.normalize_rgb(resized.as_raw(), 3 * pre.width as usize, &mut out);
    out
}

/// [`read_image`] then [`preprocess_image`].
pub fn load_image(path: impl AsRef<Path>, pre: &Preprocess) -> Result<Vec<f32>, DataError> {
    Ok(preprocess_image(&read_image(path)?, pre))
}
