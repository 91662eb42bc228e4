//! The stats page's sparklines: an inline SVG per row (no external asset,
//! no JavaScript), one line of HTML so a row stays on one line.

use super::units;
use maud::{Markup, html};
use std::{fmt::Write as _, time::Duration};

/// Size of a sparkline, in CSS pixels.
pub const SPARK_W: f64 = 120.0;
pub const SPARK_H: f64 = 24.0;
const PAD: f64 = 2.0;

/// An inline SVG sparkline of `points` (age, count) over `window`, ending
/// at `now` (the count at the moment of the request, at the right edge):
/// a line over a light area, a dot at the present. The vertical scale is
/// the row's own maximum (said in the tooltip), as sparklines usually are:
/// the shape tells the trend, the numbers next to it the size. `label` is
/// the tooltip's first words.
pub fn sparkline(points: &[(Duration, u64)], now: u64, window: Duration, label: &str) -> Markup {
    let pts = placed(points, now, window);
    let max = pts.iter().map(|p| p.1).max().unwrap_or(0);
    let y = |v: u64| {
        let frac = if max == 0 { 0.0 } else { v as f64 / max as f64 };
        SPARK_H - PAD - frac * (SPARK_H - 2.0 * PAD)
    };
    let mut line = String::new();
    for (i, (x, v)) in pts.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        let _ = write!(line, "{x:.1},{:.1}", y(*v));
    }
    let area = format!(
        "M{:.1},{SPARK_H:.1} L{} L{SPARK_W:.1},{SPARK_H:.1} Z",
        pts[0].0,
        line.replace(' ', " L")
    );
    let title = format!(
        "{label}: now {now}, max {max} over the last {}",
        units::duration(window.as_secs_f64())
    );
    html! {
        svg class="spark" width=(SPARK_W) height=(SPARK_H)
            viewBox={ "0 0 " (SPARK_W) " " (SPARK_H) } role="img" aria-label=(title)
            data-samples=(pts.len() - 1) data-max=(max) data-now=(now) {
            title { (title) }
            path class="area" d=(area) {}
            polyline points=(line) {}
            circle cx=(format!("{SPARK_W:.1}")) cy=(format!("{:.1}", y(now))) r="2" {}
        }
    }
}

/// The points within `window` as (x, count), left to right, with `now` at
/// the right edge: never empty.
fn placed(points: &[(Duration, u64)], now: u64, window: Duration) -> Vec<(f64, u64)> {
    let w = window.as_secs_f64().max(f64::MIN_POSITIVE);
    let mut pts: Vec<(f64, u64)> = points
        .iter()
        .filter(|(age, _)| *age <= window)
        .map(|(age, v)| (SPARK_W * (1.0 - age.as_secs_f64() / w), *v))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.push((SPARK_W, now));
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// (x, y) pairs of the polyline.
    fn polyline(svg: &str) -> Vec<(f64, f64)> {
        let start = svg.find("points=\"").unwrap() + 8;
        let end = start + svg[start..].find('"').unwrap();
        svg[start..end]
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn sparkline_spans_the_window_and_ends_at_now() {
        let window = 60 * S;
        // Oldest at the left edge, a peak in the middle, now at the right.
        let svg =
            sparkline(&[(60 * S, 0), (30 * S, 10), (10 * S, 5)], 2, window, "x").into_string();
        let p = polyline(&svg);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], (0.0, SPARK_H - PAD), "0 at the bottom, left edge");
        assert_eq!(p[1], (60.0, PAD), "the maximum at the top");
        assert_eq!(p[3].0, SPARK_W, "now at the right edge");
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0), "left to right");
        assert!(svg.contains("data-samples=\"3\""), "{svg}");
        assert!(svg.contains("data-max=\"10\""), "{svg}");
        assert!(svg.contains("data-now=\"2\""), "{svg}");
        assert!(svg.contains("<title>x: now 2, max 10 over the last 1m00s</title>"));
        assert!(svg.contains("<circle cx=\"120.0\""), "{svg}");
        assert!(!svg.contains('\n'), "one line, for grep");
    }

    #[test]
    fn sparkline_of_nothing_yet_is_a_dot_on_the_floor() {
        let svg = sparkline(&[], 0, 60 * S, "x").into_string();
        assert_eq!(polyline(&svg), vec![(SPARK_W, SPARK_H - PAD)]);
        assert!(svg.contains("data-samples=\"0\""));
        // The area path is closed and well formed.
        assert!(
            svg.contains("d=\"M120.0,24.0 L120.0,22.0 L120.0,24.0 Z\""),
            "{svg}"
        );
    }

    #[test]
    fn sparkline_ignores_points_outside_the_window() {
        let svg = sparkline(&[(120 * S, 100), (30 * S, 1)], 1, 60 * S, "x").into_string();
        let p = polyline(&svg);
        assert_eq!(p.len(), 2);
        assert!(svg.contains("data-max=\"1\""));
    }
}
