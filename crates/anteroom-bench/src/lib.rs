//! The benchmark's scenarios that tests also run: the chaos soak
//! ([`chaos`]), which `anteroom-bench --scenario chaos` runs for as long as
//! asked and the integration tests for a minute.

pub mod chaos;
