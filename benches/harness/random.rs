//! Reproducible random numbers for workloads: a small seeded generator, exponential
//! inter-arrival times (Poisson arrivals) and lognormal work times given by their mean and
//! coefficient of variation.

/// splitmix64: fast, seedable, and good enough to draw workloads from.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with this mean: the gap between Poisson arrivals.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }

    /// Standard normal (Box-Muller; one of the pair is thrown away).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A lognormal distribution, given by the mean and coefficient of variation (standard
/// deviation / mean) of the values themselves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogNormal {
    pub mean: f64,
    pub cv: f64,
    mu: f64,
    sigma: f64,
}

impl LogNormal {
    pub fn new(mean: f64, cv: f64) -> LogNormal {
        let sigma2 = (1.0 + cv * cv).ln();
        LogNormal {
            mean,
            cv,
            mu: mean.ln() - sigma2 / 2.0,
            sigma: sigma2.sqrt(),
        }
    }

    pub fn sample(&self, rng: &mut Rng) -> f64 {
        (self.mu + self.sigma * rng.normal()).exp()
    }

    /// The `q` quantile, from a large sample (no closed form without the inverse normal CDF).
    pub fn quantile(&self, q: f64) -> f64 {
        let mut rng = Rng::new(0x5eed);
        let mut values: Vec<f64> = (0..200_000).map(|_| self.sample(&mut rng)).collect();
        values.sort_by(f64::total_cmp);
        let at = ((values.len() as f64 * q) as usize).min(values.len() - 1);
        values[at]
    }
}
