//! What `wardenctl watch NODE` and `wardenctl log NODE` show: a node's
//! turnover progress as one bar per step (bytes, rate, ETA), and its
//! console log, polled from the server.
//!
//! The rendering functions are pure (a view in, text out) so every case is
//! tested without a server; the polling loops take their source as a
//! trait, implemented by [`Client`]. This module must never write to the
//! server (it only reads) and never decide a turnover's outcome itself: it
//! shows the server's `plan_state` and stops when that is final.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use warden_protocol::turnover::{ConsoleLine, ConsoleLog, PlanState, ProgressView, StepProgress};

use crate::client::{human_bytes, Client, ClientError};

/// How often the loops poll the server.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Narrowest and widest bar drawn, in characters.
const BAR_MIN: usize = 10;
const BAR_MAX: usize = 50;

/// What can end a watch or a log early.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("writing to the terminal: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where the loops read from: the server through [`Client`], or a fake in
/// tests.
pub trait Source {
    /// `GET /v1/nodes/{id}/progress`.
    fn progress(&self, node: &str) -> impl Future<Output = Result<ProgressView, ClientError>>;
    /// `GET /v1/nodes/{id}/console[?after=SEQ]`.
    fn console(
        &self,
        node: &str,
        after: Option<i64>,
    ) -> impl Future<Output = Result<ConsoleLog, ClientError>>;
}

impl Source for Client {
    fn progress(&self, node: &str) -> impl Future<Output = Result<ProgressView, ClientError>> {
        Client::progress(self, node)
    }

    fn console(
        &self,
        node: &str,
        after: Option<i64>,
    ) -> impl Future<Output = Result<ConsoleLog, ClientError>> {
        Client::console(self, node, after)
    }
}

/// Whether a plan in this state will not change any more.
pub fn is_final(state: Option<PlanState>) -> bool {
    matches!(
        state,
        Some(PlanState::Done | PlanState::Failed | PlanState::Superseded)
    )
}

/// `42s`, `3m07s`, `1h02m03s`.
pub fn format_duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, (seconds / 60) % 60, seconds % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The whole progress screen: a header line, then one line per step, each
/// at most `width` characters when `width` leaves room for a bar of
/// [`BAR_MIN`] (a narrower terminal wraps rather than losing numbers).
pub fn render_progress(view: &ProgressView, width: usize) -> String {
    let mut out = format!(
        "node {}  lease {}  plan {}\n",
        view.node_id,
        view.lease_id.as_deref().unwrap_or("-"),
        view.plan_state.map_or("none", PlanState::name)
    );
    if view.steps.is_empty() {
        out.push_str("(no step has reported progress yet)\n");
        return out;
    }
    let name_width = view
        .steps
        .iter()
        .map(|s| s.step.chars().count())
        .max()
        .unwrap_or(0);
    for step in &view.steps {
        out.push_str(&render_step(step, name_width, width));
        out.push('\n');
    }
    out
}

/// One step: `wipe  [#####     ]  50%  1.0 GiB / 2.0 GiB  100.0 MiB/s  ETA 10s  running`.
pub fn render_step(step: &StepProgress, name_width: usize, width: usize) -> String {
    let finished_ok = step.state == "ok";
    let failed = step.state == "failed";
    // Of 1000, so 99.95% does not print as 100% while bytes remain.
    let permille = match step.total {
        Some(0) => Some(if finished_ok { 1000 } else { 0 }),
        Some(total) => Some(ratio(step.done.min(total), total, 1000)),
        None if finished_ok => Some(1000),
        None => None,
    };
    let percent = permille.map_or_else(|| "  ?%".to_owned(), |p| format!("{:>3}%", p / 10));
    let bytes = match step.total {
        Some(total) => format!("{} / {}", human_bytes(step.done), human_bytes(total)),
        None => format!("{} / ?", human_bytes(step.done)),
    };
    let mut tail = format!("{percent}  {bytes}");
    if step.state == "running" {
        if step.rate > 0 {
            tail.push_str(&format!("  {}/s", human_bytes(step.rate)));
        }
        if let Some(eta) = step.eta_seconds {
            tail.push_str(&format!("  ETA {}", format_duration(eta)));
        }
    }
    tail.push_str("  ");
    tail.push_str(match step.state.as_str() {
        "ok" => "done",
        "failed" => "FAILED",
        other => other,
    });

    // name + " [" + bar + "] " + tail
    let used = name_width + 4 + tail.chars().count();
    let bar_width = width.saturating_sub(used).clamp(BAR_MIN, BAR_MAX);
    let bar = match permille {
        Some(p) => {
            let filled = usize::try_from(ratio(p, 1000, u64::try_from(bar_width).unwrap_or(0)))
                .unwrap_or(bar_width);
            let mut bar = "#".repeat(filled);
            if failed && filled < bar_width {
                // Where it stopped.
                bar.push('X');
            }
            format!("{bar:<bar_width$}")
        }
        // Size unknown: no fraction to draw.
        None if failed => format!("{:<bar_width$}", "X"),
        None => "?".repeat(bar_width),
    };
    format!("{:<name_width$} [{bar}] {tail}", step.step)
}

/// `part * scale / whole` without overflow, rounded down; 0 when `whole` is 0.
fn ratio(part: u64, whole: u64, scale: u64) -> u64 {
    (u128::from(part) * u128::from(scale))
        .checked_div(u128::from(whole))
        .map_or(0, |v| u64::try_from(v).unwrap_or(u64::MAX))
}

/// Console lines as the node printed them, one per line.
pub fn render_console(lines: &[ConsoleLine]) -> String {
    let mut out = String::new();
    for line in lines {
        out.push_str(line.line.trim_end_matches(['\r', '\n']));
        out.push('\n');
    }
    out
}

/// How `watch` shows progress.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// One poll, one picture, then return.
    pub once: bool,
    /// The ProgressView as JSON instead of bars (pretty with `once`, else
    /// one compact line per change).
    pub json: bool,
    /// Redraw in place (the output is a terminal) instead of appending.
    pub redraw: bool,
    /// Terminal width in characters.
    pub width: usize,
    pub interval: Duration,
}

/// Polls the node's progress and draws it until its plan is final (or
/// once); returns the last view, so the caller can tell done from failed.
pub async fn watch<S: Source>(
    source: &S,
    node: &str,
    options: &WatchOptions,
    out: &mut impl Write,
) -> Result<ProgressView, WatchError> {
    let mut drawn_lines = 0usize;
    let mut last: Option<ProgressView> = None;
    loop {
        let view = source.progress(node).await?;
        if last.as_ref() != Some(&view) {
            if options.json {
                if options.once {
                    writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
                } else {
                    writeln!(out, "{}", serde_json::to_string(&view)?)?;
                }
            } else {
                let frame = render_progress(&view, options.width);
                if options.redraw && drawn_lines > 0 {
                    // Up to the previous frame's first line, clear to the end.
                    write!(out, "\x1b[{drawn_lines}A\x1b[J")?;
                } else if drawn_lines > 0 {
                    writeln!(out)?;
                }
                out.write_all(frame.as_bytes())?;
                drawn_lines = frame.lines().count();
            }
            out.flush()?;
        }
        if options.once || is_final(view.plan_state) {
            return Ok(view);
        }
        last = Some(view);
        tokio::time::sleep(options.interval).await;
    }
}

/// How `log` shows the console.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Keep polling for new lines (until interrupted).
    pub follow: bool,
    /// Lines as JSON: the ConsoleLog without `follow`, else one compact
    /// ConsoleLine per line.
    pub json: bool,
    pub interval: Duration,
}

/// Prints the node's console log from the start, page by page; with
/// `follow`, keeps polling for new lines.
pub async fn log<S: Source>(
    source: &S,
    node: &str,
    options: &LogOptions,
    out: &mut impl Write,
) -> Result<(), WatchError> {
    let mut after: Option<i64> = None;
    let mut all: Vec<ConsoleLine> = Vec::new();
    loop {
        let page = source.console(node, after).await?;
        // Only lines past the cursor: a server that ignores `after` must
        // not make us print (or loop on) the same lines again.
        let fresh: Vec<ConsoleLine> = page
            .lines
            .into_iter()
            .filter(|l| after.is_none_or(|a| l.seq > a))
            .collect();
        if let Some(max) = fresh.iter().map(|l| l.seq).max() {
            after = Some(max);
            if options.json && !options.follow {
                all.extend(fresh);
            } else {
                if options.json {
                    for line in &fresh {
                        writeln!(out, "{}", serde_json::to_string(line)?)?;
                    }
                } else {
                    out.write_all(render_console(&fresh).as_bytes())?;
                }
                out.flush()?;
            }
            // More may be waiting beyond this page: ask again at once.
            continue;
        }
        if !options.follow {
            break;
        }
        tokio::time::sleep(options.interval).await;
    }
    if options.json && !options.follow {
        let log = ConsoleLog {
            node_id: node.to_owned(),
            lines: all,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&log)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    fn step(name: &str, state: &str, done: u64, total: Option<u64>) -> StepProgress {
        StepProgress {
            step: name.into(),
            state: state.into(),
            done,
            total,
            rate: 0,
            eta_seconds: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:01Z".into(),
        }
    }

    /// The characters between the brackets.
    fn bar_of(line: &str) -> &str {
        let start = line.find('[').unwrap() + 1;
        let end = line.find(']').unwrap();
        &line[start..end]
    }

    #[test]
    fn bar_at_zero_half_and_full() {
        let zero = render_step(&step("wipe", "running", 0, Some(1 << 30)), 4, 80);
        assert!(bar_of(&zero).chars().all(|c| c == ' '), "{zero}");
        assert!(zero.contains("  0%"), "{zero}");
        assert!(zero.contains("0 B / 1.0 GiB"), "{zero}");

        let mut half = step("wipe", "running", 1 << 29, Some(1 << 30));
        half.rate = 100 << 20;
        half.eta_seconds = Some(125);
        let line = render_step(&half, 4, 80);
        let bar = bar_of(&line);
        let filled = bar.chars().filter(|&c| c == '#').count();
        assert_eq!(filled * 2, bar.chars().count(), "{line}");
        assert!(bar.starts_with('#') && bar.ends_with(' '), "{line}");
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains("512.0 MiB / 1.0 GiB"), "{line}");
        assert!(line.contains("100.0 MiB/s"), "{line}");
        assert!(line.contains("ETA 2m05s"), "{line}");
        assert!(line.ends_with("running"), "{line}");

        let full = render_step(&step("image", "ok", 1 << 30, Some(1 << 30)), 5, 80);
        assert!(bar_of(&full).chars().all(|c| c == '#'), "{full}");
        assert!(full.contains("100%"), "{full}");
        assert!(full.ends_with("done"), "{full}");
        assert!(!full.contains("ETA"), "{full}");
    }

    #[test]
    fn almost_done_is_not_100_percent() {
        let line = render_step(&step("wipe", "running", 999_999, Some(1_000_000)), 4, 80);
        assert!(line.contains(" 99%"), "{line}");
        assert!(bar_of(&line).ends_with(' '), "{line}");
    }

    #[test]
    fn unknown_total() {
        let line = render_step(&step("image", "running", 3 << 20, None), 5, 80);
        assert!(bar_of(&line).chars().all(|c| c == '?'), "{line}");
        assert!(line.contains("  ?%"), "{line}");
        assert!(line.contains("3.0 MiB / ?"), "{line}");
        // Finished with an unknown size: complete.
        let done = render_step(&step("handoff", "ok", 0, None), 7, 80);
        assert!(bar_of(&done).chars().all(|c| c == '#'), "{done}");
        assert!(done.contains("100%"), "{done}");
    }

    #[test]
    fn failed_step_marks_where_it_stopped() {
        let line = render_step(&step("snapshot", "failed", 1 << 20, Some(4 << 20)), 8, 80);
        let bar = bar_of(&line);
        let x = bar.find('X').unwrap();
        assert_eq!(x, bar.chars().count() / 4, "{line}");
        assert!(line.ends_with("FAILED"), "{line}");
        assert!(line.contains(" 25%"), "{line}");
        let unknown = render_step(&step("image", "failed", 10, None), 5, 80);
        assert!(bar_of(&unknown).starts_with('X'), "{unknown}");
    }

    #[test]
    fn lines_fit_the_width_and_bars_stay_within_bounds() {
        let mut s = step("snapshot", "running", 5 << 30, Some(10 << 30));
        s.rate = 1 << 30;
        s.eta_seconds = Some(5);
        for width in [80, 100, 120] {
            let line = render_step(&s, 8, width);
            assert!(line.chars().count() <= width, "{width}: {line}");
        }
        let wide = render_step(&s, 8, 1000);
        assert_eq!(bar_of(&wide).chars().count(), BAR_MAX);
        let narrow = render_step(&s, 8, 20);
        assert_eq!(bar_of(&narrow).chars().count(), BAR_MIN);
    }

    #[test]
    fn screen_has_header_and_aligned_steps() {
        let view = ProgressView {
            node_id: "n1".into(),
            lease_id: Some("L1".into()),
            plan_state: Some(PlanState::Running),
            steps: vec![
                step("snapshot", "ok", 10, Some(10)),
                step("wipe", "running", 5, Some(10)),
            ],
        };
        let text = render_progress(&view, 80);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "node n1  lease L1  plan running");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].find('['), lines[2].find('['), "{text}");
        let empty = ProgressView {
            node_id: "n1".into(),
            lease_id: None,
            plan_state: None,
            steps: vec![],
        };
        let text = render_progress(&empty, 80);
        assert!(text.contains("plan none"), "{text}");
        assert!(text.contains("no step"), "{text}");
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(187), "3m07s");
        assert_eq!(format_duration(3723), "1h02m03s");
    }

    /// Replays canned replies in order (the last one repeats), recording
    /// the `after` cursors asked for.
    struct Fake {
        progress: RefCell<VecDeque<ProgressView>>,
        console: RefCell<VecDeque<ConsoleLog>>,
        afters: RefCell<Vec<Option<i64>>>,
    }

    impl Fake {
        fn new(progress: Vec<ProgressView>, console: Vec<ConsoleLog>) -> Self {
            Fake {
                progress: RefCell::new(progress.into()),
                console: RefCell::new(console.into()),
                afters: RefCell::default(),
            }
        }
    }

    fn pop<T: Clone>(q: &RefCell<VecDeque<T>>) -> T {
        let mut q = q.borrow_mut();
        if q.len() > 1 {
            q.pop_front().unwrap()
        } else {
            q.front().unwrap().clone()
        }
    }

    impl Source for Fake {
        async fn progress(&self, _node: &str) -> Result<ProgressView, ClientError> {
            Ok(pop(&self.progress))
        }
        async fn console(&self, node: &str, after: Option<i64>) -> Result<ConsoleLog, ClientError> {
            self.afters.borrow_mut().push(after);
            let mut log = pop(&self.console);
            log.node_id = node.to_owned();
            Ok(log)
        }
    }

    fn view(state: PlanState, done: u64) -> ProgressView {
        ProgressView {
            node_id: "n1".into(),
            lease_id: Some("L1".into()),
            plan_state: Some(state),
            steps: vec![step("wipe", "running", done, Some(100))],
        }
    }

    fn options(once: bool, json: bool, redraw: bool) -> WatchOptions {
        WatchOptions {
            once,
            json,
            redraw,
            width: 80,
            interval: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn watch_stops_when_the_plan_is_final() {
        let fake = Fake::new(
            vec![
                view(PlanState::Running, 10),
                view(PlanState::Running, 10),
                view(PlanState::Running, 60),
                view(PlanState::Failed, 60),
            ],
            vec![],
        );
        let mut out = Vec::new();
        let last = watch(&fake, "n1", &options(false, false, true), &mut out)
            .await
            .unwrap();
        assert_eq!(last.plan_state, Some(PlanState::Failed));
        let text = String::from_utf8(out).unwrap();
        // Three distinct views drawn (the repeat is skipped), each redraw
        // moving up over the two lines of the previous one.
        assert_eq!(text.matches("node n1").count(), 3, "{text}");
        assert_eq!(text.matches("\x1b[2A\x1b[J").count(), 2, "{text:?}");
        assert!(text.contains("plan failed"), "{text}");
    }

    #[tokio::test]
    async fn watch_once_and_json() {
        let fake = Fake::new(vec![view(PlanState::Running, 10)], vec![]);
        let mut out = Vec::new();
        watch(&fake, "n1", &options(true, false, false), &mut out)
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("node n1"), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");

        let mut out = Vec::new();
        watch(&fake, "n1", &options(true, true, false), &mut out)
            .await
            .unwrap();
        let parsed: ProgressView = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, view(PlanState::Running, 10));

        // Not once: one compact JSON line per distinct view.
        let fake = Fake::new(
            vec![view(PlanState::Running, 10), view(PlanState::Done, 100)],
            vec![],
        );
        let mut out = Vec::new();
        watch(&fake, "n1", &options(false, true, false), &mut out)
            .await
            .unwrap();
        let lines: Vec<ProgressView> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].plan_state, Some(PlanState::Done));
    }

    fn page(seqs: &[i64]) -> ConsoleLog {
        ConsoleLog {
            node_id: String::new(),
            lines: seqs
                .iter()
                .map(|&seq| ConsoleLine {
                    seq,
                    at: "2026-01-01T00:00:00Z".into(),
                    line: format!("WARDEN line {seq}\n"),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn log_pages_until_empty_and_advances_the_cursor() {
        let fake = Fake::new(vec![], vec![page(&[1, 2]), page(&[3]), page(&[])]);
        let mut out = Vec::new();
        let opts = LogOptions {
            follow: false,
            json: false,
            interval: Duration::ZERO,
        };
        log(&fake, "n1", &opts, &mut out).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "WARDEN line 1\nWARDEN line 2\nWARDEN line 3\n"
        );
        assert_eq!(*fake.afters.borrow(), vec![None, Some(2), Some(3)]);
    }

    #[tokio::test]
    async fn log_survives_a_server_that_ignores_after() {
        // The same page every time: printed once, then the loop ends.
        let fake = Fake::new(vec![], vec![page(&[1, 2])]);
        let mut out = Vec::new();
        let opts = LogOptions {
            follow: false,
            json: true,
            interval: Duration::ZERO,
        };
        log(&fake, "n1", &opts, &mut out).await.unwrap();
        let parsed: ConsoleLog = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed.node_id, "n1");
        assert_eq!(
            parsed.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
