//! Multi-process tests, workload checkers and benchmarks (DESIGN §3, §14, §15).
//!
//! The binaries in `src/bin` are driven by the tests in `tests/` and by the README's commands;
//! the library holds what they share.

pub mod bench;
pub mod daemon;
pub mod lab_bench;
pub mod nvlog_crash;
pub mod proxy;
