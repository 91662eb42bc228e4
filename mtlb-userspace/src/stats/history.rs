//! The recent past of each replica's active connections, for the stats
//! page's sparklines.
//!
//! Sampled on the stats thread at a fixed interval (`stats_sample_ms`),
//! never per request: a page that refreshes itself, or many people looking
//! at it, neither adds samples nor skews them. Bounded: [`CAPACITY`]
//! samples of at most `MAX_REPLICAS` counts each (about 30 KiB). A sample
//! reads the mmap'ed CONNS array (no syscall per replica), so it costs the
//! agent's loop nothing and no connection is looked at.

use super::http::Source;
use crate::kernel::maps::{Maps, MapsError};
use mtlb_common::MAX_REPLICAS;
use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

/// Samples kept: with the default 10 s interval, ten minutes.
pub const CAPACITY: usize = 60;

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Active connections by slot.
    active: Vec<u64>,
}

/// A bounded ring of samples, all slots read at the same instant (so a
/// total is the sum of one sample).
#[derive(Debug, Clone)]
pub struct History {
    every: Duration,
    samples: VecDeque<Sample>,
}

impl History {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            samples: VecDeque::with_capacity(CAPACITY),
        }
    }

    /// The sampling interval.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// How far back a full ring reaches.
    pub fn window(&self) -> Duration {
        self.every * CAPACITY as u32
    }

    /// Adds one sample (active connections by slot), dropping the oldest
    /// once full.
    pub fn record(&mut self, at: Instant, mut active: Vec<u64>) {
        active.truncate(MAX_REPLICAS as usize);
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at, active });
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `slot`'s samples within the window, oldest first, as (age at `now`,
    /// count). Samples from before the slot existed (scaled up since) have
    /// no count for it and are left out.
    pub fn series(&self, slot: usize, now: Instant) -> Vec<(Duration, u64)> {
        self.points(now, |s| s.active.get(slot).copied())
    }

    /// The sum over all slots of each sample, like [`Self::series`].
    pub fn total(&self, now: Instant) -> Vec<(Duration, u64)> {
        self.points(now, |s| {
            Some(s.active.iter().fold(0u64, |a, b| a.saturating_add(*b)))
        })
    }

    fn points(&self, now: Instant, value: impl Fn(&Sample) -> Option<u64>) -> Vec<(Duration, u64)> {
        let window = self.window();
        self.samples
            .iter()
            .filter_map(|s| {
                let age = now.saturating_duration_since(s.at);
                (age <= window).then_some((age, value(s)?))
            })
            .collect()
    }
}

/// Active connections (established and in handshake) of each configured
/// slot, from the mmap'ed counters: what a sample holds.
pub fn read_active(maps: &Maps) -> Result<Vec<u64>, MapsError> {
    let replicas = maps.settings()?.replicas as usize;
    Ok(maps.counts(replicas))
}

/// Samples into `src`'s history every `stats_sample_ms`, the first at once,
/// for as long as the stats thread runs. A failed reading is skipped (the
/// sparkline shows a gap in time, not a made-up value).
pub async fn sample(src: Arc<Source>) {
    let mut tick = tokio::time::interval(src.history_every());
    // A late tick (a slow first byte reading holding the thread) is not
    // made up for with a burst of samples.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        src.sample_history();
    }
}

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
pub fn sparkline(points: &[(Duration, u64)], now: u64, window: Duration, label: &str) -> String {
    let w = window.as_secs_f64().max(f64::MIN_POSITIVE);
    let mut pts: Vec<(f64, u64)> = points
        .iter()
        .filter(|(age, _)| *age <= window)
        .map(|(age, v)| (SPARK_W * (1.0 - age.as_secs_f64() / w), *v))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.push((SPARK_W, now));
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
    let first_x = pts[0].0;
    let area = format!(
        "M{first_x:.1},{SPARK_H:.1} L{} L{SPARK_W:.1},{SPARK_H:.1} Z",
        line.replace(' ', " L")
    );
    let (cx, cy) = (SPARK_W, y(now));
    let title = format!(
        "{label}: now {now}, max {max} over the last {}",
        super::units::duration(window.as_secs_f64())
    );
    format!(
        "<svg class=\"spark\" width=\"{SPARK_W}\" height=\"{SPARK_H}\" viewBox=\"0 0 {SPARK_W} {SPARK_H}\" \
         role=\"img\" aria-label=\"{title}\" data-samples=\"{}\" data-max=\"{max}\" data-now=\"{now}\">\
         <title>{title}</title><path class=\"area\" d=\"{area}\"/>\
         <polyline points=\"{line}\"/><circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2\"/></svg>",
        pts.len() - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_ring_is_bounded_and_drops_the_oldest() {
        let t0 = Instant::now();
        let mut h = History::new(10 * S);
        for i in 0..(CAPACITY as u64 + 25) {
            h.record(t0 + 10 * S * i as u32, vec![i, 2 * i]);
        }
        assert_eq!(h.len(), CAPACITY);
        let now = t0 + 10 * S * (CAPACITY as u32 + 24);
        let s = h.series(1, now);
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s.first().unwrap(), &(10 * S * (CAPACITY as u32 - 1), 50));
        assert_eq!(
            s.last().unwrap(),
            &(Duration::ZERO, 2 * (CAPACITY as u64 + 24))
        );
    }

    #[test]
    fn no_more_than_max_replicas_counts_are_kept() {
        let mut h = History::new(S);
        h.record(Instant::now(), vec![1; 1000]);
        assert_eq!(h.samples[0].active.len(), MAX_REPLICAS as usize);
    }

    #[test]
    fn slots_added_later_have_only_their_own_samples() {
        let t0 = Instant::now();
        let mut h = History::new(S);
        h.record(t0, vec![1]);
        h.record(t0 + S, vec![2, 5]);
        let now = t0 + 2 * S;
        assert_eq!(h.series(0, now), vec![(2 * S, 1), (S, 2)]);
        assert_eq!(h.series(1, now), vec![(S, 5)]);
        assert_eq!(h.series(7, now), vec![]);
        assert_eq!(h.total(now), vec![(2 * S, 1), (S, 7)]);
    }

    #[test]
    fn samples_older_than_the_window_are_not_shown() {
        let t0 = Instant::now();
        let mut h = History::new(S);
        h.record(t0, vec![9]);
        h.record(t0 + 30 * S, vec![1]);
        // 61 s after the first: outside 60 × 1 s.
        assert_eq!(h.series(0, t0 + 61 * S), vec![(31 * S, 1)]);
    }

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
        let svg = sparkline(&[(60 * S, 0), (30 * S, 10), (10 * S, 5)], 2, window, "x");
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
        let svg = sparkline(&[], 0, 60 * S, "x");
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
        let svg = sparkline(&[(120 * S, 100), (30 * S, 1)], 1, 60 * S, "x");
        let p = polyline(&svg);
        assert_eq!(p.len(), 2);
        assert!(svg.contains("data-max=\"1\""));
    }
}
