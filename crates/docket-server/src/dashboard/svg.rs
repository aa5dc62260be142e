//! The dashboard's pictures, drawn on the server as SVG text (pure
//! functions, so they can be tested without a browser). Colours come from
//! the stylesheet through class names; no inline styles (the pages' content
//! security policy forbids them).

use std::fmt::Write as _;

/// Escapes text for SVG/XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration for people: `850ms`, `1.5s`, `2m 5s`, `3h 10m`, `2d 4h`.
pub fn human_ms(ms: i64) -> String {
    let neg = ms < 0;
    let a = ms.unsigned_abs();
    let s = if a < 1_000 {
        format!("{a}ms")
    } else if a < 10_000 {
        format!("{:.1}s", a as f64 / 1000.0)
    } else if a < 60_000 {
        format!("{}s", a / 1000)
    } else if a < 3_600_000 {
        let (m, s) = (a / 60_000, (a % 60_000) / 1000);
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m {s}s")
        }
    } else if a < 86_400_000 {
        let (h, m) = (a / 3_600_000, (a % 3_600_000) / 60_000);
        if m == 0 {
            format!("{h}h")
        } else {
            format!("{h}h {m}m")
        }
    } else {
        let (d, h) = (a / 86_400_000, (a % 86_400_000) / 3_600_000);
        if h == 0 {
            format!("{d}d")
        } else {
            format!("{d}d {h}h")
        }
    };
    if neg {
        format!("-{s}")
    } else {
        s
    }
}

/// One attempt in the retry picture. Times are milliseconds since the
/// Unix epoch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChartAttempt {
    /// Its number.
    pub attempt: u32,
    /// When it was claimed.
    pub start: i64,
    /// When it ended (`None`: still running).
    pub end: Option<i64>,
    /// Its outcome (`failed`, `completed`, `running`, …).
    pub outcome: String,
    /// The failure's class.
    pub error_class: Option<String>,
    /// The delay the policy chose after it.
    pub delay_ms: Option<i64>,
    /// When the run became eligible again after it.
    pub eligible_at: Option<i64>,
    /// When a refused late report of this attempt arrived (its lease had
    /// been taken away; the worker was still running it).
    pub late_report_at: Option<i64>,
}

/// The retry picture of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryChart {
    /// The attempts, by number.
    pub attempts: Vec<ChartAttempt>,
    /// Now (the end of running attempts).
    pub now: i64,
    /// A retry that is scheduled but not started: eligible at this instant.
    pub next_eligible: Option<i64>,
}

const W: f64 = 960.0;
const LEFT: f64 = 120.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 30.0;
const LANE: f64 = 28.0;
const BAR: f64 = 14.0;

fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Draws each attempt as a bar on a time axis, one lane per attempt, and
/// before each attempt after the first the delay the policy chose (a
/// dashed band from the previous attempt's end to when the run became
/// eligible) and the real gap (a line). An attempt that started before the
/// band ended is drawn over a red band: a missing backoff (or two workers
/// at once) is visible without reading numbers.
///
/// The root element carries `data-attempts` and `data-early` (how many
/// attempts started before the policy's delay was over).
pub fn retry_chart(c: &RetryChart) -> String {
    let n = c.attempts.len();
    let lanes = n + usize::from(c.next_eligible.is_some());
    let h = TOP + LANE * lanes.max(1) as f64 + 56.0;
    let mut t0 = i64::MAX;
    let mut t1 = i64::MIN;
    for a in &c.attempts {
        let end = a.end.unwrap_or(c.now);
        t0 = t0.min(a.start);
        t1 = t1
            .max(end)
            .max(a.eligible_at.unwrap_or(end))
            .max(end + a.delay_ms.unwrap_or(0))
            .max(a.late_report_at.unwrap_or(end))
            .max(a.start);
    }
    if let Some(e) = c.next_eligible {
        t1 = t1.max(e);
    }
    if t0 == i64::MAX {
        t0 = c.now;
        t1 = c.now;
    }
    if t1 <= t0 {
        t1 = t0 + 1000;
    }
    let plot = W - LEFT - RIGHT;
    let span = (t1 - t0) as f64;
    let x = |t: i64| LEFT + ((t - t0) as f64 / span) * plot;
    let mut early = 0;
    let mut body = String::new();

    // Axis and grid.
    let step = nice_step(span, 6.0);
    let mut tick = 0.0;
    while tick <= span + 0.5 {
        let tx = LEFT + tick / span * plot;
        let _ = write!(
            body,
            r#"<line class="grid" x1="{tx:.1}" y1="{y1:.1}" x2="{tx:.1}" y2="{y2:.1}"/><text class="tick" x="{tx:.1}" y="{ty:.1}" text-anchor="middle">+{label}</text>"#,
            y1 = TOP - 6.0,
            y2 = TOP + LANE * lanes.max(1) as f64,
            ty = TOP - 12.0,
            label = esc(&human_ms(tick as i64)),
        );
        tick += step;
    }

    let mut prev: Option<&ChartAttempt> = None;
    for (i, a) in c.attempts.iter().enumerate() {
        let lane_y = TOP + LANE * i as f64;
        let cy = lane_y + LANE / 2.0;
        let by = cy - BAR / 2.0;
        let label = match &a.error_class {
            Some(cl) => format!("#{} {}", a.attempt, cl),
            None => format!("#{} {}", a.attempt, a.outcome),
        };
        let _ = write!(
            body,
            r#"<text class="lane" x="{lx}" y="{ty:.1}" text-anchor="end">{}</text>"#,
            esc(&label),
            lx = LEFT - 8.0,
            ty = cy + 4.0,
        );
        if let Some(p) = prev {
            let pend = p.end.unwrap_or(c.now);
            // The band is the delay the policy chose (what the forensic
            // classifier compares the gap with), else the stored eligibility.
            let eligible = p.delay_ms.map(|d| pend + d).or(p.eligible_at);
            if let Some(el) = eligible {
                let (bx0, bx1) = (x(pend), x(el).max(x(pend) + 1.0));
                let _ = write!(
                    body,
                    r#"<rect class="delay" x="{bx0:.1}" y="{y:.1}" width="{w:.1}" height="{hh:.1}"><title>policy delay after attempt {}: {}</title></rect>"#,
                    p.attempt,
                    esc(&human_ms(p.delay_ms.unwrap_or(el - pend))),
                    y = lane_y + 3.0,
                    w = bx1 - bx0,
                    hh = LANE - 6.0,
                );
            }
            let _ = write!(
                body,
                r#"<line class="gap" x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}"><title>gap: {}</title></line>"#,
                x(pend),
                x(a.start),
                esc(&human_ms(a.start - pend)),
            );
            let must_wait_until = eligible.unwrap_or(pend).max(pend);
            if a.start < must_wait_until {
                early += 1;
                let ex0 = x(a.start);
                let ex1 = x(must_wait_until).max(ex0 + 3.0);
                let why = if a.start < pend {
                    "started while the previous attempt was still running"
                } else {
                    "started before the policy's delay was over"
                };
                let _ = write!(
                    body,
                    r#"<rect class="early" x="{ex0:.1}" y="{y:.1}" width="{w:.1}" height="{hh:.1}"><title>attempt {} {why} ({} early)</title></rect>"#,
                    a.attempt,
                    esc(&human_ms(must_wait_until - a.start)),
                    y = lane_y + 1.0,
                    w = ex1 - ex0,
                    hh = LANE - 2.0,
                );
            }
        }
        let end = a.end.unwrap_or(c.now);
        let bx0 = x(a.start);
        let bx1 = x(end).max(bx0 + 3.0);
        let class = match a.outcome.as_str() {
            "completed" => "bar ok",
            "running" => "bar running",
            "failed" | "lease_expired" | "retry_scheduled" => "bar failed",
            "needs_input" | "postponed" | "deferred" => "bar waiting",
            _ => "bar other",
        };
        let _ = write!(
            body,
            r#"<rect class="{class}" x="{bx0:.1}" y="{by:.1}" width="{w:.1}" height="{BAR}" rx="2"><title>attempt {}: {}{}, ran {}</title></rect>"#,
            a.attempt,
            esc(&a.outcome),
            a.error_class
                .as_ref()
                .map(|c| format!(" ({})", esc(c)))
                .unwrap_or_default(),
            esc(&human_ms(end - a.start)),
            w = bx1 - bx0,
        );
        if let Some(late) = a.late_report_at {
            let lx0 = bx1;
            let lx1 = x(late).max(lx0 + 3.0);
            let _ = write!(
                body,
                r#"<rect class="late" x="{lx0:.1}" y="{by:.1}" width="{w:.1}" height="{BAR}"><title>attempt {} was still running: its late report was refused after {}</title></rect>"#,
                a.attempt,
                esc(&human_ms(late - end)),
                w = lx1 - lx0,
            );
        }
        prev = Some(a);
    }
    if let (Some(el), Some(last)) = (c.next_eligible, c.attempts.last()) {
        let lane_y = TOP + LANE * n as f64;
        let pend = last.end.unwrap_or(c.now);
        let _ = write!(
            body,
            r#"<text class="lane" x="{lx}" y="{ty:.1}" text-anchor="end">next retry</text><rect class="delay" x="{bx0:.1}" y="{y:.1}" width="{w:.1}" height="{hh:.1}"><title>retry scheduled: eligible after {}</title></rect>"#,
            esc(&human_ms(el - pend)),
            lx = LEFT - 8.0,
            ty = lane_y + LANE / 2.0 + 4.0,
            bx0 = x(pend),
            y = lane_y + 3.0,
            w = (x(el) - x(pend)).max(1.0),
            hh = LANE - 6.0,
        );
    }

    // Legend.
    let ly = h - 22.0;
    let mut lx = LEFT;
    for (class, text) in [
        ("bar failed", "failed attempt"),
        ("bar ok", "completed"),
        ("delay", "delay the policy chose"),
        ("early", "started too early"),
        ("late", "ran on after losing its lease"),
    ] {
        let _ = write!(
            body,
            r#"<rect class="{class}" x="{lx:.1}" y="{y:.1}" width="14" height="10"/><text class="legend" x="{tx:.1}" y="{ty:.1}">{text}</text>"#,
            y = ly - 9.0,
            tx = lx + 18.0,
            ty = ly,
        );
        lx += 34.0 + text.len() as f64 * 6.6;
    }

    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart retry-chart" viewBox="0 0 {W} {h:.0}" width="{W}" height="{h:.0}" role="img" aria-label="Retry picture: {n} attempts" data-attempts="{n}" data-early="{early}"><title>Retry picture: {n} attempts, {early} started too early</title><defs><pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" patternTransform="rotate(45)"><rect class="hatch-bg" width="6" height="6"/><line class="hatch-line" x1="0" y1="0" x2="0" y2="6"/></pattern></defs>{body}</svg>"#
    );
    out
}

/// One bucket of the overview chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowBucket {
    /// Retries scheduled in this bucket, by error class.
    pub retries: Vec<(String, i64)>,
    /// Runs created in this bucket that failed, of those that ended.
    pub failure_rate: Option<f64>,
}

/// The overview chart: retries by error class per bucket (stacked bars)
/// and the failure rate (a line, right axis, 0–100 %).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowChart {
    /// Oldest first.
    pub buckets: Vec<WindowBucket>,
    /// A bucket's width.
    pub bucket_ms: i64,
    /// Every error class that appears, in legend order.
    pub classes: Vec<String>,
}

/// The CSS class of an error class's colour (`c0` … `c11`).
pub fn class_colour(class: &str) -> String {
    let i = docket::ErrorClass::ALL
        .iter()
        .position(|c| c.to_string() == class)
        .unwrap_or(11);
    format!("c{i}")
}

/// Draws the overview chart.
pub fn window_chart(c: &WindowChart) -> String {
    let (w, h) = (W, 250.0);
    let (left, right, top, bottom) = (48.0, 52.0, 16.0, 64.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let n = c.buckets.len().max(1);
    let max = c
        .buckets
        .iter()
        .map(|b| b.retries.iter().map(|(_, v)| *v).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    // Four whole, round steps: 0, s, 2s, 3s, 4s with 4s >= max.
    let ymax = nice_step(max as f64, 4.0) * 4.0;
    let slot = plot_w / n as f64;
    let mut body = String::new();
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = write!(
            body,
            r#"<line class="grid" x1="{left}" y1="{y:.1}" x2="{x2:.1}" y2="{y:.1}"/><text class="tick" x="{tx}" y="{ty:.1}" text-anchor="end">{v}</text><text class="tick rate" x="{rx:.1}" y="{ty:.1}">{p}%</text>"#,
            x2 = left + plot_w,
            tx = left - 6.0,
            ty = y + 4.0,
            v = v.round() as i64,
            rx = left + plot_w + 6.0,
            p = i * 25,
        );
    }
    let mut points = Vec::new();
    for (i, b) in c.buckets.iter().enumerate() {
        let x0 = left + slot * i as f64 + slot * 0.15;
        let bw = slot * 0.7;
        let mut y = top + plot_h;
        for (class, v) in &b.retries {
            if *v <= 0 {
                continue;
            }
            let bh = plot_h * *v as f64 / ymax;
            y -= bh;
            let _ = write!(
                body,
                r#"<rect class="stack {}" x="{x0:.1}" y="{y:.1}" width="{bw:.1}" height="{bh:.1}"><title>{}: {v} retries</title></rect>"#,
                class_colour(class),
                esc(class),
            );
        }
        if let Some(r) = b.failure_rate {
            let px = left + slot * (i as f64 + 0.5);
            let py = top + plot_h - plot_h * r.clamp(0.0, 1.0);
            points.push(format!("{px:.1},{py:.1}"));
            let _ = write!(
                body,
                r#"<circle class="rate-dot" cx="{px:.1}" cy="{py:.1}" r="3"><title>failure rate {:.0}%</title></circle>"#,
                r * 100.0
            );
        }
        // Labels: the oldest, the middle and the newest bucket.
        if i == 0 || i + 1 == c.buckets.len() || i == c.buckets.len() / 2 {
            let ago = c.bucket_ms * (c.buckets.len() - i) as i64;
            let _ = write!(
                body,
                r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">-{}</text>"#,
                left + slot * (i as f64 + 0.5),
                top + plot_h + 16.0,
                esc(&human_ms(ago)),
            );
        }
    }
    if points.len() > 1 {
        let _ = write!(
            body,
            r#"<polyline class="rate-line" points="{}"/>"#,
            points.join(" ")
        );
    }
    let mut lx = left;
    let ly = h - 14.0;
    let _ = write!(
        body,
        r#"<line class="rate-line" x1="{lx}" y1="{y:.1}" x2="{x2}" y2="{y:.1}"/><text class="legend" x="{tx}" y="{ly}">failure rate (right axis)</text>"#,
        y = ly - 4.0,
        x2 = lx + 16.0,
        tx = lx + 20.0,
    );
    lx += 170.0;
    for class in &c.classes {
        let _ = write!(
            body,
            r#"<rect class="stack {}" x="{lx:.1}" y="{y:.1}" width="12" height="10"/><text class="legend" x="{tx:.1}" y="{ly}">{}</text>"#,
            class_colour(class),
            esc(class),
            y = ly - 9.0,
            tx = lx + 16.0,
        );
        lx += 30.0 + class.len() as f64 * 6.6;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart window-chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="Retries by error class and failure rate" data-buckets="{}"><title>Retries by error class (bars) and failure rate (line)</title>{body}</svg>"#,
        c.buckets.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(attempt: u32, start: i64, end: i64, delay: i64) -> ChartAttempt {
        ChartAttempt {
            attempt,
            start,
            end: Some(end),
            outcome: "failed".into(),
            error_class: Some("timeout".into()),
            delay_ms: Some(delay),
            eligible_at: Some(end + delay),
            late_report_at: None,
        }
    }

    #[test]
    fn a_missing_backoff_is_marked_and_an_honoured_one_is_not() {
        let honoured = RetryChart {
            attempts: vec![failed(1, 0, 100, 1000), failed(2, 1200, 1300, 2000)],
            now: 5000,
            next_eligible: Some(3300),
        };
        let svg = retry_chart(&honoured);
        assert!(svg.contains(r#"data-attempts="2""#));
        assert!(svg.contains(r#"data-early="0""#));
        assert_eq!(svg.matches(r#"class="bar failed""#).count(), 2 + 1); // + legend
        assert!(svg.contains("next retry"));
        // The second attempt started 10 ms after the first ended, while the
        // policy chose 1 s.
        let hot = RetryChart {
            attempts: vec![failed(1, 0, 100, 1000), failed(2, 110, 200, 2000)],
            now: 5000,
            next_eligible: None,
        };
        let svg = retry_chart(&hot);
        assert!(svg.contains(r#"data-early="1""#));
        assert!(svg.contains("started before the policy's delay was over (990ms early)"));
    }

    #[test]
    fn overlapping_attempts_and_late_reports_are_drawn() {
        let mut a1 = failed(1, 0, 1000, 0);
        a1.outcome = "lease_expired".into();
        a1.error_class = Some("lease_expired".into());
        a1.delay_ms = None;
        a1.eligible_at = None;
        a1.late_report_at = Some(3000);
        let a2 = ChartAttempt {
            attempt: 2,
            start: 500,
            end: None,
            outcome: "running".into(),
            ..Default::default()
        };
        let svg = retry_chart(&RetryChart {
            attempts: vec![a1, a2],
            now: 4000,
            next_eligible: None,
        });
        assert!(svg.contains(r#"data-early="1""#));
        assert!(svg.contains("still running"));
        assert!(svg.contains(r#"class="late""#));
        assert!(svg.contains(r#"class="bar running""#));
    }

    #[test]
    fn text_is_escaped_and_durations_read_well() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(1500), "1.5s");
        assert_eq!(human_ms(125_000), "2m 5s");
        assert_eq!(human_ms(3_600_000), "1h");
        assert_eq!(human_ms(-2000), "-2.0s");
        let mut a = failed(1, 0, 10, 0);
        a.error_class = Some("<script>".into());
        let svg = retry_chart(&RetryChart {
            attempts: vec![a],
            now: 10,
            next_eligible: None,
        });
        assert!(!svg.contains("<script>"));
    }

    #[test]
    fn window_chart_stacks_classes_and_draws_the_rate() {
        let svg = window_chart(&WindowChart {
            buckets: vec![
                WindowBucket {
                    retries: vec![("timeout".into(), 3), ("rate_limited".into(), 2)],
                    failure_rate: Some(0.5),
                },
                WindowBucket {
                    retries: vec![],
                    failure_rate: Some(0.0),
                },
            ],
            bucket_ms: 300_000,
            classes: vec!["timeout".into(), "rate_limited".into()],
        });
        assert!(svg.contains(r#"data-buckets="2""#));
        assert!(svg.contains("timeout: 3 retries"));
        assert!(svg.contains(r#"class="stack c0""#));
        assert!(svg.contains(r#"class="stack c2""#));
        assert!(svg.contains("rate-line"));
        assert!(svg.contains("-10m"));
    }
}
