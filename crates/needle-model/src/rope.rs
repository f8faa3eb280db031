//! Rotary position embedding tables, in the Hugging Face "rotate-half" layout
//! (dimension `i` pairs with `i + d/2`), with the configured frequency scaling (Llama 3's, linear,
//! or llama.cpp's precomputed per-frequency factors).

use needle_loader::{LlamaConfig, RopeScaling};

/// Precomputed inverse frequencies; cos/sin rows are produced per position on demand.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Frequencies for the model's head dimension, theta and scaling.
    pub fn new(cfg: &LlamaConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
        match &cfg.rope_scaling {
            None => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
                let old = *original_max_position_embeddings as f64;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                for f in &mut inv_freq {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= factor;
                    } else if wl >= high_wl {
                        let smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            // llama.cpp divides each angle by its factor (`rope_freqs.weight`).
            Some(RopeScaling::FreqFactors(div)) => {
                inv_freq.iter_mut().zip(div).for_each(|(f, &d)| *f /= f64::from(d));
            }
        }
        Self { inv_freq }
    }

    /// Head dimension.
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// Row-major `[positions × dim]` cos and sin tables for `positions`, each half repeated
    /// (`cos[i] == cos[i + d/2]`) as rotate-half expects. Angles are computed in f64.
    pub fn tables(&self, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let d = self.dim();
        let n = positions.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
        for p in positions {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (cos, sin)
    }

    /// Row-major `[positions × dim/2]` cos and sin tables for `positions` (each half once), the
    /// form [`NeedleBackend::fused_rope`](crate::NeedleBackend::fused_rope) takes. Angles are computed in f64.
    pub fn half_tables(&self, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
        let n = positions.len() * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for p in positions {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Applies the rotation in place to `x` (`heads × dim`, one position), in f64.
    /// The reference for the tensor version.
    pub fn apply_reference(&self, x: &mut [f32], position: usize) {
        let h = self.inv_freq.len();
        for head in x.chunks_exact_mut(2 * h) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (c, s) = ((position as f64 * f).cos(), (position as f64 * f).sin());
                let (a, b) = (head[i] as f64, head[i + h] as f64);
                head[i] = (a * c - b * s) as f32;
                head[i + h] = (b * c + a * s) as f32;
            }
        }
    }
}
