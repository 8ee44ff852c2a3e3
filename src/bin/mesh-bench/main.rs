//! `mesh-bench`: measures the mesh path (client → caller's outbound sidecar → callee's
//! inbound sidecar → app) beside real peers in front of the same app, in one run and the
//! same phases (fixed request rates, then full speed): the direct path (client → app),
//! two haproxy processes with mutual TLS between them, two nginx processes likewise, and
//! one plain haproxy hop (`peers.rs`). It reports latency, the proxies' CPU time per
//! request and peak RSS, and checks the targets of issue 12 (the mesh against haproxy in
//! the same run). The mesh paths: `mesh` (default settings), `mesh-tls-path` (`[mesh]
//! local_path = "tls"`: mutual TLS over loopback between the sidecars), with `--tls
//! both|off`, `plain` (the socket path with `tls = "off"`), and with `--dashboard`,
//! `mesh-dashboard`: `mesh` with a client reading its admin's live dashboard stream
//! (`/api/events`, `dashboard.rs`) for the whole run, to check what an open dashboard
//! costs the data path (issue 13).
//!
//! It runs the `mesh` and `mesh-test-app` executables found next to its own, so build
//! them first: `cargo build --release --bins && target/release/mesh-bench`; the peers'
//! executables come from the system (`scripts/install-bench-deps`). See
//! docs/benchmark.md.
//!
//! `mesh-bench fixture` measures something else: what a `mesh::Mesh` test fixture costs
//! to start and to drop (`fixture.rs`, docs/fixture.md).

mod apps;
mod dashboard;
mod fixture;
mod load;
mod peers;
mod procs;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

use load::{Outcome, Target};
use peers::{Peer, PeerRun};
use procs::{ChildProcess, ScratchDir};

/// How long mesh (or a peer) may take to start and open its path.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long mesh (or a peer) may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

// The targets of issue 12 ("Speed, measured beside real peers in one run"), for the
// paths `mesh` and `mesh-tls-path`, against the peers of the same run.
/// Full-speed throughput, at least this many times haproxy-mtls's.
const TARGET_THROUGHPUT_VS_HAPROXY_MTLS: f64 = 1.4;
/// p99 at [`TARGET_P99_RATE`], at most this many times haproxy-mtls's.
const TARGET_P99_VS_HAPROXY_MTLS: f64 = 1.0;
const TARGET_P99_RATE: u32 = 2000;
/// CPU per request (the mesh process against both haproxy processes), at most this many
/// times haproxy-mtls's, in every phase.
const TARGET_CPU_VS_HAPROXY_MTLS: f64 = 0.7;
/// Peak RSS (`VmHWM`) of the mesh process.
const TARGET_RSS_MIB: f64 = 20.0;
/// Full-speed throughput, at least this many times haproxy-plain's.
const TARGET_THROUGHPUT_VS_HAPROXY_PLAIN: f64 = 0.9;
/// What an open dashboard (an SSE client on `/api/events`) may add to the CPU per
/// request of the mesh process at full speed, µs: `mesh-dashboard` against `mesh`
/// (issue 13, "Cost").
const TARGET_DASHBOARD_EXTRA_CPU_US: f64 = 1.0;
/// How long the bench waits for `/api/events`'s first answer before it goes on.
const DASHBOARD_FIRST_ANSWER: Duration = Duration::from_secs(5);

/// Benchmark the mesh path beside the direct path and real peers.
///
/// Needs `mesh` and `mesh-test-app` next to this executable:
/// `cargo build --release --bins && target/release/mesh-bench`; and, for the peers,
/// haproxy, nginx and openssl (`scripts/install-bench-deps`).
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", args_conflicts_with_subcommands = true)]
struct Args {
    /// Without a mode: the mesh paths beside the direct path and the peers.
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Length of each measured phase (seconds, or a duration such as 1500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Keep-alive connections: the pool at fixed rates, the concurrency at full speed.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Fixed request rates, in requests per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![500u32, 2000])]
    rates: Vec<u32>,
    /// Skip the full-speed (closed-loop) phases.
    #[arg(long)]
    skip_full: bool,
    /// Warm-up at full speed on each path before the measurements.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Worker threads of the load generator (it shares the machine with mesh and the app).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Which mesh paths to measure: `mutual`: `mesh` (default settings, mutual TLS) and
    /// `mesh-tls-path` (`local_path = "tls"`); `both`: also `plain` (the socket path with
    /// `tls = "off"`); `off`: `plain` only.
    #[arg(long, value_enum, default_value_t = TlsArg::Mutual)]
    tls: TlsArg,
    /// The peers to measure, comma-separated: haproxy-mtls, nginx-mtls, haproxy-plain
    /// (or all, or none). A peer whose executables are missing is skipped with a note.
    #[arg(long, default_value = "all", value_parser = parse_peer_list)]
    peers: PeerList,
    /// Also measure the floor of the stack: `mesh-floor`, a bare two-hop proxy built
    /// from the same parts as the sidecars (hyper, h2, rustls with the mesh's TLS
    /// configuration, one tokio worker) with none of the mesh's logic, in front of the
    /// same app.
    #[arg(long)]
    floor: bool,
    /// Also measure `mesh-dashboard`: a mesh like `mesh` (default settings) with a
    /// client reading its admin's live dashboard stream (`GET /api/events`) for the
    /// whole run, and compare its CPU per request with `mesh`'s.
    #[arg(long)]
    dashboard: bool,
    /// Measure every phase this many times on every path, the paths taking turns within
    /// each round. The summaries use, per path and phase, the median round: by
    /// throughput at full speed, by p99 at fixed rates (the lower throughput and the
    /// higher p99 of the two middle rounds when the count is even). One run on a shared
    /// machine drifts by several percent from one phase to the next; the median of
    /// alternating rounds does not follow a single slow phase.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// What a `mesh::Mesh` test fixture costs: start until ready and drop, beside `mesh
    /// up -d --wait` / `mesh down` of the same file and the apps started without mesh.
    Fixture(fixture::FixtureArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TlsArg {
    Mutual,
    Both,
    Off,
}

/// The value of `--peers`.
#[derive(Clone, Debug)]
struct PeerList(Vec<Peer>);

fn parse_peer_list(s: &str) -> Result<PeerList, String> {
    peers::parse_peers(s).map(PeerList)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.mode {
        Some(Mode::Fixture(fixture)) => fixture::run(fixture),
        None => run(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mesh-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rate(u32),
    Full,
}

impl Phase {
    fn label(self) -> String {
        match self {
            Self::Rate(r) => format!("rate {r}/s"),
            Self::Full => "full speed".to_owned(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    /// The mesh path of `Running::meshes[i]`.
    Mesh(usize),
    /// The peer path of `Running::peers[i]`.
    Peer(usize),
    /// Through `mesh-floor` (`--floor`).
    Floor,
}

struct Row {
    phase: Phase,
    route: Route,
    outcome: Outcome,
    /// CPU time per request (successful or not), µs, of the path's proxies: the mesh
    /// process, every process of a peer, or mesh-floor; 0 on the direct path.
    proxy_cpu: f64,
    app_cpu: f64,
    client_cpu: f64,
    /// CPU busy on the machine outside the path's processes, the app and this process
    /// during the phase, in % of one CPU (other programs, and the idle proxies of the
    /// other paths: their load distorts the results).
    other_pct: f64,
    /// CPU time the hypervisor took from this machine, % of one CPU.
    steal_pct: f64,
}

impl Row {
    fn p99(&self) -> f64 {
        load::quantile_us(&self.outcome.latencies, 0.99)
    }
}

/// Everything running: the meshes, the direct path (the app of the first mesh), and the
/// peers and mesh-floor in front of that app.
struct Running {
    meshes: Vec<MeshRun>,
    direct: Arc<Target>,
    peers: Vec<PeerRun>,
    floor: Option<FloorRun>,
}

impl Running {
    /// The path's name in the table and the summary.
    fn label(&self, route: Route) -> &'static str {
        match route {
            Route::Direct => "direct",
            Route::Mesh(i) => self.meshes[i].kind.label(),
            Route::Peer(i) => self.peers[i].peer.name(),
            Route::Floor => "floor",
        }
    }

    fn target(&self, route: Route) -> anyhow::Result<&Arc<Target>> {
        Ok(match route {
            Route::Direct => &self.direct,
            Route::Mesh(i) => &self.meshes[i].via_mesh,
            Route::Peer(i) => &self.peers[i].via,
            Route::Floor => &self.floor.as_ref().context("no floor running")?.via,
        })
    }

    /// The processes whose CPU time is the path's proxy CPU.
    fn proxy_pids(&self, route: Route) -> Vec<i32> {
        match route {
            Route::Direct => Vec::new(),
            Route::Mesh(i) => vec![self.meshes[i].mesh_pid],
            Route::Peer(i) => self.peers[i].pids.clone(),
            Route::Floor => self.floor.iter().map(|f| f.pid).collect(),
        }
    }

    /// The app the path ends at: a mesh path's own, the first mesh's otherwise.
    fn app_pid(&self, route: Route) -> i32 {
        match route {
            Route::Mesh(i) => self.meshes[i].app_pid,
            _ => self.meshes[0].app_pid,
        }
    }

    /// The last output of the processes on the path, for error messages.
    fn context(&self, route: Route) -> String {
        match route {
            Route::Direct => self.meshes[0].mesh.context(),
            Route::Mesh(i) => self.meshes[i].mesh.context(),
            Route::Peer(i) => self.peers[i].context(),
            Route::Floor => self
                .floor
                .as_ref()
                .map(|f| f.child.context())
                .unwrap_or_default(),
        }
    }

    /// Events read so far from the path's dashboard stream (`mesh-dashboard` only).
    fn events_read(&self, route: Route) -> Option<u64> {
        match route {
            Route::Mesh(i) => Some(self.meshes[i].events.as_ref()?.progress().events),
            _ => None,
        }
    }

    /// Stops every process, mesh first; returns what did not stop cleanly.
    fn stop(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // The dashboard's reader first: it would take a mesh stopping for a stream to
        // open again.
        for m in &mut self.meshes {
            if let Some(mut events) = m.events.take() {
                events.stop();
            }
        }
        for m in &mut self.meshes {
            match m.mesh.stop(STOP_TIMEOUT) {
                Ok(status) if status.success() => {}
                Ok(status) => problems.push(format!(
                    "{}: mesh exited with {status} after SIGTERM",
                    m.kind.label()
                )),
                Err(e) => problems.push(format!("{}: {e:#}", m.kind.label())),
            }
        }
        for p in &mut self.peers {
            problems.extend(p.stop(STOP_TIMEOUT));
        }
        if let Some(f) = &mut self.floor {
            if let Err(e) = f.child.stop(STOP_TIMEOUT) {
                problems.push(format!("floor: {e:#}"));
            }
        }
        problems
    }
}

/// `mesh-floor` in front of the first mesh's app.
struct FloorRun {
    child: ChildProcess,
    pid: i32,
    via: Arc<Target>,
}

/// Which mesh path a mesh is started for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MeshKind {
    /// Default settings: mutual TLS, the default local path.
    Default,
    /// `local_path = "tls"`: local calls over the inbound's TLS listener.
    TlsPath,
    /// `tls = "off"` over the socket path (`local_path = "tls"`).
    Plain,
    /// Default settings, with a client on its admin's `/api/events` (`--dashboard`).
    Dashboard,
}

impl MeshKind {
    fn label(self) -> &'static str {
        match self {
            Self::Default => "mesh",
            Self::TlsPath => "mesh-tls-path",
            Self::Plain => "plain",
            Self::Dashboard => "mesh-dashboard",
        }
    }

    /// Its `[mesh]` settings besides the name.
    fn settings(self) -> &'static str {
        match self {
            Self::Default | Self::Dashboard => "",
            Self::TlsPath => "local_path = \"tls\"\n",
            Self::Plain => "tls = \"off\"\nlocal_path = \"tls\"\n",
        }
    }

    /// What its path is, for the header.
    fn description(self) -> &'static str {
        match self {
            Self::Default => "default settings (tls = \"mutual\", the default local path)",
            Self::TlsPath => "local_path = \"tls\" (mutual TLS over loopback between the sidecars)",
            Self::Plain => {
                "tls = \"off\", local_path = \"tls\" (plain HTTP/2 over loopback between the sidecars)"
            }
            Self::Dashboard => {
                "the settings of `mesh`, with a client reading its admin's live dashboard stream"
            }
        }
    }

    /// Whether the targets of issue 12 apply to it.
    fn has_targets(self) -> bool {
        matches!(self, Self::Default | Self::TlsPath)
    }
}

/// One running mesh, the pids to watch, and its mesh path.
struct MeshRun {
    kind: MeshKind,
    /// `mesh-dashboard`'s reader of `/api/events` (before `mesh`: dropped first, so it
    /// stops before the mesh does).
    events: Option<dashboard::EventsClient>,
    mesh: ChildProcess,
    mesh_pid: i32,
    app_pid: i32,
    shims: Vec<i32>,
    via_mesh: Arc<Target>,
}

/// Runs the benchmark; `Ok(false)` when some request failed or a selected peer that is
/// installed could not start.
fn run(args: &Args) -> anyhow::Result<bool> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.connections == 0 || args.threads == 0 || args.duration.is_zero() {
        bail!("--connections, --threads and --duration must be above zero");
    }
    if args.rates.contains(&0) {
        bail!("--rates must be above zero");
    }
    if args.dashboard && args.tls == TlsArg::Off {
        bail!(
            "--dashboard compares mesh-dashboard with the `mesh` path, which --tls off does not \
             measure: use --tls mutual or --tls both"
        );
    }
    let (mesh_bin, app_bin) = executables()?;
    let machine = procs::machine();
    let scratch = ScratchDir::new()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    // What was not measured, and why: printed in the header.
    let mut skipped: Vec<String> = Vec::new();
    let mut failed = false;

    let mut kinds: Vec<MeshKind> = match args.tls {
        TlsArg::Mutual => vec![MeshKind::Default, MeshKind::TlsPath],
        TlsArg::Both => vec![MeshKind::Default, MeshKind::TlsPath, MeshKind::Plain],
        TlsArg::Off => vec![MeshKind::Plain],
    };
    if args.dashboard {
        // Right after `mesh`, so that in each phase the two are measured back to back.
        kinds.insert(1, MeshKind::Dashboard);
    }
    let mut meshes = Vec::new();
    let mut direct = None;
    for &kind in &kinds {
        // Each mesh has its own directory: its own state_dir, CA and lock.
        let dir = scratch.path().join(kind.label());
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = write_config(&dir, &app_bin, kind)?;
        if !matches!(kind, MeshKind::Default | MeshKind::Dashboard) {
            // A mesh without the `local_path` key yet refuses the file: say so and go on.
            if let Some(refusal) = refused_local_path(&mesh_bin, &config, &dir)? {
                skipped.push(format!(
                    "{}: this mesh refuses `local_path = \"tls\"` ({refusal})",
                    kind.label()
                ));
                continue;
            }
        }
        // mesh assigns the app's port by binding port 0 and releasing it, so on a busy
        // machine another socket can take it before the app binds it (the app then
        // crash-loops on "Address already in use"): one more try with a fresh mesh.
        let (run, app) = match start(&mesh_bin, &config, &dir, &rt, kind) {
            Ok(r) => r,
            Err(e) => {
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or_default();
                eprintln!(
                    "mesh-bench: warning: mesh ({}) did not start ({first}); trying once more",
                    kind.label()
                );
                start(&mesh_bin, &config, &dir, &rt, kind)?
            }
        };
        direct.get_or_insert(app);
        meshes.push(run);
    }
    let Some(direct) = direct else {
        bail!("no mesh to measure: {}", skipped.join("; "));
    };

    // The peers, in front of the direct path's app.
    let tools = peers::Tools::find();
    let mut runnable = Vec::new();
    for &peer in &args.peers.0 {
        match tools.missing(peer) {
            Some(why) => skipped.push(format!("{peer}: {why}; {}", peers::INSTALL_HINT)),
            None => runnable.push(peer),
        }
    }
    let certs = peers::make_certs(&tools, &runnable, &scratch.path().join("certs"))?;
    let mut peer_runs = Vec::new();
    for peer in runnable {
        let dir = scratch.path().join(peer.name());
        match peers::start(
            peer,
            &tools,
            certs.as_ref(),
            &dir,
            direct.addr(),
            &rt,
            START_TIMEOUT,
        ) {
            Ok(run) => peer_runs.push(run),
            Err(e) => {
                eprintln!("mesh-bench: error: {peer} did not start: {e:#}");
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or_default().to_owned();
                skipped.push(format!("{peer}: did not start ({first}); see stderr"));
                failed = true;
            }
        }
    }

    let floor = if args.floor {
        Some(start_floor(&direct, &rt)?)
    } else {
        None
    };
    let mut running = Running {
        meshes,
        direct,
        peers: peer_runs,
        floor,
    };
    let ticks = procs::clock_ticks();
    let self_pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);

    let routes: Vec<Route> = std::iter::once(Route::Direct)
        .chain((0..running.meshes.len()).map(Route::Mesh))
        .chain((0..running.peers.len()).map(Route::Peer))
        .chain(running.floor.iter().map(|_| Route::Floor))
        .collect();
    print_header(args, &machine, &running, &tools, &skipped);

    // Warm-up on every path: connections, pools, caches, the allocator's arenas.
    if !args.warmup.is_zero() {
        for &route in &routes {
            let t = running.target(route)?;
            rt.block_on(load::closed_loop(t, args.connections, args.warmup))?;
        }
    }

    println!(
        "{:<16} {:<14} {:>9} {:>8} {:>8} {:>8} {:>7}  {:>16}  {:>14}  {:>17}  {:>11}",
        "phase",
        "path",
        "req/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "errors",
        "proxy CPU µs/req",
        "app CPU µs/req",
        "client CPU µs/req",
        "other CPU %"
    );
    let mut phases: Vec<Phase> = args.rates.iter().map(|&r| Phase::Rate(r)).collect();
    if !args.skip_full {
        phases.push(Phase::Full);
    }
    let mut all_rows = Vec::new();
    // Events the dashboard's reader read during mesh-dashboard's own phases.
    let mut during = Vec::new();
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("round {round} of {}", args.rounds);
        }
        for &phase in &phases {
            for &route in &routes {
                let events_before = running.events_read(route);
                let row = measure(args, &rt, &running, phase, route, ticks, self_pid)?;
                if let (Some(before), Some(after)) = (events_before, running.events_read(route)) {
                    during.push((phase, after.saturating_sub(before)));
                }
                print_row(&row, &running);
                all_rows.push(row);
            }
        }
    }
    // Errors of every round count.
    let errors: u64 = all_rows.iter().map(|r| r.outcome.errors).sum();
    let queued: u64 = all_rows.iter().map(|r| r.outcome.queued).sum();
    let rows = if args.rounds > 1 {
        let medians = median_rounds(all_rows, &phases, &routes);
        println!(
            "median of {} rounds (per path and phase: by throughput at full speed, by p99 at fixed rates)",
            args.rounds
        );
        for row in &medians {
            print_row(row, &running);
        }
        medians
    } else {
        all_rows
    };

    // The run is over for the dashboard's reader: what it read is final.
    let dashboard = running
        .meshes
        .iter_mut()
        .position(|m| m.kind == MeshKind::Dashboard)
        .and_then(|i| Some((i, running.meshes[i].events.take()?.stop())));

    println!();
    let haproxy_mtls = find_peer(&running, Peer::HaproxyMtls);
    let haproxy_plain = find_peer(&running, Peer::HaproxyPlain);
    for (i, m) in running.meshes.iter().enumerate() {
        let peak_rss_kib = procs::status_kib(m.mesh_pid, "VmHWM")?;
        let shim_rss: Vec<u64> = m
            .shims
            .iter()
            .filter_map(|&p| procs::status_kib(p, "VmHWM").ok())
            .collect();
        let app_rss = procs::status_kib(m.app_pid, "VmHWM").ok();
        print_mesh_summary(
            &rows,
            &phases,
            Route::Mesh(i),
            m.kind,
            peak_rss_kib,
            &shim_rss,
            app_rss,
            [haproxy_mtls, haproxy_plain],
        );
    }
    if let Some((i, progress)) = &dashboard {
        let mesh = running
            .meshes
            .iter()
            .position(|m| m.kind == MeshKind::Default)
            .map(Route::Mesh);
        print_dashboard_summary(&rows, &phases, mesh, Route::Mesh(*i), progress, &during);
    }
    for (i, p) in running.peers.iter().enumerate() {
        print_peer_summary(&rows, Route::Peer(i), p.peer.name(), p.peak_rss_kib());
    }
    if let Some(f) = &running.floor {
        let peak_rss_kib = procs::status_kib(f.pid, "VmHWM").map(|k| vec![k]);
        print_peer_summary(&rows, Route::Floor, "floor", peak_rss_kib);
    }
    print_totals(&rows, errors, queued, failed);

    for problem in running.stop() {
        eprintln!("mesh-bench: warning: {problem}");
    }
    drop(running);
    drop(scratch);
    Ok(errors == 0 && !failed)
}

/// One phase on one path.
fn measure(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    running: &Running,
    phase: Phase,
    route: Route,
    ticks: u64,
    self_pid: i32,
) -> anyhow::Result<Row> {
    let target = running.target(route)?;
    let proxies = running.proxy_pids(route);
    let others = [running.app_pid(route), self_pid];
    let sample = |pids: &[i32]| -> anyhow::Result<Vec<procs::CpuSample>> {
        pids.iter()
            .map(|&p| procs::cpu_sample(p))
            .collect::<anyhow::Result<_>>()
            .with_context(|| {
                format!(
                    "reading CPU times from /proc (did a process exit?)\n{}",
                    running.context(route)
                )
            })
    };
    std::thread::sleep(Duration::from_millis(200));
    let machine_before = procs::machine_cpu_ticks()?;
    let (proxies_before, others_before) = (sample(&proxies)?, sample(&others)?);
    let wall = Instant::now();
    let outcome = match phase {
        Phase::Rate(r) => rt.block_on(load::open_loop(target, args.connections, r, args.duration)),
        Phase::Full => rt.block_on(load::closed_loop(target, args.connections, args.duration)),
    }
    .with_context(|| {
        format!(
            "measuring {} at {}\n{}",
            running.label(route),
            phase.label(),
            running.context(route)
        )
    })?;
    let (proxies_after, others_after) = (sample(&proxies)?, sample(&others)?);
    let wall_us = wall.elapsed().as_secs_f64() * 1e6;
    let machine_after = procs::machine_cpu_ticks()?;
    let requests = (outcome.latencies.len() as u64 + outcome.errors).max(1) as f64;
    let used = |before: &[procs::CpuSample], after: &[procs::CpuSample]| -> Vec<f64> {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| procs::cpu_between(b, a, ticks))
            .collect()
    };
    // A fold from 0.0: an empty sum (the direct path) is -0.0.
    let proxy_us = used(&proxies_before, &proxies_after)
        .iter()
        .fold(0.0, |a, b| a + b);
    let [app_us, client_us] = used(&others_before, &others_after)[..] else {
        bail!("expected two CPU samples (app, client)");
    };
    let tick_us = 1e6 / ticks as f64;
    let busy_us = machine_after.0.saturating_sub(machine_before.0) as f64 * tick_us;
    let steal_us = machine_after.1.saturating_sub(machine_before.1) as f64 * tick_us;
    let ours = proxy_us + app_us + client_us;
    Ok(Row {
        phase,
        route,
        outcome,
        proxy_cpu: proxy_us / requests,
        app_cpu: app_us / requests,
        client_cpu: client_us / requests,
        other_pct: ((busy_us - ours) / wall_us * 100.0).max(0.0),
        steal_pct: steal_us / wall_us * 100.0,
    })
}

fn find_peer(running: &Running, peer: Peer) -> Option<Route> {
    running
        .peers
        .iter()
        .position(|p| p.peer == peer)
        .map(Route::Peer)
}

/// `mesh` and `mesh-test-app`, next to this executable.
fn executables() -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok((beside("mesh")?, beside("mesh-test-app")?))
}

/// The executable `name`, next to this one.
fn beside(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating mesh-bench itself")?;
    let dir = exe.parent().context("mesh-bench has no parent directory")?;
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "{} not found: mesh-bench runs the executables built beside it (`mesh`, \
             `mesh-test-app`, and `mesh-floor` with --floor); build them first with \
             `cargo build --release --bins`",
            p.display()
        )
    }
}

/// Starts `mesh-floor` in front of the app of the direct path and waits until its path
/// answers.
fn start_floor(direct: &Target, rt: &tokio::runtime::Runtime) -> anyhow::Result<FloorRun> {
    let mut command = std::process::Command::new(beside("mesh-floor")?);
    command.arg(direct.addr().to_string());
    let mut child = ChildProcess::spawn(command)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let line = child.wait_line("floor=", deadline)?;
    let via = addr_after(&line, "floor=").with_context(|| format!("no address in {line:?}"))?;
    let via = Target::new(via)?;
    let left = deadline.saturating_duration_since(Instant::now());
    if let Err(e) = rt.block_on(load::wait_ok(&via, left)) {
        bail!("{e:#}\n{}", child.context());
    }
    let pid = child.pid();
    Ok(FloorRun { child, pid, via })
}

/// A mesh of one service (`server`, the test app) and a caller (`client`) that only
/// prints its outbound sidecar's URL.
fn write_config(dir: &Path, app: &Path, kind: MeshKind) -> anyhow::Result<PathBuf> {
    let app = app.to_str().context("the test app's path is not UTF-8")?;
    let settings = kind.settings();
    let text = format!(
        r#"# Written by mesh-bench ({label}).
version = 1

[mesh]
name = "bench"
{settings}
[services.server]
command = [{app:?}]

[services.client]
command = ["sh", "-c", "echo url=$SERVER_URL; exec sleep 100000"]
port = "none"
upstreams = ["server"]
"#,
        label = kind.label(),
    );
    let path = dir.join("mesh.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `mesh check` of `config`: `Some(message)` when mesh refuses it over `local_path` (a
/// mesh built before the key was), an error when it refuses it for anything else.
fn refused_local_path(mesh: &Path, config: &Path, cwd: &Path) -> anyhow::Result<Option<String>> {
    let out = std::process::Command::new(mesh)
        .arg("check")
        .arg("-f")
        .arg(config)
        .current_dir(cwd)
        .env_remove("MESH_LOG")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} check", mesh.display()))?;
    if out.status.success() {
        return Ok(None);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    match stderr.lines().find(|l| l.contains("local_path")) {
        Some(line) => Ok(Some(line.trim().to_owned())),
        None => bail!(
            "mesh check refused {} ({}):\n{}",
            config.display(),
            out.status,
            stderr.trim()
        ),
    }
}

/// Starts mesh and waits until both paths are open; returns the mesh and the direct path
/// to its app.
fn start(
    mesh_bin: &Path,
    config: &Path,
    cwd: &Path,
    rt: &tokio::runtime::Runtime,
    kind: MeshKind,
) -> anyhow::Result<(MeshRun, Arc<Target>)> {
    let mut mesh = ChildProcess::start(mesh_bin, config, cwd)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let line = mesh.wait_line("client.0 | url=", deadline)?;
    let via_mesh =
        addr_after(&line, "url=http://").with_context(|| format!("no address in {line:?}"))?;
    let line = mesh.wait_line("server.0 | test-app server.0 listening on ", deadline)?;
    let direct =
        addr_after(&line, "listening on ").with_context(|| format!("no address in {line:?}"))?;
    let (direct, via_mesh) = (Target::new(direct)?, Target::new(via_mesh)?);
    let left = deadline.saturating_duration_since(Instant::now());
    if let Err(e) = rt.block_on(load::wait_ok(&via_mesh, left)) {
        bail!("{e:#}\n{}", mesh.context());
    }
    rt.block_on(load::wait_ok(&direct, Duration::from_secs(5)))?;
    let mesh_pid = mesh.pid();
    let (shims, apps) = procs::find_below(mesh_pid, "mesh-test-app")?;
    let [app_pid] = apps[..] else {
        bail!("expected one mesh-test-app process below mesh (pid {mesh_pid}), found {apps:?}");
    };
    // The dashboard's reader, once the mesh is ready; its first answer is waited for, so
    // that the header can say whether the stream is open.
    let events = if kind == MeshKind::Dashboard {
        let line = mesh.wait_line("admin on http://", deadline)?;
        let admin = addr_after(&line, "admin on http://")
            .with_context(|| format!("no address in {line:?}"))?;
        let events = dashboard::EventsClient::start(admin)
            .context("starting the thread that reads /api/events")?;
        events.wait_first(DASHBOARD_FIRST_ANSWER);
        Some(events)
    } else {
        None
    };
    let run = MeshRun {
        kind,
        events,
        mesh,
        mesh_pid,
        app_pid,
        shims,
        via_mesh,
    };
    Ok((run, direct))
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(|c: char| c.is_whitespace() || c == '/')
        .next()?
        .parse()
        .ok()
}

fn print_header(
    args: &Args,
    m: &procs::Machine,
    r: &Running,
    tools: &peers::Tools,
    skipped: &[String],
) {
    let rates: Vec<String> = args.rates.iter().map(u32::to_string).collect();
    println!("mesh-bench");
    println!(
        "  machine:  {} CPUs, {}, {} RAM, Linux {}",
        m.cpus, m.cpu_model, m.memory, m.kernel
    );
    println!("  date:     {}", m.date);
    println!("  mesh:     commit {}", m.commit);
    let peers: Vec<Peer> = r.peers.iter().map(|p| p.peer).collect();
    if !peers.is_empty() {
        println!("  peers:    {}", tools.versions(&peers));
    }
    println!("  paths:    direct = client → app {}", r.direct.addr());
    for mesh in &r.meshes {
        println!(
            "            {} = client → caller's outbound {} → callee's inbound → app; {}",
            mesh.kind.label(),
            mesh.via_mesh.addr(),
            mesh.kind.description()
        );
    }
    for p in &r.peers {
        println!("            {} = {}", p.peer, p.description);
    }
    if let Some(f) = &r.floor {
        println!(
            "            floor = client → mesh-floor {} (two hops in one process) → app",
            f.via.addr()
        );
    }
    for s in skipped {
        println!("  skipped:  {s}");
    }
    for m in &r.meshes {
        if let Some(events) = &m.events {
            println!(
                "  dashboard: {}: {}",
                events.url(),
                stream_state(&events.progress())
            );
        }
    }
    println!(
        "  load:     GET / over HTTP/1.1 keep-alive, {} connections, {} s per phase, rates {} rps (open loop), {}; {} round{} (the paths in turn); warm-up {} s per path; generator: {} tokio threads in this process, on the same CPUs",
        args.connections,
        args.duration.as_secs_f64(),
        rates.join(", "),
        if args.skip_full {
            "no full speed"
        } else {
            "then full speed (closed loop)"
        },
        args.rounds,
        if args.rounds == 1 { "" } else { "s" },
        args.warmup.as_secs_f64(),
        args.threads,
    );
    for m in &r.meshes {
        println!(
            "  pids:     {}: mesh {} (both sidecars), test app {}",
            m.kind.label(),
            m.mesh_pid,
            m.app_pid
        );
    }
    for p in &r.peers {
        let pids: Vec<String> = p.pids.iter().map(i32::to_string).collect();
        println!("  pids:     {}: {}", p.peer, pids.join(", "));
    }
    println!();
    flush();
}

fn print_row(row: &Row, running: &Running) {
    let o = &row.outcome;
    println!(
        "{:<16} {:<14} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>7}  {:>16.1}  {:>14.1}  {:>17.1}  {:>11.0}",
        row.phase.label(),
        running.label(row.route),
        o.throughput(),
        load::quantile_us(&o.latencies, 0.50),
        load::quantile_us(&o.latencies, 0.99),
        load::quantile_us(&o.latencies, 1.0),
        o.errors,
        row.proxy_cpu,
        row.app_cpu,
        row.client_cpu,
        row.other_pct,
    );
    flush();
}

/// Per phase and route, the median round: by throughput at full speed (the lower of the
/// two middle ones for an even count), by p99 at fixed rates (the higher of the two);
/// its CPU columns are the medians of the rounds' (the lower middle one).
fn median_rounds(rows: Vec<Row>, phases: &[Phase], routes: &[Route]) -> Vec<Row> {
    let mut rows: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
    let mut medians = Vec::new();
    for &phase in phases {
        for &route in routes {
            let mut of: Vec<(f64, usize)> = rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let r = r
                        .as_ref()
                        .filter(|r| r.phase == phase && r.route == route)?;
                    let key = match phase {
                        Phase::Full => r.outcome.throughput(),
                        Phase::Rate(_) => r.p99(),
                    };
                    Some((key, i))
                })
                .collect();
            if of.is_empty() {
                continue;
            }
            of.sort_by(|a, b| a.0.total_cmp(&b.0));
            let middle = match phase {
                Phase::Full => (of.len() - 1) / 2,
                Phase::Rate(_) => of.len() / 2,
            };
            // The CPU columns are medians of their own: a slow phase raises CPU per
            // request as much as latency, so the round chosen for latency would carry
            // its CPU figures into a comparison with another path's ordinary round.
            let cpu = |f: fn(&Row) -> f64| {
                let mut v: Vec<f64> = of
                    .iter()
                    .filter_map(|&(_, i)| rows[i].as_ref().map(f))
                    .collect();
                v.sort_by(f64::total_cmp);
                v[(v.len() - 1) / 2]
            };
            let proxy_cpu = cpu(|r| r.proxy_cpu);
            let app_cpu = cpu(|r| r.app_cpu);
            let client_cpu = cpu(|r| r.client_cpu);
            if let Some(mut row) = rows[of[middle].1].take() {
                row.proxy_cpu = proxy_cpu;
                row.app_cpu = app_cpu;
                row.client_cpu = client_cpu;
                medians.push(row);
            }
        }
    }
    medians
}

fn find(rows: &[Row], phase: Phase, route: Route) -> Option<&Row> {
    rows.iter().find(|r| r.phase == phase && r.route == route)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The ratios and targets of one mesh path: against haproxy-mtls and haproxy-plain of
/// the same run (`peers`, when they were measured), then against the direct path.
#[allow(clippy::too_many_arguments)]
fn print_mesh_summary(
    rows: &[Row],
    phases: &[Phase],
    route: Route,
    kind: MeshKind,
    peak_rss_kib: u64,
    shim_rss: &[u64],
    app_rss: Option<u64>,
    [haproxy_mtls, haproxy_plain]: [Option<Route>; 2],
) {
    let label = kind.label();
    let mut against = Vec::new();
    let mut targets = Vec::new();
    let p99_phase = Phase::Rate(TARGET_P99_RATE);

    // Against haproxy-mtls: throughput, p99, CPU per request in each phase.
    let mut mtls = Vec::new();
    let not_measured = |what: &str| format!("{what} [not measured]");
    let throughput_target =
        format!("throughput ≥{TARGET_THROUGHPUT_VS_HAPROXY_MTLS:.1}× haproxy-mtls");
    let p99_target =
        format!("p99@{TARGET_P99_RATE} ≤{TARGET_P99_VS_HAPROXY_MTLS:.1}× haproxy-mtls");
    let cpu_target =
        format!("CPU/req ≤{TARGET_CPU_VS_HAPROXY_MTLS:.1}× haproxy-mtls in every phase");
    match haproxy_mtls {
        Some(h) => {
            match (find(rows, Phase::Full, route), find(rows, Phase::Full, h)) {
                (Some(m), Some(p)) => {
                    let (a, b) = (m.outcome.throughput(), p.outcome.throughput());
                    let ratio = a / b;
                    mtls.push(format!("throughput {ratio:.2}× ({a:.0} vs {b:.0} req/s)"));
                    targets.push(format!(
                        "{throughput_target} [{}]",
                        verdict(ratio >= TARGET_THROUGHPUT_VS_HAPROXY_MTLS)
                    ));
                }
                _ => targets.push(not_measured(&throughput_target)),
            }
            match (find(rows, p99_phase, route), find(rows, p99_phase, h)) {
                (Some(m), Some(p)) => {
                    let (a, b) = (m.p99(), p.p99());
                    let ratio = a / b;
                    mtls.push(format!(
                        "p99 @{TARGET_P99_RATE} {ratio:.2}× ({a:.0} vs {b:.0} µs)"
                    ));
                    targets.push(format!(
                        "{p99_target} [{}]",
                        verdict(ratio <= TARGET_P99_VS_HAPROXY_MTLS)
                    ));
                }
                _ => targets.push(not_measured(&p99_target)),
            }
            let mut cpu = Vec::new();
            let mut worst: Option<f64> = None;
            for &phase in phases.iter().rev() {
                if let (Some(m), Some(p)) = (find(rows, phase, route), find(rows, phase, h)) {
                    let ratio = m.proxy_cpu / p.proxy_cpu;
                    cpu.push(format!(
                        "{ratio:.2}× at {} ({:.1} vs {:.1} µs)",
                        phase.label(),
                        m.proxy_cpu,
                        p.proxy_cpu
                    ));
                    worst = Some(worst.map_or(ratio, |w| w.max(ratio)));
                }
            }
            match worst {
                Some(w) => {
                    mtls.push(format!("CPU/req {}", cpu.join(", ")));
                    targets.push(format!(
                        "{cpu_target} [{}]",
                        verdict(w <= TARGET_CPU_VS_HAPROXY_MTLS)
                    ));
                }
                None => targets.push(not_measured(&cpu_target)),
            }
            against.push(format!("against haproxy-mtls: {}", mtls.join(", ")));
        }
        None => {
            against.push("against haproxy-mtls: not measured".to_owned());
            targets.push(not_measured(&throughput_target));
            targets.push(not_measured(&p99_target));
            targets.push(not_measured(&cpu_target));
        }
    }

    let rss_mib = mib(peak_rss_kib);
    targets.push(format!(
        "peak RSS ≤{TARGET_RSS_MIB:.0} MiB ({rss_mib:.1}) [{}]",
        verdict(rss_mib <= TARGET_RSS_MIB)
    ));

    let plain_target =
        format!("throughput ≥{TARGET_THROUGHPUT_VS_HAPROXY_PLAIN:.1}× haproxy-plain");
    match haproxy_plain
        .and_then(|h| Some((find(rows, Phase::Full, route)?, find(rows, Phase::Full, h)?)))
    {
        Some((m, p)) => {
            let (a, b) = (m.outcome.throughput(), p.outcome.throughput());
            let ratio = a / b;
            against.push(format!(
                "against haproxy-plain: throughput {ratio:.2}× ({a:.0} vs {b:.0} req/s)"
            ));
            targets.push(format!(
                "{plain_target} [{}]",
                verdict(ratio >= TARGET_THROUGHPUT_VS_HAPROXY_PLAIN)
            ));
        }
        None => {
            against.push("against haproxy-plain: not measured".to_owned());
            targets.push(not_measured(&plain_target));
        }
    }

    println!("{label}: {}", against.join("; "));
    if kind.has_targets() {
        println!("{label}: targets: {}", targets.join(", "));
    }
    println!(
        "{label}: against direct (information): {}",
        against_direct(rows, route).join(", ")
    );
    let shims: Vec<String> = shim_rss.iter().map(|k| format!("{:.1}", mib(*k))).collect();
    println!(
        "{label}: notes: proxy CPU is the mesh process (both sidecars, plus its supervisor) per request; peak RSS is its VmHWM; \
         the shims (one per app process) peak at [{}] MiB, the test app at {} MiB",
        shims.join(", "),
        app_rss.map_or_else(|| "?".to_owned(), |k| format!("{:.1}", mib(k))),
    );
    flush();
}

/// How the dashboard's stream went, for the header and the summary.
fn stream_state(p: &dashboard::Progress) -> String {
    const IDLE: &str = "mesh-dashboard is measured all the same, with its admin idle: it \
                        shows the cost of recording alone, as `mesh` does (the same \
                        configuration, so their difference is the run's noise)";
    match &p.first {
        Some(dashboard::First::Streaming) => "open, read for the whole run".to_owned(),
        Some(dashboard::First::NotFound) => {
            format!("answers 404: this mesh has no live dashboard stream yet; {IDLE}")
        }
        Some(dashboard::First::Status(code, text)) => format!("answered {code} ({text}); {IDLE}"),
        Some(dashboard::First::Failed(e)) => format!("could not be read ({e}); {IDLE}"),
        None => format!(
            "no answer within {} s yet; the reader goes on waiting",
            DASHBOARD_FIRST_ANSWER.as_secs()
        ),
    }
}

/// The `dashboard:` lines: `mesh-dashboard`'s CPU per request minus `mesh`'s in each
/// phase, its throughput against `mesh`'s at full speed, the events its reader read, and
/// the target of issue 13 (at most [`TARGET_DASHBOARD_EXTRA_CPU_US`] more at full speed).
fn print_dashboard_summary(
    rows: &[Row],
    phases: &[Phase],
    mesh: Option<Route>,
    dash: Route,
    progress: &dashboard::Progress,
    during: &[(Phase, u64)],
) {
    let target = format!("≤{TARGET_DASHBOARD_EXTRA_CPU_US:.0} µs/req more at full speed");
    let streamed = progress.streams > 0;
    if !streamed {
        println!("dashboard: /api/events {}", stream_state(progress));
    }
    let Some(mesh) = mesh else {
        println!("dashboard: not compared: no `mesh` path in this run; {target} [not measured]");
        flush();
        return;
    };
    let mut parts = Vec::new();
    let mut cpu = Vec::new();
    for &phase in phases {
        if let (Some(d), Some(m)) = (find(rows, phase, dash), find(rows, phase, mesh)) {
            cpu.push(format!(
                "{:+.1} µs at {} ({:.1} vs {:.1})",
                d.proxy_cpu - m.proxy_cpu,
                phase.label(),
                d.proxy_cpu,
                m.proxy_cpu
            ));
        }
    }
    if !cpu.is_empty() {
        parts.push(format!("CPU/req mesh-dashboard − mesh: {}", cpu.join(", ")));
    }
    let full = find(rows, Phase::Full, dash).zip(find(rows, Phase::Full, mesh));
    if let Some((d, m)) = full {
        let (a, b) = (d.outcome.throughput(), m.outcome.throughput());
        parts.push(format!(
            "throughput {:.2}× mesh at full speed ({a:.0} vs {b:.0} req/s)",
            a / b
        ));
    }
    let mut events = format!("events read: {}", progress.events_text());
    if streamed && !during.is_empty() {
        let each: Vec<String> = during
            .iter()
            .map(|(phase, n)| format!("{n} at {}", phase.label()))
            .collect();
        events.push_str(&format!(", during its own phases {}", each.join(", ")));
    }
    parts.push(events);
    let judged = match full {
        _ if !streamed => "[not measured: no stream was read]".to_owned(),
        Some((d, m)) => format!(
            "[{}]",
            verdict(d.proxy_cpu - m.proxy_cpu <= TARGET_DASHBOARD_EXTRA_CPU_US)
        ),
        None => "[not measured: no full-speed phase]".to_owned(),
    };
    parts.push(format!("target: {target} {judged}"));
    println!("dashboard: {}", parts.join("; "));
    if !progress.notes.is_empty() {
        println!("dashboard: notes: {}", progress.notes.join("; "));
    }
    flush();
}

/// A path against the direct path: throughput at full speed, extra p99 at
/// [`TARGET_P99_RATE`], its proxy CPU per request at full speed and the worst phase.
fn against_direct(rows: &[Row], route: Route) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(d), Some(m)) = (
        find(rows, Phase::Full, Route::Direct),
        find(rows, Phase::Full, route),
    ) {
        out.push(format!(
            "throughput {:.2}×",
            m.outcome.throughput() / d.outcome.throughput()
        ));
    }
    let p99_phase = Phase::Rate(TARGET_P99_RATE);
    if let (Some(d), Some(m)) = (
        find(rows, p99_phase, Route::Direct),
        find(rows, p99_phase, route),
    ) {
        out.push(format!(
            "p99 @{TARGET_P99_RATE} {:+.0} µs",
            m.p99() - d.p99()
        ));
    }
    let worst = rows
        .iter()
        .filter(|r| r.route == route)
        .max_by(|a, b| a.proxy_cpu.total_cmp(&b.proxy_cpu));
    if let Some(worst) = worst {
        let mut s = String::from("CPU/req");
        if let Some(full) = find(rows, Phase::Full, route) {
            s.push_str(&format!(" {:.1} µs at full speed,", full.proxy_cpu));
        }
        s.push_str(&format!(
            " worst {:.1} µs ({})",
            worst.proxy_cpu,
            worst.phase.label()
        ));
        out.push(s);
    }
    out
}

/// A peer's (or mesh-floor's) peak RSS, summed over its processes, and its figures
/// against the direct path.
fn print_peer_summary(rows: &[Row], route: Route, label: &str, rss_kib: anyhow::Result<Vec<u64>>) {
    let rss = match rss_kib {
        Ok(kib) => rss_text(&kib),
        Err(e) => format!("peak RSS unknown ({e:#})"),
    };
    println!(
        "{label}: {rss}; against direct (information): {}",
        against_direct(rows, route).join(", ")
    );
    flush();
}

/// `peak RSS 9.8 MiB`, or `peak RSS 19.6 MiB over its 2 processes (9.8 + 9.8 MiB)`.
fn rss_text(rss_kib: &[u64]) -> String {
    let each: Vec<String> = rss_kib.iter().map(|k| format!("{:.1}", mib(*k))).collect();
    let total = mib(rss_kib.iter().sum());
    if rss_kib.len() > 1 {
        format!(
            "peak RSS {total:.1} MiB over its {} processes ({} MiB)",
            rss_kib.len(),
            each.join(" + ")
        )
    } else {
        format!("peak RSS {total:.1} MiB")
    }
}

/// What concerns the whole run: a noisy machine, queued requests, errors.
fn print_totals(rows: &[Row], errors: u64, queued: u64, failed: bool) {
    let other = rows.iter().map(|r| r.other_pct).fold(0.0, f64::max);
    let steal = rows.iter().map(|r| r.steal_pct).fold(0.0, f64::max);
    if other >= 10.0 || steal >= 5.0 {
        println!(
            "notes: WARNING: the machine was not quiet (up to {other:.0}% of a CPU used by other programs, {steal:.0}% stolen by the hypervisor in a phase): the numbers are distorted"
        );
    }
    if queued > 0 {
        println!(
            "notes: {queued} fixed-rate requests found no free connection at their scheduled time (their wait is in the latency)"
        );
    }
    if failed {
        println!("ERRORS: a selected peer did not start (see \"skipped:\" above)");
    }
    if errors > 0 {
        println!("ERRORS: {errors} requests failed (see the errors column)");
    }
    flush();
}

fn flush() {
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: Phase, route: Route, requests: usize, latency_us: u64) -> Row {
        Row {
            phase,
            route,
            outcome: load::Outcome {
                latencies: vec![latency_us * 1000; requests],
                errors: 0,
                elapsed: Duration::from_secs(1),
                queued: 0,
            },
            proxy_cpu: requests as f64,
            app_cpu: 0.0,
            client_cpu: 0.0,
            other_pct: 0.0,
            steal_pct: 0.0,
        }
    }

    #[test]
    fn the_median_round_is_chosen_per_path_and_phase() {
        let full = Phase::Full;
        let rate = Phase::Rate(2000);
        let mesh = Route::Mesh(0);
        let rows = vec![
            row(full, mesh, 30, 100),
            row(full, Route::Direct, 90, 10),
            row(rate, mesh, 2000, 300),
            row(full, mesh, 10, 100),
            row(rate, mesh, 2000, 100),
            row(full, mesh, 20, 100),
        ];
        let medians = median_rounds(rows, &[rate, full], &[Route::Direct, mesh]);
        // Throughput at full speed: 10, 20, 30 -> 20.
        let m = find(&medians, full, mesh).expect("a full-speed row");
        assert_eq!(m.outcome.latencies.len(), 20);
        // A single round is its own median.
        assert!(find(&medians, full, Route::Direct).is_some());
        // p99 at a fixed rate, two rounds: the higher.
        let r = find(&medians, rate, mesh).expect("a rate row");
        assert!((r.p99() - 300.0).abs() < 1.0, "{}", r.p99());
        // CPU per request is a median of its own (rows' proxy_cpu: 10, 20, 30 and 2000, 2000).
        assert!((m.proxy_cpu - 20.0).abs() < 1e-9);
        assert!((r.proxy_cpu - 2000.0).abs() < 1e-9);
        assert_eq!(medians.len(), 3);
    }
}
