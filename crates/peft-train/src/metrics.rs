//! `metrics.jsonl` (one line per optimizer step) and the loss plot.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Mean loss per target token over the step's batch.
    pub loss: f64,
    /// Learning rate used by the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding excluded) per second over this step.
    pub tokens_per_s: f64,
    /// Tokens seen so far.
    pub tokens: usize,
    /// Epochs done so far (fractional).
    pub epoch: f64,
    /// Seconds since the run started (resumed runs continue the count).
    pub elapsed_s: f64,
    /// Validation loss, on steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Validation perplexity, on steps that evaluate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    /// The objective's own metrics (DPO: `rewards_chosen`, `rewards_rejected`, `margin`,
    /// `accuracy`; `val_`-prefixed on evaluation steps).
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// The name of the metrics file in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends [`StepMetrics`] lines, flushed after each line.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: fs::File,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl`, keeping the lines of steps up to `keep_through` (those a
    /// resumed run already has) and dropping later ones (written after the checkpoint it
    /// resumes from). `keep_through = 0` starts an empty file.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: &Path, keep_through: usize) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let kept: Vec<String> = if keep_through == 0 {
            Vec::new()
        } else {
            read(&path)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m.step <= keep_through)
                .filter_map(|m| serde_json::to_string(&m).ok())
                .collect()
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        peft_core::format::write_atomic(&path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io("open", &path, e))?;
        Ok(Self { path, file })
    }

    /// Appends one line.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m)
            .map_err(|e| TrainError::Config(format!("cannot serialise metrics: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io("write", &self.path, e))
    }
}

/// Reads a `metrics.jsonl` file; unreadable lines (a line cut by a crash) are skipped.
///
/// # Errors
/// The file cannot be read.
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = fs::read_to_string(path).map_err(|e| TrainError::io("read", path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Draws the training loss (and its moving average) and the validation loss against the
/// step into a PNG.
///
/// # Errors
/// The image cannot be drawn or written.
pub fn plot_losses(metrics: &[StepMetrics], path: &Path, title: &str) -> Result<()> {
    plot::draw(metrics, path, title)
        .map_err(|e| TrainError::Config(format!("cannot draw `{}`: {e}", path.display())))
}

mod plot {
    use std::path::Path;

    use plotters::prelude::*;

    use super::StepMetrics;

    /// Registers a system font for the labels once; without one the plot has no text.
    fn font_available() -> bool {
        static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FONT.get_or_init(|| {
            const CANDIDATES: &[&str] = &[
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
                "/System/Library/Fonts/Supplemental/Arial.ttf",
                "/Library/Fonts/Arial.ttf",
                "C:\\Windows\\Fonts\\arial.ttf",
            ];
            for c in CANDIDATES {
                if let Ok(bytes) = std::fs::read(c) {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .is_ok()
                    {
                        return true;
                    }
                }
            }
            tracing::debug!("no TrueType font found; the loss plot has no labels");
            false
        })
    }

    pub(super) fn draw(
        metrics: &[StepMetrics],
        path: &Path,
        title: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let text = font_available();
        let train: Vec<(f64, f64)> = metrics
            .iter()
            .filter(|m| m.loss.is_finite())
            .map(|m| (m.step as f64, m.loss))
            .collect();
        let val: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|m| m.val_loss.map(|v| (m.step as f64, v)))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let window = (train.len() / 20).max(1);
        let smooth: Vec<(f64, f64)> = (0..train.len())
            .map(|i| {
                let lo = i.saturating_sub(window - 1);
                let s: f64 = train[lo..=i].iter().map(|p| p.1).sum();
                (train[i].0, s / (i - lo + 1) as f64)
            })
            .collect();
        let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
        let (lo, hi) = train
            .iter()
            .chain(&val)
            .map(|p| p.1)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if text {
            builder
                .caption(title, ("sans-serif", 22))
                .x_label_area_size(40)
                .y_label_area_size(56);
        }
        let mut chart = builder.build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("step").y_desc("loss");
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        let faint = RGBColor(150, 180, 230);
        let s = chart.draw_series(LineSeries::new(train.iter().copied(), faint))?;
        if text {
            s.label("train loss")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], faint));
        }
        let s = chart.draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?;
        if text {
            s.label(format!("train loss, mean of {window}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        if !val.is_empty() {
            let s = chart.draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?;
            if text {
                s.label("validation loss")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
            }
            chart.draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
