//! The markdown table and the latency chart.

use crate::results::*;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

fn rate(v: f64) -> String {
    let v = v.round() as u64;
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn lat(p50: f64, p99: f64) -> String {
    format!("{p50:.2} / {p99:.2} ms")
}

fn mb(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.1} MB", k as f64 / 1024.0))
        .unwrap_or_else(|| "–".into())
}

fn step_cell(s: Option<&Step>) -> String {
    match s {
        None => "–".into(),
        Some(s) => {
            let mut c = lat(s.p50_ms, s.p99_ms);
            if s.unsent > 0 || s.achieved < s.offered * 0.95 {
                let _ = write!(c, " (overloaded: {}/s achieved)", rate(s.achieved));
            }
            if s.errors > 0 {
                let _ = write!(c, " ({} errors)", s.errors);
            }
            c
        }
    }
}

/// The results as a markdown table, one column per backend, with the targets (SQLite).
pub fn markdown(results: &[BackendResults]) -> String {
    let mut rows: Vec<(String, Vec<String>, String)> = Vec::new();
    let col = |f: &dyn Fn(&BackendResults) -> String| results.iter().map(f).collect::<Vec<_>>();
    let rates: Vec<f64> = {
        let mut v: Vec<f64> = results
            .iter()
            .flat_map(|r| r.inbound_steps.iter().chain(&r.sends_steps).map(|s| s.offered))
            .collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    rows.push((
        "Inbound webhooks, max rate (closed loop)".into(),
        col(&|r| match &r.inbound_max {
            Some(m) => format!(
                "{}/s ({} conns, p99 {:.1} ms{})",
                rate(m.rate),
                m.conns,
                m.p99_ms,
                if m.errors > 0 {
                    format!(", {} errors", m.errors)
                } else {
                    String::new()
                }
            ),
            None => "–".into(),
        }),
        "≥ 15,000/s".into(),
    ));
    for &o in &rates {
        rows.push((
            format!("Inbound p50 / p99 at {}/s offered", rate(o)),
            col(&|r| step_cell(r.inbound_steps.iter().find(|s| s.offered == o))),
            if o == 2000.0 {
                "p99 ≤ 10 ms".into()
            } else {
                String::new()
            },
        ));
    }
    rows.push((
        "Sends accepted (POST /api/v1/messages, closed loop)".into(),
        col(&|r| match &r.sends_max {
            Some(m) => format!(
                "{}/s ({} conns, p99 {:.1} ms{})",
                rate(m.rate),
                m.conns,
                m.p99_ms,
                if m.errors > 0 {
                    format!(", {} errors", m.errors)
                } else {
                    String::new()
                }
            ),
            None => "–".into(),
        }),
        "≥ 15,000/s".into(),
    ));
    for &o in &rates {
        rows.push((
            format!("Sends p50 / p99 at {}/s offered", rate(o)),
            col(&|r| step_cell(r.sends_steps.iter().find(|s| s.offered == o))),
            if o == 2000.0 {
                "p99 ≤ 10 ms".into()
            } else {
                String::new()
            },
        ));
    }
    rows.push((
        "End to end, accept → simulator (rate; p50 / p99 latency)".into(),
        col(&|r| match &r.e2e {
            Some(e) => format!(
                "{}/s; {} ({} of {} arrived)",
                rate(e.rate),
                lat(e.p50_ms, e.p99_ms),
                e.delivered,
                e.accepted
            ),
            None => "–".into(),
        }),
        "≥ 8,000/s".into(),
    ));
    rows.push((
        "Event push, webhook accepted → SSE client, p50 / p99".into(),
        col(&|r| match &r.push {
            Some(Ok(p)) => format!(
                "{} ({} clients, {} of {} events received)",
                lat(p.p50_ms, p.p99_ms),
                p.clients,
                p.receipts,
                p.expected
            ),
            Some(Err(why)) => why.clone(),
            None => "–".into(),
        }),
        "p99 ≤ 20 ms".into(),
    ));
    let read_names: Vec<String> = {
        let mut v = Vec::new();
        for r in results {
            for x in &r.reads {
                if !v.contains(&x.name) {
                    v.push(x.name.clone());
                }
            }
        }
        v
    };
    for name in read_names {
        rows.push((
            format!("{name}, p50 / p99"),
            col(&|r| match r.reads.iter().find(|x| x.name == name) {
                Some(Read { na: Some(why), .. }) => why.clone(),
                Some(x) => format!("{} ({}/s at 4 conns)", lat(x.p50_ms, x.p99_ms), rate(x.rate)),
                None => "–".into(),
            }),
            "p99 ≤ 10 ms".into(),
        ));
    }
    rows.push(("Gateway RSS at idle".into(), col(&|r| mb(r.rss_idle_kb)), String::new()));
    rows.push((
        "Gateway RSS peak under load (VmHWM)".into(),
        col(&|r| mb(r.rss_peak_kb)),
        "≤ 100 MB".into(),
    ));

    let mut out = String::new();
    let names: Vec<String> = results
        .iter()
        .map(|r| {
            let b = match r.backend.as_str() {
                "sqlite" => "SQLite",
                "postgres" => "PostgreSQL",
                other => other,
            };
            format!(
                "{b} ({} msgs / {} convs seeded{})",
                rate(r.seeded_messages as f64),
                rate(r.seeded_conversations as f64),
                if r.quick { ", quick" } else { "" }
            )
        })
        .collect();
    let _ = writeln!(out, "| measure | {} | target (SQLite) |", names.join(" | "));
    let _ = writeln!(out, "|---|{}---|", "---|".repeat(results.len()));
    for (name, cells, target) in rows {
        let _ = writeln!(out, "| {name} | {} | {target} |", cells.join(" | "));
    }
    for r in results {
        if !r.rss_by_phase.is_empty() {
            let phases: Vec<String> = r
                .rss_by_phase
                .iter()
                .map(|(p, kb)| format!("{p} {}", mb(Some(*kb))))
                .collect();
            let _ = writeln!(out, "\n- {}: highest RSS by phase: {}", r.backend, phases.join(", "));
        }
        for n in &r.notes {
            let _ = writeln!(out, "\n- {}: {n}", r.backend);
        }
    }
    out
}

/// One line of the chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    p99: bool,
}

/// p50 and p99 against offered rate, for inbound webhooks and sends, per backend.
pub fn svg(results: &[BackendResults], path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut series: Vec<Series> = Vec::new();
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    let mut k = 0;
    for r in results {
        for (kind, steps) in [("inbound", &r.inbound_steps), ("sends", &r.sends_steps)] {
            if steps.is_empty() {
                continue;
            }
            let color = palette[k % palette.len()];
            k += 1;
            series.push(Series {
                label: format!("{} {kind} p99", r.backend),
                points: steps.iter().map(|s| (s.offered, s.p99_ms.max(0.01))).collect(),
                color,
                p99: true,
            });
            series.push(Series {
                label: format!("{} {kind} p50", r.backend),
                points: steps.iter().map(|s| (s.offered, s.p50_ms.max(0.01))).collect(),
                color,
                p99: false,
            });
        }
    }
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.fold(1000.0f64, f64::max) * 1.05;
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(10.0f64, f64::max)
        * 2.0;
    let y_min = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::min)
        / 2.0;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Switchboard latency vs offered rate (open loop, from scheduled send)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered requests per second")
        .y_desc("latency (ms, log scale)")
        .draw()?;
    // The 10 ms target at 2,000/s.
    chart
        .draw_series(LineSeries::new(
            [(0.0, 10.0), (x_max, 10.0)],
            BLACK.mix(0.7).stroke_width(2),
        ))?
        .label("10 ms target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.7).stroke_width(2)));
    for Series {
        label,
        points,
        color,
        p99,
    } in series
    {
        let style = if p99 {
            color.stroke_width(2)
        } else {
            color.mix(0.5).stroke_width(1)
        };
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if p99 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        } else {
            chart.draw_series(points.iter().map(|&p| TriangleMarker::new(p, 4, color.mix(0.5))))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
