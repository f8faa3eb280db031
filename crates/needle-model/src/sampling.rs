//! Next-token sampling: greedy, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches `top_p` (None: all).
    pub top_p: Option<f32>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

impl SamplingConfig {
    /// Rejects values outside their ranges, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid("temperature", format!("{} must be finite and >= 0", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top_k", "must be at least 1"));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::invalid("top_p", format!("{p} is not in (0, 1]")));
        }
        Ok(())
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

/// Index of the largest logit (the first on ties).
///
/// The result of comparing the logits in order (a later logit wins only when greater, so a NaN
/// never wins, nor can anything beat a NaN first logit), computed as the largest value
/// sixteen lanes at a time (vectorized), then its first place.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let &first = logits.first()?;
    if first.is_nan() {
        return Some(0);
    }
    let mut lanes = [first; 16];
    let mut chunks = logits.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            if x > *m {
                *m = x;
            }
        }
    }
    let best = lanes.iter().chain(chunks.remainder()).fold(first, |b, &x| if x > b { x } else { b });
    logits.iter().position(|&x| x == best).map(|i| i as u32)
}

impl Sampler {
    /// A sampler for `config` (validated).
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, rng: StdRng::seed_from_u64(config.seed) })
    }

    /// Draws the next token. Errors on an empty or non-finite logit vector.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        // A pass without an early exit vectorizes; the place is looked for only when there is one.
        if logits.iter().fold(false, |nan, l| nan | l.is_nan())
            && let Some(i) = logits.iter().position(|l| l.is_nan())
        {
            return Err(Error::invalid("logits", format!("NaN at token {i}")));
        }
        let best = argmax(logits).ok_or_else(|| Error::invalid("logits", "empty"))?;
        if self.config.temperature == 0.0 {
            return Ok(best);
        }
        let t = self.config.temperature as f64;
        let mut cands: Vec<(u32, f64)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l as f64 / t)).collect();
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.config.top_k {
            cands.truncate(k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f64> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            cands.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (c, p) in cands.iter().zip(&probs) {
            u -= p;
            if u <= 0.0 {
                return Ok(c.0);
            }
        }
        Ok(cands.last().map_or(best, |c| c.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_bad_logits_error() {
        let mut s = Sampler::new(SamplingConfig::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]).unwrap(), 1);
        assert!(s.sample(&[0.1, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
        assert!(Sampler::new(SamplingConfig { top_p: Some(0.0), ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingConfig { temperature: -1.0, ..Default::default() }).is_err());
    }

    #[test]
    fn top_k_one_is_greedy_and_sampling_follows_the_distribution() {
        let logits = [0.0, 1.0f32.ln() + 0.0, 2.0f32.ln()]; // probabilities 1/4, 1/4, 1/2
        let mut s =
            Sampler::new(SamplingConfig { temperature: 1.0, top_k: Some(1), seed: 3, ..Default::default() }).unwrap();
        assert!((0..50).all(|_| s.sample(&logits).unwrap() == 2));
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed: 7, ..Default::default() }).unwrap();
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        // 4 standard deviations of a binomial(n, 1/2) share is about 0.014.
        assert!((counts[2] as f64 / n as f64 - 0.5).abs() < 0.015, "{counts:?}");
        // top_p = 0.5 keeps only the most likely token.
        let mut s =
            Sampler::new(SamplingConfig { temperature: 1.0, top_p: Some(0.5), seed: 1, ..Default::default() }).unwrap();
        assert!((0..50).all(|_| s.sample(&logits).unwrap() == 2));
    }

    /// The plain in-order loop `argmax` must equal: a later logit wins only when greater.
    fn argmax_plain(logits: &[f32]) -> Option<u32> {
        let mut best: Option<(usize, f32)> = None;
        for (i, &l) in logits.iter().enumerate() {
            if best.is_none_or(|(_, b)| l > b) {
                best = Some((i, l));
            }
        }
        best.map(|(i, _)| i as u32)
    }

    #[test]
    fn argmax_is_the_in_order_loop_on_random_logits() {
        use rand::Rng;
        let mut r = StdRng::seed_from_u64(11);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.5];
        for n in [0, 1, 2, 15, 16, 17, 33, 100, 1000] {
            for round in 0..40 {
                // Few distinct values make ties; specials land anywhere, the first place included.
                let v: Vec<f32> = (0..n)
                    .map(|_| match r.random_range(0..10) {
                        0 => specials[r.random_range(0..specials.len())],
                        1..=3 => r.random_range(-3..3) as f32,
                        _ => r.random_range(-20.0..20.0),
                    })
                    .collect();
                assert_eq!(argmax(&v), argmax_plain(&v), "n {n} round {round}: {v:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), Some(0));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, 3.0]), Some(2));
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = SamplingConfig { temperature: 0.8, top_p: Some(0.9), seed: 42, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(cfg).unwrap(), Sampler::new(cfg).unwrap());
        let xs: Vec<u32> = (0..20).map(|_| a.sample(&logits).unwrap()).collect();
        let ys: Vec<u32> = (0..20).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(xs, ys);
    }
}
