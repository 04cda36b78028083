//! The engine behind its adapter, tested: the engine's own storage conformance suite
//! against `ClusterLog` and `StockSm` (`suite`), and three nodes in one process over an
//! in-memory network (`three_nodes`); the Raft listener's routes on a real engine
//! (`transport`).

mod suite;
mod three_nodes;
mod transport;
