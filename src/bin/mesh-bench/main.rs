//! `mesh-bench`: measures the direct path (client → app) against the mesh path (client →
//! caller's outbound sidecar → callee's inbound sidecar → app) at fixed request rates and
//! at full speed, with the mesh's CPU time per request and peak RSS; the mesh path with
//! mutual TLS between the sidecars (the default) and with `tls = "off"`.
//!
//! It runs the `mesh` and `mesh-test-app` executables found next to its own, so build
//! them first: `cargo build --release --bins && target/release/mesh-bench`.
//! See docs/benchmark.md.
//!
//! `mesh-bench fixture` measures something else: what a `mesh::Mesh` test fixture costs
//! to start and to drop (`fixture.rs`, docs/fixture.md).

mod apps;
mod fixture;
mod load;
mod procs;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

use load::{Outcome, Target};
use procs::{MeshChild, ScratchDir};

/// How long mesh may take to start the services and open the mesh path.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long mesh may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

// The targets of issue 3 ("Speed"), for the mesh path.
const TARGET_THROUGHPUT_RATIO: f64 = 0.40;
const TARGET_P99_EXTRA_US: f64 = 250.0;
const TARGET_P99_RATE: u32 = 2000;
const TARGET_CPU_US: f64 = 25.0;
const TARGET_RSS_MIB: f64 = 20.0;

/// Benchmark the mesh path against the direct path.
///
/// Needs `mesh` and `mesh-test-app` next to this executable:
/// `cargo build --release --bins && target/release/mesh-bench`.
#[derive(Debug, Parser)]
#[command(name = "mesh-bench", args_conflicts_with_subcommands = true)]
struct Args {
    /// Without a mode: the mesh path against the direct path.
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
    /// Which mesh paths to measure: with mutual TLS between the sidecars, without
    /// (`tls = "off"`), or both (two meshes side by side).
    #[arg(long, value_enum, default_value_t = TlsArg::Both)]
    tls: TlsArg,
    /// Also measure the floor of the stack: `mesh-floor`, a bare two-hop proxy built
    /// from the same parts as the sidecars (hyper, h2, rustls with the mesh's TLS
    /// configuration, one tokio worker) with none of the mesh's logic, in front of the
    /// same app.
    #[arg(long)]
    floor: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// What a `mesh::Mesh` test fixture costs: start until ready and drop, beside `mesh
    /// up -d --wait` / `mesh down` of the same file and the apps started without mesh.
    Fixture(fixture::FixtureArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TlsArg {
    Both,
    Mutual,
    Off,
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
    /// Through `mesh-floor` (`--floor`).
    Floor,
}

struct Row {
    phase: Phase,
    route: Route,
    outcome: Outcome,
    /// CPU time per request (successful or not), µs.
    mesh_cpu: f64,
    app_cpu: f64,
    client_cpu: f64,
    /// CPU busy on the machine outside mesh, the app and this process during the phase,
    /// in % of one CPU (other programs: their load distorts the results).
    other_pct: f64,
    /// CPU time the hypervisor took from this machine, % of one CPU.
    steal_pct: f64,
}

impl Row {
    fn p99(&self) -> f64 {
        load::quantile_us(&self.outcome.latencies, 0.99)
    }
}

/// Everything running: one mesh per measured TLS mode, and the direct path (the app of
/// the first mesh).
struct Running {
    meshes: Vec<MeshRun>,
    direct: Arc<Target>,
    floor: Option<FloorRun>,
}

/// `mesh-floor` in front of the first mesh's app.
struct FloorRun {
    child: MeshChild,
    pid: i32,
    via: Arc<Target>,
}

/// One running mesh, the pids to watch, and its mesh path.
struct MeshRun {
    mesh: MeshChild,
    mesh_pid: i32,
    app_pid: i32,
    shims: Vec<i32>,
    via_mesh: Arc<Target>,
    /// Mutual TLS between its sidecars (`tls = "off"` otherwise).
    tls: bool,
}

impl MeshRun {
    /// The label of its path in the table: `mtls` or `plain`.
    fn label(&self) -> &'static str {
        if self.tls { "mtls" } else { "plain" }
    }
}

/// Runs the benchmark; `Ok(false)` when some request failed.
fn run(args: &Args) -> anyhow::Result<bool> {
    if args.connections == 0 || args.threads == 0 || args.duration.is_zero() {
        bail!("--connections, --threads and --duration must be above zero");
    }
    if args.rates.contains(&0) {
        bail!("--rates must be above zero");
    }
    let (mesh_bin, app_bin) = executables()?;
    let machine = procs::machine();
    let scratch = ScratchDir::new()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    // mesh assigns the app's port by binding port 0 and releasing it, so on a busy
    // machine another socket can take it before the app binds it (the app then
    // crash-loops on "Address already in use"): one more try with a fresh mesh.
    let modes: &[bool] = match args.tls {
        TlsArg::Both => &[true, false],
        TlsArg::Mutual => &[true],
        TlsArg::Off => &[false],
    };
    let mut meshes = Vec::new();
    let mut direct = None;
    for &tls in modes {
        // Each mesh has its own directory: its own state_dir, CA and lock.
        let dir = scratch.path().join(if tls { "mtls" } else { "plain" });
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = write_config(&dir, &app_bin, tls)?;
        let (run, app) = match start(&mesh_bin, &config, &dir, &rt, tls) {
            Ok(r) => r,
            Err(e) => {
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or_default();
                eprintln!("mesh-bench: warning: mesh did not start ({first}); trying once more");
                start(&mesh_bin, &config, &dir, &rt, tls)?
            }
        };
        direct.get_or_insert(app);
        meshes.push(run);
    }
    let direct = direct.context("no mesh to measure")?;
    let floor = if args.floor {
        Some(start_floor(&direct, &rt)?)
    } else {
        None
    };
    let mut running = Running {
        meshes,
        direct,
        floor,
    };
    let ticks = procs::clock_ticks();
    let self_pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);

    print_header(args, &machine, &running);

    // Warm-up on both paths: connections, pools, caches, the allocator's arenas.
    if !args.warmup.is_zero() {
        let paths = std::iter::once(&running.direct)
            .chain(running.meshes.iter().map(|m| &m.via_mesh))
            .chain(running.floor.iter().map(|f| &f.via));
        for t in paths {
            rt.block_on(load::closed_loop(t, args.connections, args.warmup))?;
        }
    }

    println!(
        "{:<16} {:<7} {:>9} {:>8} {:>8} {:>8} {:>7}  {:>15}  {:>14}  {:>17}  {:>11}",
        "phase",
        "path",
        "req/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "errors",
        "mesh CPU µs/req",
        "app CPU µs/req",
        "client CPU µs/req",
        "other CPU %"
    );
    let mut phases: Vec<Phase> = args.rates.iter().map(|&r| Phase::Rate(r)).collect();
    if !args.skip_full {
        phases.push(Phase::Full);
    }
    let mut rows = Vec::new();
    let routes: Vec<Route> = std::iter::once(Route::Direct)
        .chain((0..running.meshes.len()).map(Route::Mesh))
        .chain(running.floor.iter().map(|_| Route::Floor))
        .collect();
    for phase in phases {
        for &route in &routes {
            let app_pid = running.meshes[0].app_pid;
            // The path, the pids of its proxy (the mesh, or mesh-floor) and app, and the
            // output of the proxy for error messages.
            let (target, pids, context) = match (route, &running.floor) {
                (Route::Direct, _) => (
                    &running.direct,
                    [running.meshes[0].mesh_pid, app_pid, self_pid],
                    &running.meshes[0].mesh,
                ),
                (Route::Mesh(i), _) => {
                    let m = &running.meshes[i];
                    (&m.via_mesh, [m.mesh_pid, m.app_pid, self_pid], &m.mesh)
                }
                (Route::Floor, Some(f)) => (&f.via, [f.pid, app_pid, self_pid], &f.child),
                (Route::Floor, None) => unreachable!("the floor route exists only with --floor"),
            };
            std::thread::sleep(Duration::from_millis(200));
            let machine_before = procs::machine_cpu_ticks()?;
            let before = pids.map(procs::cpu_sample);
            let wall = Instant::now();
            let outcome = match phase {
                Phase::Rate(r) => {
                    rt.block_on(load::open_loop(target, args.connections, r, args.duration))?
                }
                Phase::Full => {
                    rt.block_on(load::closed_loop(target, args.connections, args.duration))?
                }
            };
            let after = pids.map(procs::cpu_sample);
            let wall_us = wall.elapsed().as_secs_f64() * 1e6;
            let machine_after = procs::machine_cpu_ticks()?;
            let requests = (outcome.latencies.len() as u64 + outcome.errors).max(1) as f64;
            let mut used_us = [0.0; 3];
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let (Ok(b), Ok(a)) = (b, a) else {
                    bail!(
                        "reading CPU times from /proc (did a process exit?)\n{}",
                        context.context()
                    );
                };
                used_us[i] = procs::cpu_between(b, a, ticks);
            }
            let tick_us = 1e6 / ticks as f64;
            let busy_us = machine_after.0.saturating_sub(machine_before.0) as f64 * tick_us;
            let steal_us = machine_after.1.saturating_sub(machine_before.1) as f64 * tick_us;
            let ours: f64 = used_us.iter().sum();
            let row = Row {
                phase,
                route,
                outcome,
                mesh_cpu: used_us[0] / requests,
                app_cpu: used_us[1] / requests,
                client_cpu: used_us[2] / requests,
                other_pct: ((busy_us - ours) / wall_us * 100.0).max(0.0),
                steal_pct: steal_us / wall_us * 100.0,
            };
            print_row(&row, &running);
            rows.push(row);
        }
    }

    let errors: u64 = rows.iter().map(|r| r.outcome.errors).sum();
    let queued: u64 = rows.iter().map(|r| r.outcome.queued).sum();
    println!();
    for (i, m) in running.meshes.iter().enumerate() {
        let peak_rss_kib = procs::status_kib(m.mesh_pid, "VmHWM")?;
        let shim_rss: Vec<u64> = m
            .shims
            .iter()
            .filter_map(|&p| procs::status_kib(p, "VmHWM").ok())
            .collect();
        let app_rss = procs::status_kib(m.app_pid, "VmHWM").ok();
        print_summary(
            &rows,
            Route::Mesh(i),
            m.label(),
            peak_rss_kib,
            &shim_rss,
            app_rss,
        );
    }
    if let Some(f) = &running.floor {
        let peak_rss_kib = procs::status_kib(f.pid, "VmHWM")?;
        print_summary(&rows, Route::Floor, "floor", peak_rss_kib, &[], None);
    }
    print_totals(&rows, errors, queued);

    for m in &mut running.meshes {
        let status = m.mesh.stop(STOP_TIMEOUT)?;
        if !status.success() {
            eprintln!("mesh-bench: warning: mesh exited with {status} after SIGTERM");
        }
    }
    drop(running);
    drop(scratch);
    Ok(errors == 0)
}

/// `mesh` and `mesh-test-app`, next to this executable.
fn executables() -> anyhow::Result<(PathBuf, PathBuf)> {
    Ok((beside("mesh")?, beside("mesh-test-app")?))
}

/// The executable `name`, next to this one.
fn beside(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating mesh-bench itself")?;
    let dir = exe.parent().context("mesh-bench has no parent directory")?;
    let find = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow::anyhow!(
                "{} not found: mesh-bench runs the executables built beside it (`mesh`, \
                 `mesh-test-app`, and `mesh-floor` with --floor); build them first with \
                 `cargo build --release --bins`",
                p.display()
            ))
        }
    };
    find(name)
}

/// Starts `mesh-floor` in front of the app of the direct path and waits until its path
/// answers.
fn start_floor(direct: &Target, rt: &tokio::runtime::Runtime) -> anyhow::Result<FloorRun> {
    let mut command = std::process::Command::new(beside("mesh-floor")?);
    command.arg(direct.addr().to_string());
    let mut child = MeshChild::spawn(command)?;
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
fn write_config(dir: &Path, app: &Path, tls: bool) -> anyhow::Result<PathBuf> {
    let app = app.to_str().context("the test app's path is not UTF-8")?;
    let tls = if tls { "mutual" } else { "off" };
    let text = format!(
        r#"# Written by mesh-bench.
version = 1

[mesh]
name = "bench"
tls = "{tls}"

[services.server]
command = [{app:?}]

[services.client]
command = ["sh", "-c", "echo url=$SERVER_URL; exec sleep 100000"]
port = "none"
upstreams = ["server"]
"#
    );
    let path = dir.join("mesh.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts mesh and waits until both paths are open; returns the mesh and the direct path
/// to its app.
fn start(
    mesh_bin: &Path,
    config: &Path,
    cwd: &Path,
    rt: &tokio::runtime::Runtime,
    tls: bool,
) -> anyhow::Result<(MeshRun, Arc<Target>)> {
    let mut mesh = MeshChild::start(mesh_bin, config, cwd)?;
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
    let run = MeshRun {
        mesh,
        mesh_pid,
        app_pid,
        shims,
        via_mesh,
        tls,
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

fn print_header(args: &Args, m: &procs::Machine, r: &Running) {
    let rates: Vec<String> = args.rates.iter().map(u32::to_string).collect();
    println!("mesh-bench");
    println!(
        "  machine:  {} CPUs, {}, {} RAM, Linux {}",
        m.cpus, m.cpu_model, m.memory, m.kernel
    );
    println!("  date:     {}", m.date);
    println!("  mesh:     commit {}", m.commit);
    let meshes: Vec<String> = r
        .meshes
        .iter()
        .map(|m| {
            let tls = if m.tls {
                "mutual TLS between the sidecars"
            } else {
                "tls = \"off\""
            };
            format!(
                "{} = client → caller's outbound {} → callee's inbound → app, {tls}",
                m.label(),
                m.via_mesh.addr()
            )
        })
        .collect();
    println!(
        "  paths:    direct = client → app {}; {}",
        r.direct.addr(),
        meshes.join("; ")
    );
    println!(
        "  load:     GET / over HTTP/1.1 keep-alive, {} connections, {} s per phase, rates {} rps (open loop), {}; warm-up {} s per path; generator: {} tokio threads in this process, on the same CPUs",
        args.connections,
        args.duration.as_secs_f64(),
        rates.join(", "),
        if args.skip_full {
            "no full speed"
        } else {
            "then full speed (closed loop)"
        },
        args.warmup.as_secs_f64(),
        args.threads,
    );
    for m in &r.meshes {
        println!(
            "  pids:     {}: mesh {} (both sidecars), test app {}",
            m.label(),
            m.mesh_pid,
            m.app_pid
        );
    }
    println!();
    flush();
}

fn print_row(row: &Row, running: &Running) {
    let o = &row.outcome;
    let route = match row.route {
        Route::Direct => "direct",
        Route::Mesh(i) => running.meshes[i].label(),
        Route::Floor => "floor",
    };
    println!(
        "{:<16} {:<7} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>7}  {:>15.1}  {:>14.1}  {:>17.1}  {:>11.0}",
        row.phase.label(),
        route,
        o.throughput(),
        load::quantile_us(&o.latencies, 0.50),
        load::quantile_us(&o.latencies, 0.99),
        load::quantile_us(&o.latencies, 1.0),
        o.errors,
        row.mesh_cpu,
        row.app_cpu,
        row.client_cpu,
        row.other_pct,
    );
    flush();
}

fn find(rows: &[Row], phase: Phase, route: Route) -> Option<&Row> {
    rows.iter().find(|r| r.phase == phase && r.route == route)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

/// The ratios and targets of one mesh path (`route`, labelled `label`).
fn print_summary(
    rows: &[Row],
    route: Route,
    label: &str,
    peak_rss_kib: u64,
    shim_rss: &[u64],
    app_rss: Option<u64>,
) {
    let mut ratios = Vec::new();
    let mut targets = Vec::new();

    if let (Some(d), Some(m)) = (
        find(rows, Phase::Full, Route::Direct),
        find(rows, Phase::Full, route),
    ) {
        let ratio = m.outcome.throughput() / d.outcome.throughput();
        ratios.push(format!("throughput {ratio:.2}×"));
        targets.push(format!(
            "throughput ≥{TARGET_THROUGHPUT_RATIO:.2}× [{}]",
            verdict(ratio >= TARGET_THROUGHPUT_RATIO)
        ));
    } else {
        targets.push(format!(
            "throughput ≥{TARGET_THROUGHPUT_RATIO:.2}× [not measured]"
        ));
    }

    let p99_phase = Phase::Rate(TARGET_P99_RATE);
    if let (Some(d), Some(m)) = (
        find(rows, p99_phase, Route::Direct),
        find(rows, p99_phase, route),
    ) {
        let extra = m.p99() - d.p99();
        ratios.push(format!("p99 @{TARGET_P99_RATE} {extra:+.0} µs"));
        targets.push(format!(
            "p99@{TARGET_P99_RATE} ≤ +{TARGET_P99_EXTRA_US:.0} µs [{}]",
            verdict(extra <= TARGET_P99_EXTRA_US)
        ));
    } else {
        targets.push(format!(
            "p99@{TARGET_P99_RATE} ≤ +{TARGET_P99_EXTRA_US:.0} µs [not measured]"
        ));
    }

    // CPU: the full-speed figure (the one comparable to other proxies), and the worst
    // mesh phase; the target is checked against the worst.
    let mesh_rows: Vec<&Row> = rows.iter().filter(|r| r.route == route).collect();
    if let Some(worst) = mesh_rows
        .iter()
        .max_by(|a, b| a.mesh_cpu.total_cmp(&b.mesh_cpu))
    {
        let mut s = String::from("CPU/req");
        if let Some(full) = find(rows, Phase::Full, route) {
            s.push_str(&format!(" {:.1} µs at full speed,", full.mesh_cpu));
        }
        s.push_str(&format!(
            " worst {:.1} µs ({})",
            worst.mesh_cpu,
            worst.phase.label()
        ));
        ratios.push(s);
        targets.push(format!(
            "CPU ≤{TARGET_CPU_US:.0} µs [{}]",
            verdict(worst.mesh_cpu <= TARGET_CPU_US)
        ));
    }

    let rss_mib = peak_rss_kib as f64 / 1024.0;
    ratios.push(format!("peak RSS {rss_mib:.1} MiB"));
    targets.push(format!(
        "RSS ≤{TARGET_RSS_MIB:.0} MiB [{}]",
        verdict(rss_mib <= TARGET_RSS_MIB)
    ));

    println!("{label}: ratios mesh/direct: {}", ratios.join(", "));
    println!("{label}: targets: {}", targets.join(", "));
    let shims: Vec<String> = shim_rss
        .iter()
        .map(|k| format!("{:.1}", *k as f64 / 1024.0))
        .collect();
    if route == Route::Floor {
        println!(
            "{label}: notes: its CPU column is the mesh-floor process (both hops, nothing else) per request; peak RSS is its VmHWM"
        );
        flush();
        return;
    }
    println!(
        "{label}: notes: mesh CPU is the mesh process (both sidecars, plus its supervisor) per request; peak RSS is its VmHWM; \
         the shims (one per app process) peak at [{}] MiB, the test app at {} MiB",
        shims.join(", "),
        app_rss.map_or_else(|| "?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
    );
    flush();
}

/// What concerns the whole run: a noisy machine, queued requests, errors.
fn print_totals(rows: &[Row], errors: u64, queued: u64) {
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
    if errors > 0 {
        println!("ERRORS: {errors} requests failed (see the errors column)");
    }
    flush();
}

fn flush() {
    let _ = std::io::stdout().flush();
}
