//! Training curves as in the d2l book: train loss, train accuracy and test accuracy per epoch,
//! one line per run, drawn with plotters as SVG and rasterised to PNG with resvg.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use super::{write_output, EpochMetrics};

/// A panel: its title and the metric it draws (`None` where an epoch has none: untested).
type Panel = (&'static str, fn(&EpochMetrics) -> Option<f64>);

const PANELS: [Panel; 3] = [
    ("train loss", |m| Some(m.train_loss)),
    ("train accuracy", |m| Some(m.train_acc)),
    ("test accuracy", |m| m.test_acc),
];

/// Distinguishable line colours (Tableau 10).
const COLORS: [RGBColor; 10] = [
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

/// The largest magnitude drawn. The axis is padded beyond the values, and plotters steps
/// through the range to place ticks: a range reaching f64's limit (1.7e308) overflowed to
/// infinity and the stepping never ended.
const DRAWABLE: f64 = 1e300;

/// A metric as drawn: non-finite values are left out (a gap in the line), huge ones clamped.
fn drawable(v: f64) -> Option<f64> {
    v.is_finite().then(|| v.clamp(-DRAWABLE, DRAWABLE))
}

/// A value axis's tick label: enough decimals (two at least) for ticks a tenth of `span` apart
/// to read apart (a lone point's axis spans 0.02: "0.198", not "0.20" five times).
fn value_label(y: f64, span: f64) -> String {
    if y.abs() >= 1e5 {
        return format!("{y:.1e}");
    }
    let step = span / 10.0;
    let decimals = match step > 0.0 && step.is_finite() {
        true => (-step.log10()).ceil().clamp(2.0, 6.0) as usize,
        false => 2,
    };
    format!("{y:.decimals$}")
}

/// Draws the three panels side by side as an SVG document.
pub fn curves_svg(runs: &[(String, Vec<EpochMetrics>)]) -> anyhow::Result<String> {
    let (width, height) = (1500u32, 480u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_epoch = runs
            .iter()
            .flat_map(|(_, m)| m.iter().map(|e| e.epoch))
            .max()
            .unwrap_or(1);
        for (panel, area) in PANELS.iter().zip(root.split_evenly((1, 3))) {
            let (title, value) = panel;
            let value = |m: &EpochMetrics| value(m).and_then(drawable);
            let values: Vec<f64> = runs
                .iter()
                .flat_map(|(_, m)| m.iter().filter_map(value))
                .collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
            // Relative to the values too, so that the padded range stays wider than a rounding
            // step when they are large and equal.
            let pad = ((hi - lo) * 0.08)
                .max(lo.abs().max(hi.abs()) * 1e-3)
                .max(0.01);
            let mut chart = ChartBuilder::on(&area)
                .caption(*title, ("sans-serif", 24))
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(64)
                .build_cartesian_2d(0.5f64..max_epoch as f64 + 0.5, (lo - pad)..(hi + pad))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(*title)
                .x_labels(max_epoch.min(10))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| value_label(*y, hi - lo + 2.0 * pad))
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .draw()?;
            for (i, (name, metrics)) in runs.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let points: Vec<(f64, f64)> = metrics
                    .iter()
                    .filter_map(|m| Some((m.epoch as f64, value(m)?)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                    });
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )?;
            }
            let corner = match title.contains("loss") {
                true => SeriesLabelPosition::UpperRight,
                false => SeriesLabelPosition::LowerRight,
            };
            legend(&mut chart, corner)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// A chart of this module: f64 on both axes, drawn as SVG.
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The series' names in a box at `corner`.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    corner: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

/// Rasterises an SVG document to PNG, with DejaVu Sans (built in) for the text.
pub fn svg_to_png(svg: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = resvg::usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_font_data(dejavu::sans::regular().to_vec());
    fonts.set_sans_serif_family("DejaVu Sans");
    let tree = resvg::usvg::Tree::from_str(svg, &options).context("cannot parse the SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("empty image")?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().context("cannot encode the PNG")
}

/// Writes `stem.svg` and `stem.png`, user-named outputs of `flag` (replaced only with
/// `force`); returns both paths.
pub fn write_curves(
    runs: &[(String, Vec<EpochMetrics>)],
    stem: &Path,
    flag: &str,
    force: bool,
) -> anyhow::Result<[PathBuf; 2]> {
    let svg = curves_svg(runs)?;
    let png = svg_to_png(&svg)?;
    let svg_path = stem.with_extension("svg");
    let png_path = stem.with_extension("png");
    write_output(flag, &svg_path, svg.as_bytes(), force)?;
    write_output(flag, &png_path, &png, force)?;
    Ok([svg_path, png_path])
}

/// One line of [`band_svg`]: its name and `(x, mean, std)` per swept value.
pub type BandSeries = (String, Vec<(f64, f64, f64)>);

/// A metric against a swept value: a line through the means of each series with a band of ±
/// one standard deviation; the x axis is logarithmic when `log_x` (learning rates).
pub fn band_svg(
    series: &[BandSeries],
    x_label: &str,
    y_label: &str,
    log_x: bool,
) -> anyhow::Result<String> {
    let (width, height) = (800u32, 520u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let points = || series.iter().flat_map(|(_, p)| p.iter());
        let bounds = |f: fn(&(f64, f64, f64)) -> (f64, f64)| {
            points()
                .map(f)
                .filter(|(a, b)| a.is_finite() && b.is_finite())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (a, b)| {
                    (lo.min(a), hi.max(b))
                })
        };
        let (x_lo, x_hi) = bounds(|p| (p.0, p.0));
        let (y_lo, y_hi) = bounds(|p| (p.1 - p.2, p.1 + p.2));
        let (x_lo, x_hi) = if x_lo.is_finite() {
            (x_lo, x_hi)
        } else {
            (1.0, 2.0)
        };
        let (y_lo, y_hi) = if y_lo.is_finite() {
            (y_lo, y_hi)
        } else {
            (0.0, 1.0)
        };
        let y_pad = ((y_hi - y_lo) * 0.08).max(0.005);
        let x = |v: f64| if log_x { v.max(1e-300).log10() } else { v };
        let x_pad = ((x(x_hi) - x(x_lo)) * 0.05).max(0.05);
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (x(x_lo) - x_pad)..(x(x_hi) + x_pad),
                (y_lo - y_pad)..(y_hi + y_pad),
            )?;
        chart
            .configure_mesh()
            .x_desc(if log_x {
                format!("{x_label} (log scale)")
            } else {
                x_label.to_string()
            })
            .y_desc(y_label)
            .x_label_formatter(&|v| match log_x {
                true => three_digits(10f64.powf(*v)),
                false => format!("{v:.3}"),
            })
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64, f64)> = pts
                .iter()
                .filter(|p| p.1.is_finite() && p.2.is_finite())
                .map(|&(a, m, s)| (x(a), m, s))
                .collect();
            let mut band: Vec<(f64, f64)> = pts.iter().map(|&(a, m, s)| (a, m + s)).collect();
            band.extend(pts.iter().rev().map(|&(a, m, s)| (a, m - s)));
            chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.2).filled())))?;
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|&(a, m, _)| (a, m)),
                    color.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart.draw_series(
                pts.iter()
                    .map(|&(a, m, _)| Circle::new((a, m), 3, color.filled())),
            )?;
        }
        // The legend goes where it hides the fewest means and band edges.
        let marks: Vec<(f64, f64)> = points()
            .flat_map(|&(a, m, s)| [(a, m), (a, m + s), (a, m - s)])
            .map(|(a, y)| {
                let fx = (x(a) - (x(x_lo) - x_pad)) / (x(x_hi) - x(x_lo) + 2.0 * x_pad);
                (fx, (y - (y_lo - y_pad)) / (y_hi - y_lo + 2.0 * y_pad))
            })
            .collect();
        // The legend's size as a share of the plot: rows of 15 px type, a 20 px sample line.
        let longest = series
            .iter()
            .map(|(n, _)| n.chars().count())
            .max()
            .unwrap_or(0);
        let size = (
            (longest as f64 * 8.5 + 60.0) / f64::from(width - 96),
            (series.len() as f64 * 20.0 + 24.0) / f64::from(height - 80),
        );
        legend(&mut chart, quietest_corner(&marks, size))?;
        root.present()?;
    }
    Ok(svg)
}

/// A tick label with three significant digits: 3.16, 31.6, 316 (not 3.162 or 316.228).
fn three_digits(v: f64) -> String {
    let decimals = (2 - v.abs().max(1e-300).log10().floor() as i32).clamp(0, 6) as usize;
    format!("{v:.decimals$}")
}

/// The plot corner with the fewest of `marks` (positions scaled to `[0, 1]`, y upwards) under
/// a legend of `(width, height)` (shares of the plot) there: where it hides the least.
fn quietest_corner(marks: &[(f64, f64)], (w, h): (f64, f64)) -> SeriesLabelPosition {
    use SeriesLabelPosition::{LowerLeft, LowerRight, UpperLeft, UpperRight};
    let count = |left: bool, low: bool| {
        marks
            .iter()
            .filter(|&&(x, y)| {
                (if left { x <= w } else { x >= 1.0 - w })
                    && (if low { y <= h } else { y >= 1.0 - h })
            })
            .count()
    };
    [
        (LowerLeft, count(true, true)),
        (LowerRight, count(false, true)),
        (UpperRight, count(false, false)),
        (UpperLeft, count(true, false)),
    ]
    .into_iter()
    .min_by_key(|&(_, n)| n)
    .map_or(LowerLeft, |(corner, _)| corner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(losses: &[f64]) -> (String, Vec<EpochMetrics>) {
        let metrics = losses
            .iter()
            .enumerate()
            .map(|(i, &loss)| EpochMetrics {
                epoch: i + 1,
                train_loss: loss,
                train_acc: 0.5,
                test_acc: Some(0.5),
                examples_per_sec: 1.0,
                seconds: 1.0,
                elapsed: (i + 1) as f64,
            })
            .collect();
        ("run".to_string(), metrics)
    }

    /// Each of these once hung plotters or overflowed the axis.
    #[test]
    fn extreme_and_non_finite_values_are_drawn() {
        for losses in [
            &[0.0, 1.7e308][..],
            &[-1.7e308, 1.7e308],
            &[1e300, 1e300],
            &[f64::NAN, f64::INFINITY, 2.0],
            &[f64::NEG_INFINITY],
        ] {
            let svg = curves_svg(&[run(losses)]).unwrap();
            assert!(svg.contains("train loss"), "{losses:?}");
        }
    }

    #[test]
    fn bands_draw_with_one_point_and_with_non_finite_values() {
        let series = vec![
            ("a".to_string(), vec![(0.1, 0.8, 0.01), (1.0, 0.85, 0.02)]),
            ("b".to_string(), vec![(0.1, f64::NAN, 0.0)]),
            ("c".to_string(), vec![(3.0, 0.5, 0.0)]),
        ];
        let svg = band_svg(&series, "lr", "final test accuracy", true).unwrap();
        assert!(
            svg.contains("lr (log scale)") && svg.contains("<polygon"),
            "{svg}"
        );
        svg_to_png(&svg).unwrap();
    }

    #[test]
    fn value_labels_have_the_decimals_their_ticks_need() {
        assert_eq!(value_label(0.198, 0.02), "0.198");
        assert_eq!(value_label(0.85, 0.5), "0.85");
        assert_eq!(value_label(2.5, 10.0), "2.50");
        assert_eq!(value_label(1.7e300, 1e300), "1.7e300");
        assert_eq!(value_label(0.5, 0.0), "0.50");
    }

    #[test]
    fn tick_labels_keep_three_significant_digits() {
        let labels: Vec<String> = [3.16227766, 31.6227766, 316.227766, 0.1, 1.0, 0.0316]
            .into_iter()
            .map(three_digits)
            .collect();
        assert_eq!(labels, ["3.16", "31.6", "316", "0.100", "1.00", "0.0316"]);
    }

    #[test]
    fn the_legend_goes_to_the_emptiest_corner() {
        // Marks low on the left and high on the right: the upper left is empty.
        let marks = [(0.1, 0.1), (0.2, 0.2), (0.9, 0.9), (0.8, 0.1)];
        let size = (0.4, 0.35);
        assert!(matches!(
            quietest_corner(&marks, size),
            SeriesLabelPosition::UpperLeft
        ));
        // None anywhere: the first choice, lower left.
        assert!(matches!(
            quietest_corner(&[], size),
            SeriesLabelPosition::LowerLeft
        ));
        // A small legend fits beside a mark that a large one would cover.
        let marks = [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7), (0.05, 0.05)];
        assert!(matches!(
            quietest_corner(&marks, (0.2, 0.2)),
            SeriesLabelPosition::LowerRight
        ));
    }
}
