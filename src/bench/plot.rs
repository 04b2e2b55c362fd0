//! The sweep's SVG: median throughput (left axis) and median p99 latency (right axis) against
//! the shard count. The shard axis is an integer axis, so its ticks are whole shard counts.

use std::path::Path;

/// Draws `points` (shards, median req/s, median p99 us) to `path`.
pub(super) fn plot(points: &[(usize, f64, f64)], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let max_n = points.iter().map(|p| p.0).max().unwrap_or(1) as u32;
    let max_r = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let max_p = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.15;
    // One empty step either side, so the first and last points are not on the frame.
    let shards = 0..max_n + 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shardnet: throughput and p99 against shards",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(shards.clone(), 0.0..max_r)
        .map_err(|e| err(&e))?
        .set_secondary_coord(shards, 0.0..max_p);
    chart
        .configure_mesh()
        .x_desc("shards")
        .y_desc("requests/s (median)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency, us")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0 as u32, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("req/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0 as u32, p.1), 4, BLUE.filled())),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.0 as u32, p.2)),
            RED.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("p99 us")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text labels on the shard axis of a plot of `points`.
    fn shard_ticks(points: &[(usize, f64, f64)]) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!("shardnet-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.svg", points.len()));
        plot(points, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Every <text> element's content; the shard ticks are the ones that are not the
        // throughput or latency ticks (those are far larger than the shard counts here).
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn shard_ticks_are_whole_numbers() {
        for points in [
            vec![(1, 479_000.0, 900.0), (2, 305_000.0, 1500.0)],
            vec![
                (1, 100_000.0, 1000.0),
                (2, 200_000.0, 2000.0),
                (4, 300_000.0, 3000.0),
                (8, 350_000.0, 4000.0),
            ],
        ] {
            let labels = shard_ticks(&points);
            assert!(labels.iter().any(|l| l == "shards"), "{labels:?}");
            for n in points.iter().map(|p| p.0.to_string()) {
                assert!(labels.contains(&n), "no tick {n}: {labels:?}");
            }
            // No fractional shard tick such as 0.6 or 2.4 (the value axes have no fractions at
            // these magnitudes either).
            assert!(
                !labels
                    .iter()
                    .any(|l| l.parse::<f64>().is_ok_and(|v| v.fract() != 0.0)),
                "{labels:?}"
            );
        }
    }
}
