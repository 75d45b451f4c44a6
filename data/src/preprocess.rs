//! Pixels to encoder input: RGB u8 (already resized by the decoder's scaler, or by the
//! `image` crate for still images) to planar f32 normalised with SigLIP's mean and
//! std of 0.5 per channel: `x / 255 * 2 - 1`, in `[-1, 1]`.

/// Normalisation constants of an image encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// SigLIP (so400m-patch14-384 and siblings): mean = std = 0.5.
    pub const SIGLIP: Normalization = Normalization {
        mean: [0.5; 3],
        std: [0.5; 3],
    };
}

/// Input geometry of the vision encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub width: u32,
    pub height: u32,
    pub norm: Normalization,
}

impl Preprocess {
    /// SigLIP normalisation at a square `side` x `side` input (any SigLIP resolution).
    pub fn siglip(side: u32) -> Preprocess {
        Preprocess {
            width: side,
            height: side,
            norm: Normalization::SIGLIP,
        }
    }

    /// SigLIP so400m-patch14-384: 384x384, mean/std 0.5.
    pub const SIGLIP_384: Preprocess = Preprocess {
        width: 384,
        height: 384,
        norm: Normalization::SIGLIP,
    };

    /// Values per frame: `3 * height * width`.
    pub fn frame_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// Interleaved RGB rows (`stride` bytes apart) to planar `[3, height, width]` f32,
    /// appended to `out`.
    pub fn normalize_rgb(&self, rgb: &[u8], stride: usize, out: &mut Vec<f32>) {
        let (w, h) = (self.width as usize, self.height as usize);
        assert!(
            rgb.len() >= stride * (h - 1) + 3 * w,
            "RGB buffer smaller than {w}x{h}"
        );
        let start = out.len();
        out.resize(start + 3 * w * h, 0.0);
        let planes = &mut out[start..];
        for c in 0..3 {
            let scale = 1.0 / (255.0 * self.norm.std[c]);
            let shift = self.norm.mean[c] / self.norm.std[c];
            let plane = &mut planes[c * w * h..(c + 1) * w * h];
            for y in 0..h {
                let row = &rgb[y * stride..y * stride + 3 * w];
                for x in 0..w {
                    plane[y * w + x] = row[3 * x + c] as f32 * scale - shift;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siglip_normalisation_maps_0_255_to_minus1_1_planar() {
        let p = Preprocess {
            width: 2,
            height: 1,
            norm: Normalization::SIGLIP,
        };
        // two pixels (0, 255, 51), (255, 0, 102) with a padded stride of 8 bytes
        let rgb = [0u8, 255, 51, 255, 0, 102, 9, 9];
        let mut out = Vec::new();
        p.normalize_rgb(&rgb, 8, &mut out);
        let expected = [
            -1.0,
            1.0,
            1.0,
            -1.0,
            51.0 / 127.5 - 1.0,
            102.0 / 127.5 - 1.0,
        ];
        for (a, e) in out.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{out:?}");
        }
    }
}
