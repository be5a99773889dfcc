//! SVG plots with plotters: latency over time, pool size against request
//! rate, Ember against the baselines.

use std::path::Path;

use plotters::prelude::*;

use crate::run::Report;

type Res = anyhow::Result<()>;

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd9, 0x48, 0x1c),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn line_chart(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Res {
    let x_max = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_max = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(err)?;
    chart.configure_mesh().x_desc("seconds").y_desc(y_desc).draw().map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One line chart: title, y axis, named series.
type Panel<'a> = (String, &'a str, Vec<(&'a str, Vec<(f64, f64)>)>);

/// Line charts stacked one per row in one SVG.
fn stacked(path: &Path, panels: Vec<Panel>) -> Res {
    let root = SVGBackend::new(path, (900, 320 * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for ((title, y_desc, series), area) in panels.iter().zip(areas.iter()) {
        line_chart(area, title, y_desc, series)?;
    }
    root.present().map_err(err)
}

/// Latency p50/p95 over time for scenarios measured in slices.
pub fn latency(r: &Report, path: &Path) -> Res {
    let panels = r
        .scenarios
        .iter()
        .filter(|s| !s.latency.is_empty())
        .map(|s| {
            let pick = |f: fn(&crate::run::Slice) -> f64| -> Vec<(f64, f64)> {
                s.latency.iter().map(|l| (l.t, f(l))).collect()
            };
            (
                format!("{}: latency over time", s.name),
                "ms (rate: req/s)",
                vec![
                    ("p50 ms", pick(|l| l.p50_ms)),
                    ("p95 ms", pick(|l| l.p95_ms)),
                    ("requests/s", pick(|l| l.rate)),
                ],
            )
        })
        .collect();
    stacked(path, panels)
}

/// VMs by state and the request rate over time (step and burst).
pub fn pool(r: &Report, path: &Path) -> Res {
    let panels = r
        .scenarios
        .iter()
        .filter(|s| !s.pool.is_empty())
        .map(|s| {
            let pick = |f: fn(&crate::sampler::Sample) -> f64| -> Vec<(f64, f64)> {
                s.pool.iter().map(|p| (p.t, f(p))).collect()
            };
            (
                format!("{}: pool size against request rate", s.name),
                "VMs (rate: claims/s)",
                vec![
                    ("ready", pick(|p| p.ready as f64)),
                    ("claimed", pick(|p| p.claimed as f64)),
                    ("booting", pick(|p| p.booting as f64)),
                    ("sizer target", pick(|p| p.target as f64)),
                    ("claims/s (short window)", pick(|p| p.rate)),
                ],
            )
        })
        .collect();
    stacked(path, panels)
}

/// p50 latency of Ember and each baseline, per scenario, on a log scale.
pub fn baselines(r: &Report, path: &Path) -> Res {
    let rows: Vec<(String, &str, f64)> = r
        .scenarios
        .iter()
        .filter(|s| !s.baselines.is_empty())
        .flat_map(|s| {
            std::iter::once((s.name.clone(), "ember", s.ember.p50_ms))
                .chain(s.baselines.iter().map(|b| (s.name.clone(), b.name, b.run.p50_ms)))
        })
        .collect();
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let y_max = rows.iter().map(|r| r.2).fold(1.0, f64::max) * 2.0;
    let names = ["ember", "cold-vm", "bwrap", "host"];
    let mut chart = ChartBuilder::on(&root)
        .caption("p50 latency: Ember vs baselines (log scale)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..rows.len().max(1) as f64, (0.1f64..y_max).log_scale())
        .map_err(err)?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("ms").draw().map_err(err)?;
    for (i, (scenario, name, ms)) in rows.iter().enumerate() {
        let color = COLORS[names.iter().position(|n| n == name).unwrap_or(5) % COLORS.len()];
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.1, 0.1), (x + 0.9, ms.max(0.1))],
                color.filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{scenario}/{name} {ms:.1}"),
                (x + 0.1, ms.max(0.1) * 1.15),
                ("sans-serif", 11),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)
}
