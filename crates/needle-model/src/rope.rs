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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: Option<RopeScaling>) -> LlamaConfig {
        let mut c = LlamaConfig::preset("llama3-8b").expect("preset");
        c.rope_scaling = scaling;
        c
    }

    /// Angles at a long position, where scaled and unscaled frequencies differ most.
    fn angles(r: &Rope) -> Vec<f32> {
        let (cos, sin) = r.half_tables(100_000..100_001);
        cos.into_iter().chain(sin).collect()
    }

    #[test]
    fn llama3_formula_equals_llama_cpp_factors_and_linear_divides() {
        let plain = Rope::new(&config(None));
        let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
        let llama3 = Rope::new(&config(Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old as usize,
        })));
        // llama.cpp's converter (LlamaModel.generate_extra_tensors): one divisor per frequency.
        let divisors: Vec<f32> = plain
            .inv_freq
            .iter()
            .map(|&f| {
                let wl = 2.0 * std::f64::consts::PI / f;
                if wl < old / high {
                    1.0
                } else if wl > old / low {
                    factor as f32
                } else {
                    let smooth = (old / wl - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        assert!(divisors.contains(&1.0) && divisors.contains(&8.0));
        assert!(divisors.iter().any(|&d| d > 1.0 && d < 8.0), "the ramp is exercised");
        let factors = Rope::new(&config(Some(RopeScaling::FreqFactors(divisors))));
        for (a, b) in llama3.inv_freq.iter().zip(&factors.inv_freq) {
            assert!((a - b).abs() <= 1e-6 * a, "{a} vs {b}");
        }
        assert_ne!(angles(&plain), angles(&llama3));
        let linear = Rope::new(&config(Some(RopeScaling::Linear { factor: 4.0 })));
        for (a, b) in plain.inv_freq.iter().zip(&linear.inv_freq) {
            assert_eq!(a / 4.0, *b);
        }
    }
}
