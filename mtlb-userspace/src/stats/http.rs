//! The stats endpoint's routes (default 127.0.0.1:8404, as HAProxy's stats
//! were): `/metrics` (Prometheus), `/stats` (HTML, one row per replica),
//! `/stats;csv` or `/stats?format=csv`, `/healthz`. Each request takes a
//! fresh [`Collector::snapshot`] and hands it to its renderer; the server
//! and its limits are in the `server` module.

use super::{collector::Collector, csv, metrics, page, snapshot::Snapshot, textfmt};
use crate::kernel::maps::MapsError;
use axum::{
    Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

pub fn router(src: Arc<Collector>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/stats", get(stats))
        .route("/stats;csv", get(stats_csv))
        .route("/healthz", get(healthz))
        .with_state(src)
}

fn failed(e: MapsError) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading the maps: {}\n", crate::error::report(&e)),
    )
        .into_response()
}

/// OpenMetrics for clients that ask for it (Prometheus does), the
/// Prometheus text format for the rest (curl, promtool): see `textfmt`.
async fn serve_metrics(State(src): State<Arc<Collector>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match src.snapshot() {
        Ok(s) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics::render(&s),
        )
            .into_response(),
        Ok(s) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            textfmt::from_openmetrics(&metrics::render(&s)),
        )
            .into_response(),
        Err(e) => failed(e),
    }
}

async fn stats(
    State(src): State<Arc<Collector>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match src.snapshot() {
        Ok(s) if q.get("format").is_some_and(|f| f == "csv") => serve_csv(&s),
        Ok(s) => Html(render_page(&src, &s)).into_response(),
        Err(e) => failed(e),
    }
}

async fn stats_csv(State(src): State<Arc<Collector>>) -> Response {
    match src.snapshot() {
        Ok(s) => serve_csv(&s),
        Err(e) => failed(e),
    }
}

/// The HTML page of `s`, with the sparklines' history as it is now.
fn render_page(src: &Collector, s: &Snapshot) -> String {
    page::render(
        s,
        &page::Context {
            version: env!("CARGO_PKG_VERSION"),
            uptime: src.uptime(),
            history: &src.history(),
            now: Instant::now(),
            wall: SystemTime::now(),
        },
    )
}

fn serve_csv(s: &Snapshot) -> Response {
    (
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        csv::render(s),
    )
        .into_response()
}

/// How long /healthz tells of checks the agent could not run.
const FAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

async fn healthz(State(src): State<Arc<Collector>>) -> Response {
    match src.snapshot() {
        // Steering goes on while the agent cannot run checks (replicas
        // keep their state): still 200, with the problem said.
        Ok(s) if s.backends.iter().any(|b| b.up) => {
            let body = if src.faulted_within(FAULT_WINDOW) {
                "OK\nagent problem: health checks could not run in the last minute (mtlb_agent_check_errors_total)\n"
            } else {
                "OK\n"
            };
            (StatusCode::OK, body).into_response()
        }
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "no backend available\n").into_response(),
        Err(e) => failed(e),
    }
}
