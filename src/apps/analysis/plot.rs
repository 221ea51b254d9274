//! Pictures: small grids of line, bar and histogram panels, and the depth heat map, drawn
//! with plotters' bitmap backend and encoded as PNG in memory (so a page can embed them).
//!
//! Text is drawn with DejaVu Sans compiled into the binary (`assets/DejaVuSans.ttf`, Bitstream
//! Vera licence, see `assets/DejaVuSans-LICENSE.txt`) through plotters' `ab_glyph` feature:
//! plotters' default text path asks fontconfig for system fonts, which a fresh CI machine or
//! container may not have, and then fails at run time.

use crate::{Error, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// A finished picture.
#[derive(Clone, Debug)]
pub struct Png {
    pub width: u32,
    pub height: u32,
    /// The encoded PNG file.
    pub bytes: Vec<u8>,
}

impl Png {
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        crate::base::util::write_atomic(path, |w| std::io::Write::write_all(w, &self.bytes))
    }

    /// `data:` URL for an `<img>` in a self-contained page.
    pub fn data_url(&self) -> String {
        format!("data:image/png;base64,{}", super::base64(&self.bytes))
    }
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn ensure_font() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::usage("the embedded plot font could not be loaded (assets/DejaVuSans.ttf is damaged)"))
    }
}

/// Draw on a white `w` x `h` canvas and encode the result as an 8-bit RGB PNG.
pub fn render(w: u32, h: u32, draw: impl FnOnce(&Area) -> DrawResult) -> Result<Png> {
    ensure_font()?;
    let (w, h) = (w.max(16), h.max(16));
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root).map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Charts are flat colour and text: the best deflate level and adaptive filtering
        // roughly halve the files, at a few milliseconds.
        enc.set_compression(png::Compression::Best);
        enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let mut writer = enc.write_header().map_err(plot_err)?;
        writer.write_image_data(&buf).map_err(plot_err)?;
    }
    Ok(Png { width: w, height: h, bytes })
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::usage(format!("drawing a picture failed: {e}"))
}

fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// Tableau-10: distinct, colour-blind friendlier than plotters' primaries.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Colour of thinking depth `d` of `max` steps: 1 step pale blue-grey, the most steps dark red
/// (the same ramp as the HTML pages).
pub fn depth_color(d: u32, max: u32) -> RGBColor {
    let (r, g, b) = super::depth_rgb(d, max);
    RGBColor(r, g, b)
}

/// One line of a line chart. `dashed` marks a reference (e.g. a random-selection baseline).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub markers: bool,
    pub dashed: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Series { name: name.into(), points, color, markers: false, dashed: false }
    }
    pub fn with_markers(mut self) -> Self {
        self.markers = true;
        self
    }
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

/// A panel of a picture.
#[derive(Clone, Debug)]
pub enum Panel {
    /// Lines over a numeric x axis; `x_ticks` names positions (e.g. "L1") when given.
    Line { title: String, x_label: String, y_label: String, series: Vec<Series>, x_ticks: Option<Vec<(f64, String)>> },
    /// Grouped bars: one group per category, one bar per (name, values) entry.
    Bars { title: String, x_label: String, y_label: String, categories: Vec<String>, groups: Vec<(String, Vec<f64>)> },
    /// Stacked histogram over [lo, hi] with equal bins: (name, counts per bin) per stack.
    Hist { title: String, x_label: String, y_label: String, lo: f64, hi: f64, stacks: Vec<(String, Vec<f64>)> },
    /// A text-only panel (e.g. "no routers in this model").
    Note { title: String, text: String },
}

/// Up to `max` round tick values covering [lo, hi].
pub fn nice_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || max == 0 {
        return vec![lo];
    }
    let raw = (hi - lo) / max as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| (hi - lo) / s <= max as f64).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..=max + 1).map(|i| first + i as f64 * step).filter(|v| *v <= hi + step * 1e-9).collect()
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A range with some headroom, never empty.
fn padded(lo: f64, hi: f64, zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo < 1e-12 {
        let d = if hi.abs() > 1e-12 { hi.abs() * 0.1 } else { 1.0 };
        return (lo - d, hi + d);
    }
    let pad = 0.06 * (hi - lo);
    (if zero && lo == 0.0 { 0.0 } else { lo - pad }, if zero && hi == 0.0 { 0.0 } else { hi + pad })
}

/// An f64 axis with exactly the given tick positions (plotters picks its own otherwise, and its
/// key-point override does not combine with f64 labels in 0.3.7).
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * (limit.1 - limit.0) as f64 + 1e-3).floor() as i32
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            vec![]
        } else {
            self.ticks.clone()
        }
    }
}

fn axes<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    x: (f64, f64, Vec<f64>),
    y: (f64, f64, Vec<f64>),
) -> std::result::Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>, Box<dyn std::error::Error>> {
    let chart = ChartBuilder::on(area)
        .caption(title, font(15.0))
        .margin(8)
        .margin_right(16)
        .x_label_area_size(40)
        .y_label_area_size(58)
        .build_cartesian_2d(Axis { lo: x.0, hi: x.1, ticks: x.2 }, Axis { lo: y.0, hi: y.1, ticks: y.2 })?;
    Ok(chart)
}

fn draw_legend(area: &Area, entries: &[(String, RGBColor)]) -> DrawResult {
    let (w, _) = area.dim_in_pixel();
    let mut y = 30;
    for (name, c) in entries.iter().take(12) {
        let x = w as i32 - 150;
        area.draw(&Rectangle::new([(x, y), (x + 12, y + 10)], c.filled()))?;
        area.draw(&Text::new(shorten(name, 20), (x + 16, y - 1), font(11.0)))?;
        y += 14;
    }
    Ok(())
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n.saturating_sub(1)).collect::<String>())
    }
}

type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

/// The grid, axis labels and tick labels every chart panel has; `x_mesh` false leaves the
/// vertical grid lines out (bars, histograms).
fn draw_mesh(
    chart: &mut Chart,
    (x_label, y_label): (&str, &str),
    fmt_x: &dyn Fn(&f64) -> String,
    x_mesh: bool,
) -> DrawResult {
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .label_style(font(11.0))
        .axis_desc_style(font(12.0))
        .x_label_formatter(fmt_x)
        .y_label_formatter(&|v| tick_label(*v));
    if !x_mesh {
        mesh.disable_x_mesh();
    }
    mesh.light_line_style(WHITE).bold_line_style(RGBColor(225, 225, 225)).draw()?;
    Ok(())
}

fn draw_panel(area: &Area, p: &Panel) -> DrawResult {
    match p {
        Panel::Note { title, text } => {
            area.draw(&Text::new(title.clone(), (10, 8), font(15.0)))?;
            for (i, line) in text.lines().enumerate() {
                area.draw(&Text::new(line.to_string(), (10, 40 + 16 * i as i32), font(12.0)))?;
            }
            Ok(())
        }
        Panel::Line { title, x_label, y_label, series, x_ticks } => {
            draw_lines(area, title, (x_label, y_label), series, x_ticks.as_deref())
        }
        Panel::Bars { title, x_label, y_label, categories, groups } => {
            draw_bars(area, title, (x_label, y_label), categories, groups)
        }
        Panel::Hist { title, x_label, y_label, lo, hi, stacks } => {
            draw_hist(area, title, (x_label, y_label), (*lo, *hi), stacks)
        }
    }
}

/// `Panel::Line`.
fn draw_lines(
    area: &Area,
    title: &str,
    labels: (&str, &str),
    series: &[Series],
    x_ticks: Option<&[(f64, String)]>,
) -> DrawResult {
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = match x_ticks {
        Some(t) if !t.is_empty() => {
            let lo = t.iter().map(|t| t.0).fold(x0, f64::min);
            let hi = t.iter().map(|t| t.0).fold(x1, f64::max);
            (lo - 0.3, hi + 0.3)
        }
        _ => padded(x0, x1, false),
    };
    let (y0, y1) = padded(y0, y1, false);
    let xt = match x_ticks {
        Some(t) => t.iter().map(|t| t.0).collect(),
        None => nice_ticks(x0, x1, 6),
    };
    let mut chart = axes(area, title, (x0, x1, xt), (y0, y1, nice_ticks(y0, y1, 6)))?;
    let names = x_ticks.unwrap_or_default();
    let fmt_x = |v: &f64| match names.iter().find(|t| (t.0 - v).abs() < 1e-9) {
        Some(t) => t.1.clone(),
        None => tick_label(*v),
    };
    draw_mesh(&mut chart, labels, &fmt_x, true)?;
    for s in series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
        if s.dashed {
            // Dashes by hand: plotters 0.3.7's DashedLineSeries needs a newer API.
            for w in pts.windows(2) {
                for k in (0..8).step_by(2) {
                    let a = k as f64 / 8.0;
                    let b = (k + 1) as f64 / 8.0;
                    let p = |t: f64| (w[0].0 + t * (w[1].0 - w[0].0), w[0].1 + t * (w[1].1 - w[0].1));
                    chart.draw_series(std::iter::once(PathElement::new(vec![p(a), p(b)], s.color.stroke_width(2))))?;
                }
            }
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), s.color.stroke_width(2)))?;
        }
        if s.markers || pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, s.color.filled())))?;
        }
    }
    let legend: Vec<(String, RGBColor)> = series.iter().map(|s| (s.name.clone(), s.color)).collect();
    if legend.len() > 1 {
        draw_legend(area, &legend)?;
    }
    Ok(())
}

/// `Panel::Bars`.
fn draw_bars(
    area: &Area,
    title: &str,
    labels: (&str, &str),
    categories: &[String],
    groups: &[(String, Vec<f64>)],
) -> DrawResult {
    let n = categories.len().max(1);
    let vals = groups.iter().flat_map(|g| g.1.iter()).copied().filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (y0, y1) = padded(lo, hi * 1.15 + 1e-12, true);
    let xt: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let mut chart = axes(area, title, (-0.6, n as f64 - 0.4, xt), (y0, y1, nice_ticks(y0, y1, 6)))?;
    let fmt_x = |v: &f64| {
        let i = v.round();
        if (i - v).abs() < 1e-9 && i >= 0.0 {
            categories.get(i as usize).map(|c| shorten(c, 12)).unwrap_or_default()
        } else {
            String::new()
        }
    };
    draw_mesh(&mut chart, labels, &fmt_x, false)?;
    let g = groups.len().max(1);
    let width = 0.8 / g as f64;
    for (k, (_, values)) in groups.iter().enumerate() {
        let c = color(k);
        chart.draw_series(values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| {
            let left = i as f64 - 0.4 + k as f64 * width;
            Rectangle::new([(left, 0.0), (left + width * 0.92, v)], c.filled())
        }))?;
    }
    if groups.len() > 1 {
        let legend: Vec<(String, RGBColor)> = groups.iter().enumerate().map(|(k, g)| (g.0.clone(), color(k))).collect();
        draw_legend(area, &legend)?;
    }
    Ok(())
}

/// `Panel::Hist`.
fn draw_hist(
    area: &Area,
    title: &str,
    labels: (&str, &str),
    (lo, hi): (f64, f64),
    stacks: &[(String, Vec<f64>)],
) -> DrawResult {
    let bins = stacks.iter().map(|s| s.1.len()).max().unwrap_or(0).max(1);
    let totals: Vec<f64> = (0..bins).map(|b| stacks.iter().map(|s| s.1.get(b).copied().unwrap_or(0.0)).sum()).collect();
    let top = totals.iter().copied().fold(0.0, f64::max);
    let (y0, y1) = padded(0.0, top * 1.1 + 1e-12, true);
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo, lo + 1.0) };
    let mut chart = axes(area, title, (lo, hi, nice_ticks(lo, hi, 5)), (y0, y1, nice_ticks(y0, y1, 5)))?;
    draw_mesh(&mut chart, labels, &|v| tick_label(*v), false)?;
    let bw = (hi - lo) / bins as f64;
    let mut base = vec![0.0; bins];
    for (k, (_, counts)) in stacks.iter().enumerate() {
        let c = color(k);
        let rects: Vec<_> = counts
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(b, &v)| {
                let x = lo + b as f64 * bw;
                Rectangle::new([(x, base[b]), (x + bw, base[b] + v)], c.filled())
            })
            .collect();
        chart.draw_series(rects)?;
        for (b, &v) in counts.iter().enumerate() {
            base[b] += v;
        }
    }
    if stacks.len() > 1 {
        let legend: Vec<(String, RGBColor)> = stacks.iter().enumerate().map(|(k, s)| (s.0.clone(), color(k))).collect();
        draw_legend(area, &legend)?;
    }
    Ok(())
}

/// Panels in a grid of `cols` columns, each `panel` pixels, under a title.
pub fn grid(title: &str, panels: &[Panel], cols: usize, panel: (u32, u32)) -> Result<Png> {
    let cols = cols.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let head = 34;
    let (w, h) = (panel.0 * cols as u32, head + panel.1 * rows as u32);
    render(w, h, |root| {
        root.draw(&Text::new(title.to_string(), (10, 8), font(18.0)))?;
        let body = root.margin(head, 0, 0, 0);
        let cells = body.split_evenly((rows, cols));
        for (cell, p) in cells.iter().zip(panels) {
            draw_panel(cell, p)?;
        }
        Ok(())
    })
}

/// The depth heat map: for each token (columns, wrapped into bands) and thinking layer (rows),
/// the steps taken, coloured by `depth_color`. `labels` are the tokens' display texts.
pub fn depth_heatmap(
    title: &str,
    labels: &[String],
    layers: &[usize],
    depth: &[Vec<u32>],
    max_depth: u32,
) -> Result<Png> {
    const CELL_W: i32 = 16;
    const CELL_H: i32 = 18;
    const PER_BAND: usize = 64;
    const LEFT: i32 = 64;
    let n = labels.len();
    let shown: Vec<String> = labels.iter().map(|l| shorten(&super::visible(l), 8)).collect();
    // One-character tokens (char/byte tokenizers) read best upright under their cell;
    // longer ones are turned 90 degrees.
    let upright = shown.iter().all(|l| l.chars().count() <= 1);
    let label_h: i32 = if upright { 20 } else { 58 };
    let bands = n.div_ceil(PER_BAND).max(1);
    let band_h = CELL_H * layers.len().max(1) as i32 + label_h + 16;
    let cols = n.clamp(1, PER_BAND) as i32;
    let w = (LEFT + cols * CELL_W + 24).max(560) as u32;
    let h = (44 + band_h * bands as i32 + 50) as u32;
    render(w, h, |root| {
        root.draw(&Text::new(title.to_string(), (10, 8), font(16.0)))?;
        for b in 0..bands {
            let y0 = 40 + b as i32 * band_h;
            let tokens = (b * PER_BAND)..((b + 1) * PER_BAND).min(n);
            for (row, &layer) in layers.iter().enumerate() {
                let y = y0 + row as i32 * CELL_H;
                let anchor = Pos::new(HPos::Right, VPos::Center);
                root.draw(&Text::new(format!("layer {layer}"), (LEFT - 6, y + CELL_H / 2), font(11.0).pos(anchor)))?;
                for (col, i) in tokens.clone().enumerate() {
                    let x = LEFT + col as i32 * CELL_W;
                    let d = depth.get(row).and_then(|r| r.get(i)).copied().unwrap_or(1);
                    root.draw(&Rectangle::new(
                        [(x, y), (x + CELL_W - 1, y + CELL_H - 1)],
                        depth_color(d, max_depth).filled(),
                    ))?;
                }
            }
            let ly = y0 + layers.len() as i32 * CELL_H + 3;
            for (col, i) in tokens.clone().enumerate() {
                let x = LEFT + col as i32 * CELL_W + CELL_W / 2;
                if upright {
                    root.draw(&Text::new(
                        shown[i].clone(),
                        (x, ly),
                        font(12.0).pos(Pos::new(HPos::Center, VPos::Top)),
                    ))?;
                } else {
                    root.draw(&Text::new(
                        shown[i].clone(),
                        (x + 4, ly),
                        font(11.0).transform(FontTransform::Rotate90),
                    ))?;
                }
            }
            let anchor = Pos::new(HPos::Right, VPos::Top);
            root.draw(&Text::new(
                format!("#{}", tokens.start),
                (LEFT - 6, ly + 2),
                font(10.0).color(&RGBColor(120, 120, 120)).pos(anchor),
            ))?;
        }
        // Legend: one swatch per depth.
        let ly = h as i32 - 36;
        root.draw(&Text::new("steps taken:", (10, ly + 2), font(12.0)))?;
        for d in 1..=max_depth.max(1) {
            let x = 100 + (d as i32 - 1) * 60;
            root.draw(&Rectangle::new([(x, ly), (x + 18, ly + 14)], depth_color(d, max_depth).filled()))?;
            root.draw(&Text::new(format!("{d}"), (x + 22, ly + 1), font(12.0)))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let t = nice_ticks(3.2, 97.0, 6);
        assert!(t.len() <= 7 && t[0] >= 3.2 && *t.last().unwrap() <= 97.0, "{t:?}");
        assert_eq!(nice_ticks(1.0, 1.0, 5), vec![1.0]);
    }

    #[test]
    fn a_grid_renders_to_a_png_with_text() {
        let panels = vec![
            Panel::Line {
                title: "loss".into(),
                x_label: "step".into(),
                y_label: "nats".into(),
                series: vec![Series::new("train", vec![(0.0, 3.0), (10.0, 2.0), (20.0, 1.5)], color(0))],
                x_ticks: None,
            },
            Panel::Bars {
                title: "bars".into(),
                x_label: "kind".into(),
                y_label: "value".into(),
                categories: vec!["a".into(), "b".into()],
                groups: vec![("x".into(), vec![1.0, 2.0]), ("y".into(), vec![0.5, f64::NAN])],
            },
            Panel::Hist {
                title: "h".into(),
                x_label: "w".into(),
                y_label: "n".into(),
                lo: 0.0,
                hi: 1.0,
                stacks: vec![("s".into(), vec![1.0, 3.0, 2.0])],
            },
            Panel::Note { title: "note".into(), text: "nothing\nhere".into() },
        ];
        let png = grid("test", &panels, 2, (300, 220)).unwrap();
        assert_eq!(&png.bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!((png.width, png.height), (600, 34 + 440));
        assert!(png.bytes.len() > 3000, "{}", png.bytes.len());
        let hm = depth_heatmap("d", &["a".into(), "\n".into()], &[1, 3], &[vec![1, 4], vec![2, 3]], 4).unwrap();
        assert_eq!(&hm.bytes[..4], b"\x89PNG");
    }
}
