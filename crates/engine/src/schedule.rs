//! Learning-rate schedules: linear warm-up, then cosine or linear decay to a floor, as
//! transformers' `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup`
//! compute them (step counted from 0; the rate used for optimizer step `t` is `lr(t)`).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub peak_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    /// The fraction of the peak reached at the end of the decay (0 in transformers).
    pub min_ratio: f32,
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        } as f32;
        self.peak_lr * (self.min_ratio + (1.0 - self.min_ratio) * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_like_transformers() {
        let s = Schedule {
            peak_lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
            min_ratio: 0.0,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-9);
        assert!((s.lr(10) - 1e-3).abs() < 1e-9);
        assert!((s.lr(60) - 5e-4).abs() < 1e-8); // half way through the decay
        assert!(s.lr(110).abs() < 1e-9);
        assert!(s.lr(500).abs() < 1e-9);
        let mut prev = f32::MAX;
        for t in 10..=110 {
            assert!(s.lr(t) <= prev);
            prev = s.lr(t);
        }
    }

    #[test]
    fn linear_decay_to_floor() {
        let s = Schedule {
            peak_lr: 2.0,
            warmup_steps: 0,
            total_steps: 4,
            decay: Decay::Linear,
            min_ratio: 0.5,
        };
        let got: Vec<f32> = (0..=4).map(|t| s.lr(t)).collect();
        assert_eq!(got, vec![2.0, 1.75, 1.5, 1.25, 1.0]);
    }
}
