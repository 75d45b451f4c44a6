//! The needle-in-a-haystack heatmap, drawn like LongVILA's figure: haystack length
//! (frames) across, needle depth down, one coloured cell per evaluated pair, with
//! tick labels, axis titles, a title carrying the mean accuracy and a colour bar.
//!
//! Shapes are drawn with `plotters`' bitmap backend into a memory buffer; text is laid
//! out and rasterised with `ab_glyph` from a font compiled into the binary (DejaVu
//! Sans, licence in `assets/DejaVuSans-LICENSE.txt`); the `image` crate writes the PNG.
//! No system fonts, fontconfig or C libraries are involved. (Plotters' own `ab_glyph`
//! text path is not used: in 0.3.7 it drops left side bearings, so letters are
//! unevenly spaced, and it anchors text a few pixels too high.)

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont, point};
use image::{Rgb, RgbImage};
use plotters::prelude::*;

/// DejaVu Sans 2.37, embedded so labels render on machines without fonts.
static FONT_TTF: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// Colour of cells that have no samples.
pub const NO_DATA: RGBColor = RGBColor(190, 190, 190);
/// Anchors of the colour map at 0%, 50% and 100% accuracy: red, yellow, green.
const STOPS: [(u8, u8, u8); 3] = [(215, 48, 39), (250, 205, 60), (26, 150, 65)];
const INK: RGBColor = RGBColor(30, 30, 30);
const SOFT: RGBColor = RGBColor(95, 95, 95);
/// Margins around the cell grid (left, top, right, bottom) in pixels.
const MARGIN: (i32, i32, i32, i32) = (110, 88, 130, 76);
/// Gap between grid and colour bar, and the bar's width.
const BAR: (i32, i32) = (26, 22);
/// Narrowest image, so that titles and legends have room around a small grid.
const MIN_WIDTH: i32 = 640;

/// The embedded font, parsed on first use and shared by the whole process afterwards.
pub fn font() -> Result<&'static FontRef<'static>, String> {
    static FONT: OnceLock<Result<FontRef<'static>, String>> = OnceLock::new();
    let parse = || FontRef::try_from_slice(FONT_TTF).map_err(|e| format!("DejaVu Sans: {e}"));
    FONT.get_or_init(parse).as_ref().map_err(Clone::clone)
}

/// Pixel geometry of a heatmap image. `write_needle_heatmap` draws with it, and tests
/// use it to find cells. Rectangles are half-open: `(x0, y0)` inside, `(x1, y1)` not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    /// Top-left pixel of the cell grid.
    pub grid: (i32, i32),
    /// Pitch of one cell (width, height), including the white separator if any.
    pub cell: (i32, i32),
    /// Number of columns (haystack lengths) and rows (depths).
    pub cols: usize,
    pub rows: usize,
    /// Colour bar: left, top, width, height.
    pub bar: (i32, i32, i32, i32),
}

impl Layout {
    /// Geometry for `cols` haystack lengths by `rows` depths. Cells shrink as columns
    /// are added (about 900 px of grid, never under 6 px wide); the image is at least
    /// `min_width` pixels wide so that a long title fits, the plot centred in it.
    pub fn new(cols: usize, rows: usize, min_width: u32) -> Layout {
        let (left, top, right, bottom) = MARGIN;
        let (c, r) = (cols.max(1) as i32, rows.max(1) as i32);
        let cell = ((900 / c).clamp(6, 120), (440 / r).clamp(8, 64).max(200 / r));
        let natural = left + cell.0 * c + right;
        let width = natural.max(MIN_WIDTH).max(min_width as i32);
        let grid = (left + (width - natural) / 2, top);
        let bar = (grid.0 + cell.0 * c + BAR.0, top, BAR.1, cell.1 * r);
        let height = (top + cell.1 * r + bottom) as u32;
        Layout {
            width: width as u32,
            height,
            grid,
            cell,
            cols,
            rows,
            bar,
        }
    }

    /// Width and height of the cell grid.
    pub fn grid_size(&self) -> (i32, i32) {
        let (c, r) = (self.cols as i32, self.rows as i32);
        (self.cell.0 * c, self.cell.1 * r)
    }

    /// Painted area of cell (`row`, `col`), half-open. Cells of 12 px or more leave a
    /// 1 px white line on their right and bottom.
    pub fn cell_rect(&self, row: usize, col: usize) -> ((i32, i32), (i32, i32)) {
        let (x0, y0) = (self.col_x(col), self.grid.1 + row as i32 * self.cell.1);
        let gap = |pitch: i32| pitch - i32::from(pitch >= 12);
        ((x0, y0), (x0 + gap(self.cell.0), y0 + gap(self.cell.1)))
    }

    /// Centre pixel of cell (`row`, `col`).
    pub fn cell_centre(&self, row: usize, col: usize) -> (u32, u32) {
        let ((x0, y0), (x1, y1)) = self.cell_rect(row, col);
        (((x0 + x1) / 2) as u32, ((y0 + y1) / 2) as u32)
    }

    /// Left edge of column `col`.
    fn col_x(&self, col: usize) -> i32 {
        self.grid.0 + col as i32 * self.cell.0
    }

    /// Row of the colour bar showing `pct` percent (100 at the top).
    fn bar_y(&self, pct: u32) -> i32 {
        let (_, top, _, h) = self.bar;
        top + ((h - 1) as f64 * (1.0 - pct as f64 / 100.0)).round() as i32
    }
}

/// Colour of an accuracy in [0, 1]: red at 0, yellow at 0.5, green at 1.
pub fn accuracy_colour(acc: f64) -> RGBColor {
    let a = acc.clamp(0.0, 1.0) * 2.0;
    let (lo, hi, t) = match a <= 1.0 {
        true => (STOPS[0], STOPS[1], a),
        false => (STOPS[1], STOPS[2], a - 1.0),
    };
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    RGBColor(mix(lo.0, hi.0), mix(lo.1, hi.1), mix(lo.2, hi.2))
}

/// Depth tick text: two decimals, with a trailing zero dropped ("0.5", "0.25", "1.0").
fn depth_label(d: f64) -> String {
    let s = format!("{d:.2}");
    s.strip_suffix('0').unwrap_or(&s).to_string()
}

/// Every how many ticks a label fits: labels `extent` pixels long, `pitch` apart.
fn label_step(extent: f32, pitch: i32) -> usize {
    ((extent + 10.0) / pitch.max(1) as f32).ceil().max(1.0) as usize
}

/// Advance width of `text` at `size` pixels, kerning included.
fn text_width(font: &FontRef<'static>, text: &str, size: f32) -> f32 {
    let f = font.as_scaled(size);
    let ids: Vec<_> = text.chars().map(|c| f.glyph_id(c)).collect();
    let kerning: f32 = ids.windows(2).map(|p| f.kern(p[0], p[1])).sum();
    kerning + ids.iter().map(|&id| f.h_advance(id)).sum::<f32>()
}

/// Where a label sits relative to its point: `.0` is 0 (left end), 0.5 (middle) or 1
/// (right end) along the text; `.1` is 0 (cap tops), 0.5 (middle of the capitals) or 1
/// (baseline) at the point; `.2` turns the text to read bottom to top.
type Anchor = (f32, f32, bool);
const TOP_MID: Anchor = (0.5, 0.0, false);
const LEFT_MID: Anchor = (0.0, 0.5, false);
const RIGHT_MID: Anchor = (1.0, 0.5, false);

/// Draws anti-aliased text in `colour` at `size` pixels over what an image holds.
struct Pen<'a> {
    img: &'a mut RgbImage,
    font: &'static FontRef<'static>,
    colour: RGBColor,
    size: f32,
}

impl Pen<'_> {
    /// Sets the size and colour of the following text.
    fn style(&mut self, size: f32, colour: RGBColor) -> &mut Self {
        (self.size, self.colour) = (size, colour);
        self
    }

    /// `text` placed at `at` as `anchor` says.
    fn text(&mut self, text: &str, at: (i32, i32), anchor: Anchor) {
        let (f, size) = (self.font.as_scaled(self.size), self.size);
        let cap = f.outline_glyph(f.scaled_glyph('H'));
        let cap = cap.map_or(0.7 * size, |g| g.px_bounds().height());
        let dx = (-anchor.0 * text_width(self.font, text, size)).round();
        let base = (cap * (1.0 - anchor.1)).round();
        let (ink, (w, h)) = (self.colour, self.img.dimensions());
        let (mut caret, mut prev) = (0.0f32, None);
        for c in text.chars() {
            let id = f.glyph_id(c);
            caret += prev.map_or(0.0, |p| f.kern(p, id));
            prev = Some(id);
            let glyph = id.with_scale_and_position(size, point(dx + caret, base));
            caret += f.h_advance(id);
            let Some(outline) = f.outline_glyph(glyph) else {
                continue;
            };
            let min = outline.px_bounds().min;
            outline.draw(|x, y, cov| {
                let (u, v) = (min.x as i32 + x as i32, min.y as i32 + y as i32);
                let (px, py) = match anchor.2 {
                    true => (at.0 + v, at.1 - u),
                    false => (at.0 + u, at.1 + v),
                };
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    let p = self.img.get_pixel_mut(px as u32, py as u32);
                    let (cov, ink) = (cov.clamp(0.0, 1.0), [ink.0, ink.1, ink.2]);
                    let blend = |i: usize| p[i] as f32 + (ink[i] as f32 - p[i] as f32) * cov;
                    *p = Rgb([0, 1, 2].map(|i| blend(i).round() as u8));
                }
            });
        }
    }
}

/// Writes the needle-in-a-haystack heatmap of one checkpoint to `path` as PNG.
///
/// `frames[f]` are the haystack lengths (columns, left to right), `depths[d]` the needle
/// depths as fractions of the video (rows, top to bottom), and `cells[d][f]` the
/// `(correct, total)` count of that pair. Cells with `total == 0` are grey ([`NO_DATA`]).
/// `title` (e.g. the checkpoint name) heads the figure, above the pooled mean accuracy.
/// When column labels would overlap only every n-th is written, always the last one.
pub fn write_needle_heatmap(
    path: &Path,
    frames: &[usize],
    depths: &[f64],
    cells: &[Vec<(usize, usize)>],
    title: &str,
) -> Result<(), String> {
    if frames.is_empty() || depths.is_empty() {
        return Err("the needle heatmap needs at least one length and one depth".into());
    }
    if cells.len() != depths.len() || cells.iter().any(|row| row.len() != frames.len()) {
        let (d, f) = (depths.len(), frames.len());
        return Err(format!(
            "needle heatmap: expected {d} x {f} cells (depth x length)"
        ));
    }
    let lines = [title.to_string(), summary(cells)];
    let lay = heatmap_layout(frames.len(), depths.len(), &lines)?;
    let mut buf = vec![255u8; lay.width as usize * lay.height as usize * 3];
    let area = BitMapBackend::with_buffer(&mut buf, (lay.width, lay.height)).into_drawing_area();
    let drawn = draw_shapes(&area, &lay, cells).and_then(|()| area.present());
    drawn.map_err(|e| format!("drawing the needle heatmap: {e}"))?;
    drop(area);
    let mut img = RgbImage::from_raw(lay.width, lay.height, buf).ok_or("heatmap buffer size")?;
    draw_labels(&mut img, &lay, frames, depths, &lines)?;
    let saved = img.save_with_format(path, image::ImageFormat::Png);
    saved.map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The line under the title: pooled mean accuracy and what grey means.
fn summary(cells: &[Vec<(usize, usize)>]) -> String {
    let c: usize = cells.iter().flatten().map(|cell| cell.0).sum();
    let t: usize = cells.iter().flatten().map(|cell| cell.1).sum();
    let mean = match t {
        0 => "no samples yet".to_string(),
        _ => format!(
            "mean accuracy {:.1}% ({c}/{t} samples)",
            100.0 * c as f64 / t as f64
        ),
    };
    format!("{mean}; grey cells have no samples")
}

/// The layout `write_needle_heatmap` uses: wide enough for the title (`lines[0]`, 20 px
/// text) and the summary line (`lines[1]`, 14 px).
fn heatmap_layout(cols: usize, rows: usize, lines: &[String; 2]) -> Result<Layout, String> {
    let font = font()?;
    let widest = text_width(font, &lines[0], 20.0).max(text_width(font, &lines[1], 14.0));
    // The title is centred on the grid, which sits right of the image centre (the
    // depth labels are on its left): room for that offset on both sides.
    Ok(Layout::new(cols, rows, widest.ceil() as u32 + 160))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// Cells, grid frame, axis ticks, colour bar and the no-data swatch.
fn draw_shapes(area: &Area, lay: &Layout, cells: &[Vec<(usize, usize)>]) -> Result<(), DrawError> {
    let fill = |(a, b), c: RGBColor| area.draw(&Rectangle::new([a, b], c.filled()));
    let frame = |a, b| area.draw(&Rectangle::new([a, b], SOFT));
    let line = |a, b| area.draw(&PathElement::new(vec![a, b], INK));
    for (d, row) in cells.iter().enumerate() {
        for (f, &(c, t)) in row.iter().enumerate() {
            let acc = accuracy_colour(c as f64 / t.max(1) as f64);
            fill(lay.cell_rect(d, f), if t == 0 { NO_DATA } else { acc })?;
        }
    }
    let ((gx, gy), (gw, gh)) = (lay.grid, lay.grid_size());
    frame((gx - 1, gy - 1), (gx + gw, gy + gh))?;
    for x in (0..lay.cols).map(|f| lay.col_x(f) + lay.cell.0 / 2) {
        line((x, gy + gh), (x, gy + gh + 5))?;
    }
    for y in (0..lay.rows as i32).map(|d| gy + d * lay.cell.1 + lay.cell.1 / 2) {
        line((gx - 6, y), (gx - 1, y))?;
    }
    let (bx, by, bw, bh) = lay.bar;
    for y in by..by + bh {
        let acc = 1.0 - (y - by) as f64 / (bh - 1).max(1) as f64;
        fill(((bx, y), (bx + bw, y + 1)), accuracy_colour(acc))?;
    }
    frame((bx - 1, by - 1), (bx + bw, by + bh))?;
    for y in (0..=100).step_by(20).map(|pct| lay.bar_y(pct)) {
        line((bx + bw, y), (bx + bw + 4, y))?;
    }
    fill(((bx, by + bh + 14), (bx + bw, by + bh + 28)), NO_DATA)
}

/// Title and summary (`lines`), tick labels, axis titles and the colour bar's labels.
fn draw_labels(
    img: &mut RgbImage,
    lay: &Layout,
    frames: &[usize],
    depths: &[f64],
    lines: &[String],
) -> Result<(), String> {
    let pen = &mut Pen {
        img,
        font: font()?,
        colour: INK,
        size: 0.0,
    };
    let ((gx, gy), (gw, gh)) = (lay.grid, lay.grid_size());
    let (centre, (bx, by, bw, bh)) = (lay.width as i32 / 2, lay.bar);
    pen.style(20.0, INK).text(&lines[0], (centre, 16), TOP_MID);
    pen.style(14.0, SOFT).text(&lines[1], (centre, 46), TOP_MID);

    pen.style(13.0, INK);
    let names: Vec<String> = frames.iter().map(|f| f.to_string()).collect();
    let widest = names.iter().map(|s| text_width(pen.font, s, 13.0));
    let step = label_step(widest.fold(0.0, f32::max), lay.cell.0);
    for (f, name) in names.iter().enumerate() {
        if (lay.cols - 1 - f).is_multiple_of(step) {
            pen.text(name, (lay.col_x(f) + lay.cell.0 / 2, gy + gh + 10), TOP_MID);
        }
    }
    let step = label_step(10.0, lay.cell.1);
    for (d, &depth) in depths.iter().enumerate() {
        if d.is_multiple_of(step) {
            let y = gy + d as i32 * lay.cell.1 + lay.cell.1 / 2;
            pen.text(&depth_label(depth), (gx - 10, y), RIGHT_MID);
        }
    }
    pen.text("Accuracy", (bx - 1, by - 12), (0.0, 1.0, false));

    pen.style(15.0, INK);
    let x_title = "Haystack length (frames)";
    pen.text(x_title, (gx + gw / 2, gy + gh + 40), TOP_MID);
    let y_title = "Needle depth (fraction of the video)";
    pen.text(y_title, (gx - 72, gy + gh / 2), (0.5, 0.0, true));

    pen.style(12.0, INK);
    for pct in (0..=100).step_by(20) {
        pen.text(&format!("{pct}%"), (bx + bw + 7, lay.bar_y(pct)), LEFT_MID);
    }
    pen.text("no samples", (bx + bw + 7, by + bh + 21), LEFT_MID);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cells = Vec<Vec<(usize, usize)>>;

    /// Renders the grid into a fresh temp dir and decodes the PNG; returns it with the
    /// layout it was drawn with.
    fn render(name: &str, frames: &[usize], depths: &[f64], cells: &Cells) -> (RgbImage, Layout) {
        let dir = std::env::temp_dir().join(format!("longview-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("needle.png");
        write_needle_heatmap(&path, frames, depths, cells, "test-checkpoint").unwrap();
        assert!(path.is_file());
        let img = image::open(&path).expect("a PNG").to_rgb8();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines = ["test-checkpoint".to_string(), summary(cells)];
        let lay = heatmap_layout(frames.len(), depths.len(), &lines).unwrap();
        assert_eq!(img.dimensions(), (lay.width, lay.height));
        (img, lay)
    }

    /// Colour at the centre of cell (`d`, `f`).
    fn at(img: &RgbImage, lay: &Layout, d: usize, f: usize) -> RGBColor {
        let Rgb([r, g, b]) = *img.get_pixel(lay.cell_centre(d, f).0, lay.cell_centre(d, f).1);
        RGBColor(r, g, b)
    }

    #[test]
    fn small_grid_has_its_size_and_cell_colours() {
        let depths: Vec<f64> = (0..=5).map(|i| i as f64 / 5.0).collect();
        let mut cells = vec![vec![(1, 2); 3]; 6];
        (cells[0][0], cells[5][2], cells[2][1]) = ((4, 4), (0, 4), (0, 0));
        let (img, lay) = render("small", &[32, 64, 128], &depths, &cells);
        // 3 columns of 120 px are narrower than the 640 px minimum: the plot is centred.
        assert_eq!(
            (img.dimensions(), lay.cell),
            ((640, 88 + 6 * 64 + 76), (120, 64))
        );
        assert_eq!(at(&img, &lay, 0, 0), RGBColor(26, 150, 65));
        assert_eq!(at(&img, &lay, 5, 2), RGBColor(215, 48, 39));
        assert_eq!(at(&img, &lay, 2, 1), NO_DATA);
        assert_eq!(at(&img, &lay, 1, 1), accuracy_colour(0.5));
    }

    #[test]
    fn grid_up_to_3600_frames_by_11_depths() {
        let frames: Vec<usize> = (1..=18).map(|i| i * 200).collect();
        let depths: Vec<f64> = (0..=10).map(|i| i as f64 / 10.0).collect();
        let mut cells = vec![vec![(3, 5); 18]; 11];
        (cells[0][17], cells[10][17]) = ((5, 5), (0, 5));
        let (img, lay) = render("long", &frames, &depths, &cells);
        assert_eq!(img.dimensions(), (110 + 18 * 50 + 130, 88 + 11 * 40 + 76));
        assert_eq!(at(&img, &lay, 0, 17), accuracy_colour(1.0));
        assert_eq!(at(&img, &lay, 10, 17), accuracy_colour(0.0));
        assert_eq!(at(&img, &lay, 5, 0), accuracy_colour(0.6));
    }

    #[test]
    fn crowded_columns_are_labelled_sparsely() {
        let widest = text_width(font().unwrap(), "3600", 13.0);
        assert!(widest > 20.0 && widest < 40.0, "{widest}");
        // 18 columns of 50 px: every one is labelled; 100 columns of 9 px: one in 4+.
        assert_eq!(label_step(widest, Layout::new(18, 11, 0).cell.0), 1);
        assert_eq!(Layout::new(100, 11, 0).cell, (9, 40));
        assert!(label_step(widest, 9) >= 4);
        let labels = [0.0, 0.25, 0.5, 1.0].map(depth_label);
        assert_eq!(labels, ["0.0", "0.25", "0.5", "1.0"]);
    }

    #[test]
    fn mismatched_cells_are_an_error() {
        let path = std::env::temp_dir().join("longview-heatmap-never-written.png");
        let err = write_needle_heatmap(&path, &[8, 16], &[0.0], &[vec![(1, 1)]], "x");
        assert!(err.unwrap_err().contains("1 x 2"));
        assert!(write_needle_heatmap(&path, &[], &[], &[], "x").is_err());
        assert!(!path.exists());
    }
}
