//! Memory of purchase-limit counts: one product with `max_per_customer`, and N distinct
//! customers holding one unit each (`BUYERS`, default 1,000,000; ids of 16 characters).
//! Reports the growth of this process's resident memory per buyer.
//!
//! `cargo bench --bench buyers` (release build).

use stockd::domain::Product;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

fn main() {
    let buyers: u64 = std::env::var("BUYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut p = Product::new("HOT".into(), "Hot".into(), None, buyers, 0);
    p.rules.max_per_customer = Some(2);
    let before = rss_kib();
    for i in 0..buyers {
        let counted = p.hold_for(&format!("customer-{i:07}"), 1, 0).expect("held");
        assert!(counted);
    }
    let grown = rss_kib().saturating_sub(before);
    assert_eq!(p.buyers.len() as u64, buyers);
    println!(
        "{buyers} buyers of one product: RSS +{:.1} MiB, {:.0} bytes per buyer",
        grown as f64 / 1024.0,
        grown as f64 * 1024.0 / buyers as f64
    );
}
