//! The chaos soak (`anteroom-bench --scenario chaos`,
//! crates/anteroom-bench/src/chaos.rs) for one minute: two proxies, three
//! dispatchers, Redis under Sentinel and a ledger app, while a scheduler
//! kills and restarts dispatchers, upgrades a proxy, restarts the app,
//! kills the Redis primary, partitions, slows and loses replies; then the
//! books are checked. The seed is printed; `ANTEROOM_CHAOS_SEED` repeats a
//! run's fault order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anteroom_bench::chaos::{ChaosConfig, run};

#[test]
fn a_minute_of_chaos_loses_nothing() {
    let seed = std::env::var("ANTEROOM_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("chaos seed {seed} (ANTEROOM_CHAOS_SEED={seed} repeats the fault order)");
    let config = ChaosConfig {
        anteroom: env!("CARGO_BIN_EXE_anteroom").into(),
        duration: Duration::from_secs(60),
        seed,
        root: env!("CARGO_MANIFEST_DIR").into(),
    };
    let report = run(&config).expect("the soak runs");
    println!("{}", report.render());
    assert!(
        report.passed(),
        "the soak found {} problems (seed {seed}):\n{}",
        report.violations().len(),
        report.violations().join("\n")
    );
}
