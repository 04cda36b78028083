//! Helpers for the unit tests.

/// A xorshift step: a fixed, repeatable stream of pseudo-random numbers for generated
/// test inputs (the state must not be 0).
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
