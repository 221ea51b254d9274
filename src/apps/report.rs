//! Human-readable output shared by the CLI and the demo: tables, summaries, depth marks.

use crate::base::config::{ModelKind, RunConfig};
use crate::flops::Flops;
use crate::train::TrainSummary;
use std::io::IsTerminal;

pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

pub fn train_summary(s: &TrainSummary) -> String {
    format!(
        "trained {} steps ({:.2}M tokens) in {:.1} s, {:.0} tokens/s, peak RSS {:.0} MiB\n\
         final train loss {:.4} | validation loss {:.4} (perplexity {:.3})\ncheckpoint: {}",
        s.steps,
        s.tokens_seen as f64 / 1e6,
        s.seconds,
        s.tokens_per_s,
        s.peak_rss_mb,
        s.final_train_loss,
        s.final_val_loss,
        s.final_val_loss.exp(),
        s.checkpoint.display()
    )
}

pub fn info(cfg: &RunConfig, f: &Flops, seq_len: usize) -> String {
    let m = &cfg.model;
    let th = &m.thinking;
    let kind = match th.kind {
        ModelKind::Dense => "dense".to_string(),
        ModelKind::Loop => format!("Loop x{}", th.steps),
        ModelKind::Itt => format!(
            "ITT x{} (ratios {:?}, RTC {}, ATR {}, TSE {}, {:?} form)",
            th.steps, th.ratios, th.residual_connection, th.adaptive_routing, th.step_encoding, th.residual_form
        ),
    };
    format!(
        "preset      {}\nkind        {kind}\nthinking    layers {:?}\nshape       vocab {} | d {} | layers {} | heads {} (kv {}) | mlp {} | context {}\n\
         parameters  {} ({:.2}M)\nFLOPs/token forward {:.3} M | training {:.3} M | {:.3}x dense (at {seq_len} tokens; step shares {:?})",
        cfg.preset.as_deref().unwrap_or("custom"),
        m.thinking_layers(),
        m.vocab_size,
        m.d_model,
        m.n_layers,
        m.n_heads,
        m.n_kv_heads,
        m.mlp_hidden,
        m.max_seq_len,
        m.n_params(),
        m.n_params() as f64 / 1e6,
        f.forward / 1e6,
        f.train / 1e6,
        f.ratio_to_dense,
        f.step_shares
    )
}

/// A token's text with its thinking depth: coloured in a terminal (deeper = warmer), or
/// followed by `[a.b]` (steps per thinking layer) otherwise.
pub fn depth_mark(text: &str, depth: &[u32], max_depth: u32, color: bool) -> String {
    if depth.is_empty() {
        return text.to_string();
    }
    if color {
        let mean = depth.iter().sum::<u32>() as f64 / depth.len() as f64;
        let level = ((mean - 1.0) / (max_depth.max(2) - 1) as f64).clamp(0.0, 1.0);
        // 256-colour ramp from grey-blue (1 step) to red (all steps).
        let code = [67, 73, 108, 143, 179, 173, 167, 160][(level * 7.0).round() as usize];
        format!("\x1b[38;5;{code}m{text}\x1b[0m")
    } else {
        let d: Vec<String> = depth.iter().map(|d| d.to_string()).collect();
        format!("{text}[{}]", d.join("."))
    }
}
