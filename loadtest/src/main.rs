//! `loadtest`: run a scenario against stockd, verify it, report. Exits 1 if verification
//! failed, 2 if the run itself could not be made.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadtest::driver::Limits;
use loadtest::{Options, Scenario, Target};

/// The bundled flash-sale load test: speed and correctness, in one run.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// What to run (the ceiling phase runs first in every scenario).
    #[arg(value_enum)]
    scenario: Scenario,
    /// Start this stockd binary on a free loopback port with a fresh data directory.
    #[arg(long, conflicts_with = "target")]
    stockd: Option<PathBuf>,
    /// Load a server already running (loopback only), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    target: Option<String>,
    /// Durability of the started server (with --stockd).
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"])]
    durability: String,
    /// Concurrent keep-alive connections: the closed loop's workers, and the open loop's
    /// bound on requests in flight.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Seconds of the scenario's load (flash-sale and checkout: of all its rounds together).
    /// Each ceiling phase runs as long as one round.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop the scenario's load after this many iterations (whichever comes first; split
    /// across rounds like the duration, and each ceiling phase gets one round's share).
    #[arg(long)]
    requests: Option<u64>,
    /// Flash-sale and checkout: split the load into this many rounds, with a ceiling phase
    /// before each and after the last, and take the ratio against the mean of them all.
    /// Alternating short phases keeps a machine whose speed drifts from biasing the ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Open loop: send at this fixed rate (iterations per second) and measure latency from
    /// when each request was due. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Units of the hot SKU (flash-sale) or of each SKU (checkout).
    #[arg(long, default_value_t = 1_000_000)]
    stock: u64,
    /// Bearer key for a server with API keys (`--target`; its scopes must allow creating
    /// products and reserving: `admin`, or `stock` + `reserve` + `read`).
    #[arg(long, env = "STOCKD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Follow the change feed (GET /v1/events, Server-Sent Events) during the run, as a
    /// shop's consumer would, and report how many records and milliseconds it fell behind
    /// the log; verified: it reached the feed's end. A started server gets `--events on`.
    #[arg(long)]
    follow_events: bool,
    /// The hot SKU's purchase limit per buyer (limits).
    #[arg(long, default_value_t = 2)]
    max_per_customer: u64,
    /// SKUs in the catalogue (checkout).
    #[arg(long, default_value_t = 100)]
    catalogue: usize,
    /// TTL in seconds of the reservations shoppers abandon (checkout).
    #[arg(long, default_value_t = 1)]
    abandon_ttl: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write an SVG chart of throughput and latency over the run to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = match (cli.stockd, cli.target) {
        (Some(stockd), _) => Target::Spawn {
            stockd,
            durability: cli.durability,
        },
        (None, Some(url)) => Target::Url(url),
        (None, None) => {
            eprintln!("loadtest: give --stockd PATH (start a server) or --target URL");
            return ExitCode::from(2);
        }
    };
    if cli.rate.is_some_and(|r| !(r > 0.0 && r <= 1_000_000.0)) {
        eprintln!("loadtest: --rate must be in (0, 1000000]");
        return ExitCode::from(2);
    }
    if cli.connections == 0 || !(cli.duration > 0.0 && cli.duration <= 3600.0) {
        eprintln!("loadtest: --connections must be ≥ 1 and --duration in (0, 3600]");
        return ExitCode::from(2);
    }
    if cli.max_per_customer == 0 {
        eprintln!("loadtest: --max-per-customer must be ≥ 1");
        return ExitCode::from(2);
    }
    if !(1..=100).contains(&cli.rounds) {
        eprintln!("loadtest: --rounds must be in [1, 100]");
        return ExitCode::from(2);
    }
    let opts = Options {
        scenario: cli.scenario,
        target,
        limits: Limits {
            connections: cli.connections,
            duration: Duration::from_secs_f64(cli.duration),
            requests_max: cli.requests,
            stop_on_error: false,
            rate: cli.rate,
        },
        stock: cli.stock,
        catalogue: cli.catalogue.max(1),
        abandon_ttl_seconds: cli.abandon_ttl.clamp(1, 86_400),
        rounds: cli.rounds,
        max_per_customer: cli.max_per_customer,
        api_key: cli.api_key,
        follow_events: cli.follow_events,
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let report = match runtime.block_on(loadtest::run(opts)) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("loadtest: {err}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.markdown());
    if let Some(path) = cli.json {
        let json = serde_json::to_string_pretty(&report).expect("report serializes");
        if let Err(e) = std::fs::write(&path, json + "\n") {
            eprintln!("loadtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if let Some(path) = cli.markdown {
        if let Err(e) = std::fs::write(&path, report.markdown()) {
            eprintln!("loadtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if let Some(path) = cli.svg {
        if let Err(e) = std::fs::write(&path, loadtest::chart::svg(&report)) {
            eprintln!("loadtest: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
