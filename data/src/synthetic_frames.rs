//! Pixel content of synthetic haystack videos: a moving background, a frame-number
//! barcode (so tests can check which frame was decoded), and needle frames showing
//! large digits. Frames are drawn straight into YUV 4:2:0 planes.

/// Bits of the frame-number barcode (up to 2^20 - 1 frames: 9.7 hours at 30 fps).
pub const BARCODE_BITS: usize = 20;

/// Luma levels of the barcode cells.
const BAR_ON: u8 = 235;
const BAR_OFF: u8 = 16;

/// 5x7 glyphs of the digits 0-9 (rows top to bottom, bit 4 = leftmost column).
const DIGITS: [[u8; 7]; 10] = [
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
];

/// Planes of one YUV 4:2:0 frame, each with its own stride.
pub struct YuvPlanes<'a> {
    pub y: &'a mut [u8],
    pub y_stride: usize,
    pub u: &'a mut [u8],
    pub u_stride: usize,
    pub v: &'a mut [u8],
    pub v_stride: usize,
    pub width: usize,
    pub height: usize,
}

/// Height of the barcode band: the top eighth of the frame.
fn band_height(height: usize) -> usize {
    (height / 8).max(2)
}

/// Draws frame `index`: background, barcode, and `needle` digits if given.
pub fn draw_frame(planes: &mut YuvPlanes<'_>, index: usize, needle: Option<&str>) {
    let (w, h) = (planes.width, planes.height);
    let band = band_height(h);
    // Background: diagonal stripes drifting with time (changes every frame, so the
    // encoder cannot skip frames, but compresses well).
    for y in 0..h {
        let row = &mut planes.y[y * planes.y_stride..y * planes.y_stride + w];
        for (x, px) in row.iter_mut().enumerate() {
            *px = if y < band {
                let cell = x * BARCODE_BITS / w;
                let bit = (index >> (BARCODE_BITS - 1 - cell)) & 1;
                if bit == 1 { BAR_ON } else { BAR_OFF }
            } else {
                (60 + ((x + y + 3 * index) % 64)) as u8
            };
        }
    }
    for y in 0..h.div_ceil(2) {
        for x in 0..w.div_ceil(2) {
            planes.u[y * planes.u_stride + x] = 128;
            planes.v[y * planes.v_stride + x] = 128;
        }
    }
    if let Some(text) = needle {
        draw_needle(planes, text, band);
    }
}

/// Large red digits centred below the barcode band.
fn draw_needle(planes: &mut YuvPlanes<'_>, text: &str, band: usize) {
    let (w, h) = (planes.width, planes.height);
    let digits: Vec<usize> = text
        .chars()
        .filter_map(|c| c.to_digit(10))
        .map(|d| d as usize)
        .collect();
    if digits.is_empty() {
        return;
    }
    let cols = digits.len() * 6 - 1;
    let scale = ((w * 8 / 10) / cols).min((h - band) * 6 / 10 / 7).max(1);
    let x0 = (w - cols * scale) / 2;
    let y0 = band + (h - band - 7 * scale) / 2;
    for (i, &d) in digits.iter().enumerate() {
        for (r, bits) in DIGITS[d].iter().enumerate() {
            for c in 0..5 {
                if bits >> (4 - c) & 1 == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = x0 + (i * 6 + c) * scale + dx;
                        let y = y0 + r * scale + dy;
                        // Red in BT.601 limited range.
                        planes.y[y * planes.y_stride + x] = 81;
                        planes.u[(y / 2) * planes.u_stride + x / 2] = 90;
                        planes.v[(y / 2) * planes.v_stride + x / 2] = 240;
                    }
                }
            }
        }
    }
}

/// Reads the frame number back from an RGB image of any size (the barcode scales
/// with the frame). Samples the middle of every cell.
pub fn read_barcode(rgb: &[u8], stride: usize, width: usize, height: usize) -> usize {
    let band = band_height(height);
    let y = band / 2;
    let mut value = 0;
    for cell in 0..BARCODE_BITS {
        let x = ((2 * cell + 1) * width) / (2 * BARCODE_BITS);
        let p = &rgb[y * stride + 3 * x..y * stride + 3 * x + 3];
        let luma = (p[0] as u32 + p[1] as u32 + p[2] as u32) / 3;
        value = (value << 1) | usize::from(luma > 128);
    }
    value
}

/// Whether an RGB image shows a needle: enough strongly red pixels below the band.
pub fn shows_needle(rgb: &[u8], stride: usize, width: usize, height: usize) -> bool {
    let band = band_height(height);
    let mut red = 0;
    for y in band..height {
        for x in 0..width {
            let p = &rgb[y * stride + 3 * x..y * stride + 3 * x + 3];
            if p[0] > 180 && p[1] < 80 && p[2] < 80 {
                red += 1;
            }
        }
    }
    red * 200 > width * (height - band)
}

/// Frame indices of needles at relative depths (`0.0` first frame, `1.0` last).
pub fn needle_frames(frames: usize, depths: &[f64]) -> Vec<usize> {
    depths
        .iter()
        .map(|d| ((d.clamp(0.0, 1.0) * (frames.saturating_sub(1)) as f64).round()) as usize)
        .collect()
}
