//! Helpers for the unit tests.

/// A fixed, repeatable stream of pseudo-random numbers for generated test inputs: the same
/// `seed` gives the same stream on every run (`fastrand`'s generator, as in the
/// integration tests).
pub(crate) fn rng(seed: u64) -> fastrand::Rng {
    fastrand::Rng::with_seed(seed)
}
