//! The server's Prometheus metrics, served at `GET /metrics`.
//!
//! This module owns the metric names, their labels and their text
//! encoding: attestations by phase and verdict, turnover step durations,
//! failures and bytes (erased, written, snapshotted), turnovers by
//! outcome, and how many nodes are quarantined. Handlers call the small methods of [`Metrics`]; nothing else
//! touches the registry. It must never put a value a client chose into a
//! label unfiltered (every label value comes from a short fixed list, so a
//! misbehaving agent cannot grow the series without bound), and never
//! expose anything about a node beyond counts.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use warden_protocol::attest::Phase;

use crate::api::AppState;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text,
/// which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels as `(name, value)` pairs; every value is `'static` (see
/// [`known`]), so a series cannot be created from request data.
type Labels = Vec<(&'static str, &'static str)>;

/// Steps a turnover runs; anything else is counted as `other`.
const STEPS: [&str; 5] = ["snapshot", "wipe", "image", "restore", "handoff"];
/// Attestation phases as the wire names them.
const PHASES: [&str; 2] = ["boot", "handoff"];

/// Upper bounds of the step-duration buckets, in seconds: from a second
/// (a handoff) to four hours (a slow full overwrite of a large disk).
const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0, 7200.0, 14400.0,
];

/// The server's metrics. Cheap to update from any handler: every method
/// takes `&self` and only touches atomics (and a family's lock while a
/// new label set is first seen).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    attestations: Family<Labels, Counter>,
    step_duration: Family<Labels, Histogram, fn() -> Histogram>,
    step_failures: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    turnovers: Family<Labels, Counter>,
    /// Nodes quarantined now; read from the database at each scrape, so
    /// it is right after a restart and with several writers.
    quarantined: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// `value` if it is one of `allowed`, else `other`.
fn known(value: &str, allowed: &[&'static str]) -> &'static str {
    allowed
        .iter()
        .find(|a| a.eq_ignore_ascii_case(value))
        .copied()
        .unwrap_or("other")
}

/// The wire name of an attestation phase, for [`Metrics::attestation`].
pub fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Boot => "boot",
        Phase::Handoff => "handoff",
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let attestations = Family::<Labels, Counter>::default();
        registry.register(
            "warden_attestations",
            "Attestation verdicts, by phase (boot, handoff) and status (ok, failed)",
            attestations.clone(),
        );
        let step_duration: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "warden_step_duration",
            "Duration of finished turnover steps (snapshot, wipe, image, handoff)",
            Unit::Seconds,
            step_duration.clone(),
        );
        let step_failures = Family::<Labels, Counter>::default();
        registry.register(
            "warden_step_failures",
            "Turnover steps that ended in failure, by step",
            step_failures.clone(),
        );
        let bytes = Family::<Labels, Counter>::default();
        registry.register(
            "warden_bytes",
            "Bytes erased (wipe), written (image), snapshotted (snapshot) and restored (restore) by finished steps",
            bytes.clone(),
        );
        let turnovers = Family::<Labels, Counter>::default();
        registry.register(
            "warden_turnovers",
            "Turnovers that ended, by outcome (done, failed)",
            turnovers.clone(),
        );
        let quarantined = Gauge::default();
        registry.register(
            "warden_quarantined_nodes",
            "Nodes quarantined now (a verdict failed on their evidence; not yet released)",
            quarantined.clone(),
        );
        // Series that always exist, so a dashboard shows 0 rather than
        // "no data" before the first event.
        for phase in PHASES {
            for status in ["ok", "failed"] {
                let _ = attestations.get_or_create(&vec![("phase", phase), ("status", status)]);
            }
        }
        for step in STEPS {
            let _ = step_duration.get_or_create(&vec![("step", step)]);
            let _ = step_failures.get_or_create(&vec![("step", step)]);
        }
        for kind in ["erased", "written", "snapshotted", "restored"] {
            let _ = bytes.get_or_create(&vec![("kind", kind)]);
        }
        for outcome in ["done", "failed"] {
            let _ = turnovers.get_or_create(&vec![("outcome", outcome)]);
        }
        Metrics {
            registry,
            attestations,
            step_duration,
            step_failures,
            bytes,
            turnovers,
            quarantined,
        }
    }

    /// Sets the number of quarantined nodes.
    pub fn set_quarantined(&self, nodes: u64) {
        self.quarantined
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
    }

    /// Counts one attestation verdict: `phase` is `boot` or `handoff`
    /// (see [`phase_label`]), `ok` whether the verdict was OK.
    pub fn attestation(&self, phase: &str, ok: bool) {
        let status = if ok { "ok" } else { "failed" };
        self.attestations
            .get_or_create(&vec![("phase", known(phase, &PHASES)), ("status", status)])
            .inc();
    }

    /// Records a finished turnover step: its duration, whether it failed,
    /// and its bytes (`wipe` → erased, `image` → written, `snapshot` →
    /// snapshotted, `restore` → restored; other steps move no bytes worth
    /// counting).
    pub fn step(&self, step: &str, ok: bool, duration_ms: u64, bytes: u64) {
        let step = known(step, &STEPS);
        let labels = vec![("step", step)];
        // Precision loss past 2^53 ms (285,000 years) is irrelevant.
        #[allow(clippy::cast_precision_loss)]
        let seconds = duration_ms as f64 / 1000.0;
        self.step_duration.get_or_create(&labels).observe(seconds);
        if !ok {
            self.step_failures.get_or_create(&labels).inc();
        }
        let kind = match step {
            "wipe" => "erased",
            "image" => "written",
            "snapshot" => "snapshotted",
            "restore" => "restored",
            _ => return,
        };
        if bytes > 0 {
            self.bytes
                .get_or_create(&vec![("kind", kind)])
                .inc_by(bytes);
        }
    }

    /// Counts one turnover that ended: `ok` is done, else failed.
    pub fn turnover(&self, ok: bool) {
        let outcome = if ok { "done" } else { "failed" };
        self.turnovers
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Everything in the OpenMetrics text format ([`CONTENT_TYPE`]),
    /// ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoding error would be a
        // bug in a metric type, and half a page is still worth serving.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// `GET /metrics`, merged into [`crate::api::router`]. No token: it holds
/// counts only, and scrapers rarely carry one.
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(serve_metrics))
}

async fn serve_metrics(State(state): State<AppState>) -> Response {
    // A database error leaves the last value: the rest of the page is
    // still worth serving.
    if let Ok(n) = state
        .with_db("counting quarantined nodes", |db| db.quarantined_count())
        .await
    {
        state.metrics().set_quarantined(n);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        state.metrics().encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name{labels}` (labels as printed).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.split(' ').next().unwrap().parse().unwrap())
    }

    #[test]
    fn starts_at_zero_with_the_expected_series() {
        let text = Metrics::new().encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for series in [
            r#"warden_attestations_total{phase="boot",status="ok"}"#,
            r#"warden_attestations_total{phase="handoff",status="failed"}"#,
            r#"warden_bytes_total{kind="erased"}"#,
            r#"warden_bytes_total{kind="written"}"#,
            r#"warden_bytes_total{kind="snapshotted"}"#,
            r#"warden_turnovers_total{outcome="done"}"#,
            r#"warden_turnovers_total{outcome="failed"}"#,
            r#"warden_step_failures_total{step="wipe"}"#,
            r#"warden_step_duration_seconds_count{step="image"}"#,
            "warden_quarantined_nodes",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert!(
            text.contains("# TYPE warden_step_duration_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn counters_follow_calls() {
        let m = Metrics::new();
        m.attestation("boot", true);
        m.attestation("boot", true);
        m.attestation(phase_label(Phase::Handoff), false);
        m.step("wipe", true, 2500, 1 << 30);
        m.step("image", true, 1000, 4096);
        m.step("snapshot", false, 10, 512);
        m.step("restore", true, 20, 8192);
        m.step("handoff", true, 100, 0);
        m.turnover(true);
        m.turnover(false);
        m.turnover(false);
        let text = m.encode();
        let expect = |series: &str, value: f64| {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        };
        expect(
            r#"warden_attestations_total{phase="boot",status="ok"}"#,
            2.0,
        );
        expect(
            r#"warden_attestations_total{phase="handoff",status="failed"}"#,
            1.0,
        );
        expect(
            r#"warden_attestations_total{phase="boot",status="failed"}"#,
            0.0,
        );
        expect(
            r#"warden_bytes_total{kind="erased"}"#,
            f64::from(1u32 << 30),
        );
        expect(r#"warden_bytes_total{kind="written"}"#, 4096.0);
        expect(r#"warden_bytes_total{kind="snapshotted"}"#, 512.0);
        expect(r#"warden_bytes_total{kind="restored"}"#, 8192.0);
        expect(r#"warden_step_duration_seconds_count{step="restore"}"#, 1.0);
        expect(r#"warden_step_failures_total{step="snapshot"}"#, 1.0);
        expect(r#"warden_step_duration_seconds_count{step="wipe"}"#, 1.0);
        expect(r#"warden_step_duration_seconds_sum{step="wipe"}"#, 2.5);
        expect(
            r#"warden_step_duration_seconds_bucket{le="5.0",step="wipe"}"#,
            1.0,
        );
        expect(
            r#"warden_step_duration_seconds_bucket{le="1.0",step="wipe"}"#,
            0.0,
        );
        expect(r#"warden_step_duration_seconds_count{step="handoff"}"#, 1.0);
        expect(r#"warden_turnovers_total{outcome="done"}"#, 1.0);
        expect(r#"warden_turnovers_total{outcome="failed"}"#, 2.0);
        m.set_quarantined(3);
        assert_eq!(sample(&m.encode(), "warden_quarantined_nodes"), Some(3.0));
    }

    #[test]
    fn unknown_label_values_collapse_to_other() {
        let m = Metrics::new();
        m.step("rm -rf /\"", false, 1, 99);
        m.attestation("sideways", true);
        let text = m.encode();
        assert_eq!(
            sample(&text, r#"warden_step_failures_total{step="other"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"warden_attestations_total{phase="other",status="ok"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("rm -rf"), "{text}");
        // Bytes of an unknown step are not attributed to any kind.
        assert_eq!(
            sample(&text, r#"warden_bytes_total{kind="erased"}"#),
            Some(0.0)
        );
    }
}
